"""FusedModule, the base of every fused module, and the two single-branch ones.

A fused module *adopts the children* of the module it replaces (the very same submodule
objects), so it has exactly the same parameters, buffers and state_dict keys, an optimizer
built before conversion keeps training the same tensors, and reverting just hands the
original back. Only ``forward`` differs: it calls the fused ops (aspp_fused.functional)
through nn/_conv_bn.py, after the input checks of nn/_checks.py.
"""
import inspect

from torch import nn

from aspp_fused import functional as AF
from aspp_fused.nn import reference
from aspp_fused.nn._checks import (check_cbr, check_bn, check_input, check_sequential, check_type,
                                   separable_branch_args, separable_parts)
from aspp_fused.nn._conv_bn import conv_bn_act, like_input_format, separable_bn_act
from aspp_fused.nn._fold_cache import fold_cache

__all__ = ["FusedModule", "FusedAtrousConvBNReLU", "FusedSeparableAtrousConv"]


class FusedModule(nn.Module):
    """Base of every fused module: same children as the reference ``twin``, fused forward.

    ``FusedX(*args, backend=...)`` builds the twin's layout; ``FusedX.from_module(m)``
    adopts the children of an existing module ``m`` (torchvision, smp or our twin);
    ``to_reference()`` gives back that module (or the twin built at construction).
    """

    twin: type = None  # the reference class this module reproduces

    def __init__(self, *args, backend: str = "auto", **kwargs):
        twin = type(self).twin
        sig = inspect.signature(twin)
        try:
            unknown = [k for k in kwargs if k not in sig.parameters]
            if unknown:
                raise TypeError("unexpected keyword argument %s" % ", ".join(map(repr, unknown)))
            sig.bind(*args, **kwargs)
        except TypeError as exc:  # name this class and its arguments, not the twin's __init__
            raise TypeError("%s%s: %s; expected %s%s (the arguments of its twin %s, plus backend=)"
                            % (type(self).__name__, _call_repr(args, kwargs), exc, type(self).__name__, sig,
                               twin.__name__)) from None
        self._adopt(twin(*args, **kwargs), backend)

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value: str):
        # Checked when set, so `m.backend = "cuda"` fails here and not at the next forward.
        self.__dict__["_backend"] = AF.check_backend(value)

    def _adopt(self, source: nn.Module, backend: str):
        nn.Module.__init__(self)
        self.backend = backend
        for name, child in source.named_children():
            self._modules[name] = child
        self.training = source.training
        # Not a child: kept outside the module tree so it adds no state_dict keys.
        object.__setattr__(self, "_source", source)

    @classmethod
    def check_source(cls, module: nn.Module) -> None:
        """Raises ValueError saying why ``module`` cannot be fused by this class."""
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedModule":
        if not isinstance(module, nn.Module):
            raise TypeError("%s.from_module: module must be an nn.Module (a %s), got %s"
                            % (cls.__name__, cls.twin.__name__, type(module).__name__))
        cls.check_source(module)
        fused = cls.__new__(cls)
        fused._adopt(module, backend)
        return fused

    def to_reference(self) -> nn.Module:
        source = self.__dict__["_source"]
        for name, child in self.named_children():  # children may have been converted/reverted since
            source._modules[name] = child
        source.training = self.training
        return source

    def extra_repr(self) -> str:
        return "backend=%r" % (self.backend,)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling anything. The fused
        # forwards pick a backend, fold BN and check arguments in Python, which TorchScript
        # cannot compile (it died inside its frontend, and a second try said "Can't redefine
        # method: forward"): refuse up front, naming what does work.
        raise RuntimeError(
            "%s (aspp_fused) cannot be compiled by torch.jit.script: use torch.compile(model), or "
            "torch.export.export(model, args) / torch.onnx.export(model, args, dynamo=True) to deploy "
            "(torch.jit.trace also works); aspp_fused.revert(model) gives back scriptable modules"
            % type(self).__name__)


def _call_repr(args, kwargs) -> str:
    return "(%s)" % ", ".join([repr(a) for a in args] + ["%s=%r" % kv for kv in kwargs.items()])


class FusedAtrousConvBNReLU(FusedModule, nn.Sequential):
    """Fused [Conv2d (1x1 or dilated 3x3), BatchNorm2d, ReLU] (e.g. torchvision's ASPPConv)."""

    twin = reference.AtrousConvBNReLU

    @classmethod
    def check_source(cls, module):
        check_cbr(cls.__name__, "module", module)

    def forward(self, x):
        check_input(type(self).__name__, x, self[0].in_channels, self[0].weight)
        return like_input_format(conv_bn_act(x, [self[0]], [self[1]], self.backend, cache=fold_cache(self),
                                             cache_key=0), x)


class FusedSeparableAtrousConv(FusedModule, nn.Sequential):
    """Fused [SeparableConv2d (depthwise dilated 3x3 [-> BN -> ReLU] -> pointwise), BN, ReLU]."""

    twin = reference.SeparableAtrousConv

    @classmethod
    def check_source(cls, module):
        owner = cls.__name__
        check_sequential(owner, "module", module, ("SeparableConv2d", "BatchNorm2d", "ReLU"))
        _, _, pw = separable_branch_args(owner, module[0], "module[0]")
        check_bn(owner, "module[1]", module[1], pw.out_channels)
        check_type(owner, "module[2]", module[2], nn.ReLU)

    def forward(self, x):
        dw, mid, pw = separable_parts(self[0])  # the layout was checked at construction (check_source)
        check_input(type(self).__name__, x, dw.in_channels)
        return like_input_format(separable_bn_act(x, [(dw, mid, pw)], [self[1]], self.backend), x)
