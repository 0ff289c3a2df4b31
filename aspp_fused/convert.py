"""Model surgery: swap ASPP heads (and their blocks) for fused modules, in place, and back.

Instances are replaced, classes are never patched. Modules are recognised by type for our
own twins and by class name + defining package for torchvision and
segmentation_models_pytorch, so neither needs to be imported.
"""
import warnings
from typing import List, Optional, Tuple, Type

from torch import nn

from aspp_fused.functional import check_backend
from aspp_fused.nn import fused_heads, reference
from aspp_fused.nn.fused import FusedAtrousConvBNReLU, FusedModule, FusedSeparableAtrousConv
from aspp_fused.nn.fused_sequential import FusedSequential, fusable_runs

__all__ = ["convert", "revert", "list_fused"]

# Our twins -> fused class. Order matters: subclasses before their bases.
_OURS: List[Tuple[type, Type[FusedModule]]] = [
    (reference.ASPP, fused_heads.FusedASPP),
    (reference.SeparableASPP, fused_heads.FusedSeparableASPP),
    (reference.ASPPv2, fused_heads.FusedASPPv2),
    (reference.LRASPPHead, fused_heads.FusedLRASPPHead),
    (reference.DeepLabHead, fused_heads.FusedDeepLabHead),
    (reference.AtrousConvBNReLU, FusedAtrousConvBNReLU),
    (reference.SeparableAtrousConv, FusedSeparableAtrousConv),
]

# (package prefix, class name) of third-party modules -> candidate fused classes, tried in order.
_THIRD_PARTY = {
    ("torchvision.models.segmentation", "ASPP"): [fused_heads.FusedASPP],
    ("torchvision.models.segmentation", "DeepLabHead"): [fused_heads.FusedDeepLabHead],
    ("torchvision.models.segmentation", "LRASPPHead"): [fused_heads.FusedLRASPPHead],
    ("segmentation_models_pytorch", "ASPP"): [fused_heads.FusedASPP, fused_heads.FusedSeparableASPP],
}


def _candidates(module: nn.Module) -> List[Type[FusedModule]]:
    if isinstance(module, FusedModule):
        return []
    if type(module) is nn.Sequential:
        # Quietly: most Sequentials have nothing to fuse, which is no reason to warn.
        return [FusedSequential] if fusable_runs(module) else []
    for twin, fused in _OURS:
        if isinstance(module, twin):  # subclasses too, e.g. ASPPConv of AtrousConvBNReLU
            return [fused]
    cls = type(module)
    for (package, name), fused in _THIRD_PARTY.items():
        if cls.__name__ == name and cls.__module__.startswith(package):
            return fused
    return []


def _fuse(module: nn.Module, backend: str, path: str) -> Optional[FusedModule]:
    errors = []
    for fused_cls in _candidates(module):
        try:
            return fused_cls.from_module(module, backend=backend)
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        warnings.warn("aspp_fused.convert: left %s (%s) unconverted: %s"
                      % (path or "<root>", type(module).__name__, "; ".join(errors)), stacklevel=3)
    return None


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces every recognised ASPP head / block in ``model`` by its fused module, in place.

    Recognised: aspp_fused.nn twins; torchvision ``ASPP``, ``DeepLabHead``, ``LRASPPHead``;
    segmentation_models_pytorch ``ASPP`` (plain and separable); and, inside any plain
    ``nn.Sequential``, runs of dilated 3x3 conv + BN + ReLU or separable (depthwise +
    pointwise) conv + BN + ReLU (the Sequential becomes a FusedSequential with the same
    children, e.g. smp's DeepLabV3+ decoder blocks). A recognised module whose
    configuration the fused ops cannot run (stride, groups, ...) is left alone with a
    warning that says why. Parameters and buffers are shared, not copied: state_dict keys
    and optimizers are unaffected. Returns ``model`` (or, when ``model`` itself is a
    recognised head, its fused replacement).
    """
    check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError("convert: model must be an nn.Module, got %s" % type(model).__name__)
    root = _fuse(model, backend, "")
    if root is not None and not isinstance(root, FusedSequential):
        return root
    _convert_children(root if root is not None else model, backend, "")
    return root if root is not None else model


def _convert_children(module: nn.Module, backend: str, prefix: str):
    for name, child in list(module.named_children()):
        path = prefix + name
        fused = _fuse(child, backend, path)
        if fused is not None:
            module._modules[name] = fused  # direct: keeps the child's position and key
        if fused is None or isinstance(fused, FusedSequential):
            # A FusedSequential fuses only its runs; its other children may hold heads too.
            _convert_children(module._modules[name], backend, path + ".")


def revert(model: nn.Module) -> nn.Module:
    """Undoes :func:`convert`: puts the original modules back (sharing the same parameters)."""
    if not isinstance(model, nn.Module):
        raise TypeError("revert: model must be an nn.Module, got %s" % type(model).__name__)
    for name, child in list(model.named_children()):
        model._modules[name] = revert(child)
    if isinstance(model, FusedModule):
        return model.to_reference()
    return model


def list_fused(model: nn.Module) -> List[Tuple[str, str, str]]:
    """(qualified name, original class, fused class) of every fused module in ``model``."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FusedModule):
            out.append((name or "<root>", type(m.__dict__["_source"]).__name__, type(m).__name__))
    return out
