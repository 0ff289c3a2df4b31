"""The folded-weight cache of the eval-mode fused modules (see FoldCache)."""
import os

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from aspp_fused import _extension
from aspp_fused.kernels.pack_cache import PACKED


class FoldCache:
    """Eval-mode BN folded into the conv weights, kept until one of its sources changes.

    Folding costs a pass over the weights per forward (measured on the CPU end-to-end
    DeepLabV3 head: 144.5 ms per call refolding vs 130.3 ms cached, eager_cl 134.7 ms).
    Entries hold their source tensors and compare identity, version counter and storage
    pointer, so an optimizer step, load_state_dict, an in-place edit under no_grad, a replaced
    parameter or .to() all invalidate them. The price is one folded copy of the head's conv
    weights while the module is in eval mode.

    Every torch.optim step ends every entry (``_after_optimizer_step``: fused optimizers bump no
    counter). The one other edit no version counter sees is an in-place write through ``.data``
    (``p.data.mul_(...)``: PyTorch gives ``.data`` a fresh counter, which is also why autograd
    cannot catch it); after such an edit call ``aspp_fused.clear_caches(model)``, or run with
    ``ASPP_FUSED_FOLD_CACHE=0`` (read at each call) to fold on every call.
    """

    def __init__(self):
        self.entries = {}

    @staticmethod
    def _signature(sources):
        return [(t, t._version, t.data_ptr()) for t in sources if t is not None]

    def get(self, key, sources, compute):
        step, sig = _STEPS[0], self._signature(sources)  # both before compute(), as it read them
        entry = self.entries.get(key)
        if entry is not None and entry[0] == step and len(entry[1]) == len(sig) and all(
                a[0] is b[0] and a[1:] == b[1:] for a, b in zip(entry[1], sig)):
            return entry[2]
        value = compute()
        self.entries[key] = (step, sig, value)
        return value


def clear_caches(model: nn.Module) -> nn.Module:
    """Drop every folded-weight cache in ``model`` and every backend's packed weights (Triton's,
    the oneDNN path's, and the compiled CPU / CUDA kernels'; see FoldCache: needed only after
    in-place edits through ``.data``). Returns the model."""
    for m in model.modules():
        cache = m.__dict__.get("_fold_cache")
        if cache is not None:
            cache.entries.clear()
    PACKED.clear()  # the Triton ops' and the oneDNN path's packed weights (kernels/pack_cache.py)
    if _extension.cpp_available():  # the CPU / CUDA kernels' packed weights (csrc/pack_cache.h)
        torch.ops.aspp_fused.pack_cache_clear()
    return model


# torch.optim steps seen since import: every cache entry belongs to one (FoldCache compares it; the
# packing caches are emptied by the hook below).
_STEPS = [0]


@torch.compiler.disable
def _after_optimizer_step(optimizer, args, kwargs):
    """A torch.optim step may have changed parameters without moving their version counters:
    the fused optimizers (Adam, AdamW, SGD, Adagrad with ``fused=True``) write them in one kernel
    and bump none (measured: a cached model then lagged one step behind). So every step ends
    every cache entry; a training step repacks anyway, as its weights change. Never traced: in a
    compiled optimizer step a traced drop op (no outputs) would be deleted, and a traced step
    count guarded on (a recompile per step)."""
    _STEPS[0] += 1
    PACKED.clear()
    if _extension.cpp_available():
        torch.ops.aspp_fused.pack_cache_drop()


_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def fold_cache_enabled() -> bool:
    return os.environ.get("ASPP_FUSED_FOLD_CACHE", "1") != "0"


def fold_cache(module: nn.Module) -> FoldCache:
    """The module's FoldCache (a plain attribute: no state_dict keys, copied by deepcopy)."""
    cache = module.__dict__.get("_fold_cache")
    if cache is None:
        cache = FoldCache()
        object.__setattr__(module, "_fold_cache", cache)
    return cache
