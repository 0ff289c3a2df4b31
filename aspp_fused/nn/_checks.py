"""Structure and input checks of the fused modules: the rules, stated once, that a module
must meet to be fused (run by ``from_module`` and by convert, at conversion time) and that an
input must meet (run by each forward). Errors say "has X, expected Y" and name the child.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from aspp_fused._tracing import size_checks


def _fail(owner: str, where: str, why: str):
    raise ValueError("%s.from_module: %s %s" % (owner, where, why))


def check_type(owner, where, module, types):
    if not isinstance(module, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        _fail(owner, where, "is %s, expected %s" % (type(module).__name__, names))


def check_sequential(owner: str, where: str, seq, children: Sequence[str]):
    """An nn.Sequential of exactly these children (their class names, for the message)."""
    check_type(owner, where, seq, nn.Sequential)
    if len(seq) != len(children):
        _fail(owner, where, "has %d children, expected %d (%s)" % (len(seq), len(children), ", ".join(children)))


def conv_problem(conv: nn.Conv2d, kernel_sizes=(1, 3), depthwise=False) -> Optional[Tuple[str, str]]:
    """Why the fused ops cannot run ``conv`` (a 'same'-padded, stride-1, square conv, groups=1 or
    depthwise), or None: (short reason for convert's report, "has X, expected Y" detail for
    from_module's error). The one statement of the rule, checked in this order."""
    k, d, s = conv.kernel_size, conv.dilation, conv.stride
    if tuple(s) != (1, 1):
        return ("stride %d" % s[0] if s[0] == s[1] else "stride %s" % (tuple(s),),
                "has stride %s, expected 1" % (s,))
    if k[0] != k[1] or k[0] not in kernel_sizes:
        return "kernel %dx%d" % tuple(k), "has kernel_size %s, expected one of %s (square)" % (k, kernel_sizes)
    if d[0] != d[1]:
        return "dilation %s (unequal)" % (tuple(d),), "has dilation %s, expected equal rates for H and W" % (d,)
    groups = conv.in_channels if depthwise else 1
    if conv.groups != groups or (depthwise and conv.out_channels != conv.in_channels):
        return "groups=%d" % conv.groups, "has groups=%d (in %d, out %d), expected %s" % (
            conv.groups, conv.in_channels, conv.out_channels, "a depthwise conv" if depthwise else "groups=1")
    if conv.padding_mode != "zeros":
        return ("padding_mode %r" % conv.padding_mode,
                "has padding_mode %r, expected 'zeros'" % conv.padding_mode)
    if isinstance(conv.padding, str):
        if conv.padding != "same" and k[0] != 1:
            return "padding %r (not 'same')" % conv.padding, "has padding %r, expected 'same'" % conv.padding
    elif tuple(conv.padding) != (d[0] * (k[0] // 2),) * 2:
        return ("padding %s (not 'same')" % (tuple(conv.padding),),
                "has padding %s, expected dilation * (k // 2) = %d" % (conv.padding, d[0] * (k[0] // 2)))
    return None


def check_conv(owner: str, where: str, conv, kernel_sizes=(1, 3), depthwise=False):
    """A conv the fused ops can run (conv_problem), else from_module's ValueError."""
    check_type(owner, where, conv, nn.Conv2d)
    problem = conv_problem(conv, kernel_sizes, depthwise)
    if problem is not None:
        _fail(owner, where, problem[1])


def check_bn(owner: str, where: str, bn, channels: int):
    check_type(owner, where, bn, (nn.BatchNorm2d, nn.SyncBatchNorm))
    if bn.num_features != channels:
        _fail(owner, where, "has %d features, expected %d" % (bn.num_features, channels))


def check_cbr(owner: str, where: str, seq, kernel_sizes=(1, 3)):
    """[Conv2d, BatchNorm2d, ReLU] (an nn.Sequential, e.g. torchvision's ASPPConv)."""
    check_sequential(owner, where, seq, ("Conv2d", "BatchNorm2d", "ReLU"))
    check_conv(owner, where + "[0]", seq[0], kernel_sizes)
    check_bn(owner, where + "[1]", seq[1], seq[0].out_channels)
    check_type(owner, where + "[2]", seq[2], nn.ReLU)


def check_input(owner: str, x, channels: int, weight: Optional[torch.Tensor] = None):
    """``weight``: a parameter of the module; the input must have its dtype (outside autocast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s: input must be a torch.Tensor, got %s" % (owner, type(x).__name__))
    if x.dim() != 4:
        raise ValueError("%s: input must be 4-D [N, C, H, W], got shape %s" % (owner, tuple(x.shape)))
    with size_checks():
        if x.shape[1] != channels:
            raise ValueError("%s: input has %d channels, expected %d" % (owner, x.shape[1], channels))
    if (weight is not None and x.dtype != weight.dtype and x.is_floating_point()
            and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError("%s: input has dtype %s, expected the module's parameter dtype %s (convert one: "
                        "module.to(%s) or input.to(%s))" % (owner, x.dtype, weight.dtype, x.dtype, weight.dtype))


def separable_parts(sep: nn.Sequential):
    """(depthwise conv, mid BN or None, pointwise conv) of a SeparableConv2d layout that
    separable_branch_args has checked (at construction): what a forward reads, with no checks."""
    return (sep[0], None, sep[1]) if len(sep) == 2 else (sep[0], sep[1], sep[3])


def separable_branch_args(owner: str, sep: nn.Sequential, where: str):
    """(depthwise conv, mid BN or None, pointwise conv) of a SeparableConv2d layout, checked."""
    check_type(owner, where, sep, nn.Sequential)
    if len(sep) == 2:
        dw, mid, pw = sep[0], None, sep[1]
    elif len(sep) == 4:
        dw, mid, pw = sep[0], sep[1], sep[3]
        check_bn(owner, where + "[1]", mid, dw.out_channels)
        check_type(owner, where + "[2]", sep[2], nn.ReLU)
    else:
        _fail(owner, where, "has %d children, expected (depthwise, pointwise) or (depthwise, BN, ReLU, pointwise)"
              % len(sep))
    check_conv(owner, where + "[0]", dw, (3,), depthwise=True)
    if dw.bias is not None:
        _fail(owner, where + "[0]", "has a bias; the fused separable conv expects bias=False on the depthwise")
    check_conv(owner, where + "[-1]", pw, (1,))
    if pw.in_channels != dw.out_channels:
        _fail(owner, where + "[-1]", "has %d input channels, expected %d" % (pw.in_channels, dw.out_channels))
    return separable_parts(sep)
