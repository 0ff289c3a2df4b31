"""Shared by the backbones and models: argument checks, staged forward, loading local weights."""
import os
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

Stage = Tuple[str, Callable[[torch.Tensor], torch.Tensor]]


# --------------------------------------------------------------------------- argument checks


def check_int(owner: str, name: str, value, minimum: Optional[int] = None, choices: Optional[Sequence[int]] = None):
    # bool is an int subclass; `num_classes=True` is a bug, not 1 class.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("%s: %s must be an int, got %r" % (owner, name, value))
    if choices is not None and value not in choices:
        raise ValueError("%s: %s must be one of %s, got %r" % (owner, name, ", ".join(map(str, choices)), value))
    if minimum is not None and value < minimum:
        raise ValueError("%s: %s must be >= %d, got %r" % (owner, name, minimum, value))
    return value


def check_rates(owner: str, name: str, value, length: Optional[int] = None) -> Tuple[int, ...]:
    """A sequence of positive ints (atrous rates, multi-grid unit rates)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("%s: %s must be a sequence of positive ints, got %r" % (owner, name, value))
    rates = tuple(value)
    if not rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
        raise ValueError("%s: %s must be a non-empty sequence of positive ints, got %r" % (owner, name, value))
    if length is not None and len(rates) != length:
        raise ValueError("%s: %s must have %d entries, got %r" % (owner, name, length, value))
    return rates


# --------------------------------------------------------------------------- staged forward


def forward_stages(owner: str, stages: List[Stage], x: torch.Tensor, return_layers: Dict[str, str]):
    """Runs ``stages`` in order and returns {role: output} for the stages named in ``return_layers``
    ({stage name: role}), stopping after the last one needed (like torchvision's
    IntermediateLayerGetter, so an LR-ASPP or v3+ never runs stages it does not read)."""
    check_return_layers(owner, stages, return_layers)
    out = {}
    todo = len(return_layers)
    for name, fn in stages:
        x = fn(x)
        if name in return_layers:
            out[return_layers[name]] = x
            todo -= 1
            if todo == 0:
                break
    return out


def check_return_layers(owner: str, stages: List[Stage], return_layers: Dict[str, str]):
    names = [n for n, _ in stages]
    unknown = [n for n in return_layers if n not in names]
    if unknown:
        raise ValueError("%s: unknown stage(s) %s in return_layers; stages are %s" % (owner, unknown, names))


# --------------------------------------------------------------------------- local weights


def _preview(keys: List[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return "[%s%s]" % (shown, ", ... (%d more)" % (len(keys) - limit) if len(keys) > limit else "")


def read_state_dict(path, owner: str, arg: str) -> Dict[str, torch.Tensor]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` of a local file, as a plain dict.

    Nothing is ever downloaded. Accepted containers: a state_dict, or a dict holding one under
    "state_dict" or "model" (the usual training-checkpoint layouts); a "module." prefix on every
    key (a DistributedDataParallel state_dict) is stripped.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError("%s: %s must be a path to a local file (str or os.PathLike), got %s"
                        % (owner, arg, type(path).__name__))
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError("%s: %s=%r is a directory, expected a checkpoint file (a state_dict saved with "
                                "torch.save)" % (owner, arg, path))
    if not os.path.isfile(path):
        raise FileNotFoundError("%s: %s=%r: no such file (weights are only read from local files)"
                                % (owner, arg, path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's message goes on to advise weights_only=False, which this API never uses (it
        # would run code from the file): keep its first line only.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = first.split(" In PyTorch 2.6, we changed")[0].strip()
        raise ValueError("%s: %s=%r could not be read by torch.load(weights_only=True) (%s: %s); expected a "
                         "state_dict of tensors saved with torch.save" % (owner, arg, path, type(exc).__name__, first)
                         ) from None
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise ValueError("%s: %s=%r does not hold a state_dict (a mapping of str to tensors), got %s"
                         % (owner, arg, path, type(obj).__name__))
    # A fresh dict also drops the file's _metadata: BatchNorm then fills a missing
    # num_batches_tracked (old torchvision checkpoints lack it) instead of failing.
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict_checked(module: nn.Module, state_dict: Dict[str, torch.Tensor], owner: str, arg: str, path: str,
                            hint: str = ""):
    """Strict load_state_dict with one ValueError naming the file, every missing and unexpected
    key and every shape mismatch (load_state_dict's own RuntimeError stops at the first problem
    of each kind and does not say which file)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict
               # filled in by BatchNorm when a (pre-1.0) checkpoint lacks it
               and not (k.endswith("num_batches_tracked") and k[:-len("num_batches_tracked")] + "running_mean"
                        in state_dict)]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = ["%s: file %s, model %s" % (k, tuple(state_dict[k].shape), tuple(v.shape))
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append("%d missing key(s) %s" % (len(missing), _preview(missing)))
        if unexpected:
            parts.append("%d unexpected key(s) %s" % (len(unexpected), _preview(unexpected)))
        if mismatched:
            parts.append("%d shape mismatch(es) %s" % (len(mismatched), _preview(mismatched)))
        raise ValueError("%s: %s=%r does not match the model: %s%s" % (owner, arg, path, "; ".join(parts), hint))
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. dtype conversions load_state_dict refuses
        raise ValueError("%s: %s=%r could not be loaded: %s" % (owner, arg, path, exc)) from exc
