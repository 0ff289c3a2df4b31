"""Recognition by structure and dataflow: which parts of a module's forward are fusable sites.

A module's ``forward`` is traced with ``torch.fx`` (:func:`trace`): torch.nn's own layers (conv,
BN, activations, pooling, dropout, upsampling) are leaves, every other module is traced
through, so the graph shows what the code *computes*, whatever the classes or attributes are
called. :func:`find_sites` then matches, on that graph:

- ``conv-bn-act``: Conv2d -> BatchNorm -> activation, each value used once;
- ``separable``: depthwise 3x3 [-> BN -> ReLU] -> pointwise 1x1 -> BN -> activation;
- ``head``: one tensor X feeding N conv-BN-ReLU / separable branches and optionally an image
  pooling branch (AdaptiveAvgPool2d(1), adaptive_avg_pool2d(., 1) or mean over H, W ->
  1x1 conv [-> BN] -> ReLU -> upsampled by nearest or bilinear interpolation, either
  align_corners), concatenated along channels, then a conv -> BN -> ReLU projection;
- ``v2-sum``: a sum of convs of one tensor X (DeepLab v2's classifier).

Each site carries a ``reason`` (None when the fused ops compute it exactly) and a ``spec``:
module paths relative to the traced module, which :mod:`aspp_fused.nn.fused_forward` runs.
"""
import inspect
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from aspp_fused.nn._checks import conv_problem

__all__ = ["Site", "trace", "find_sites", "has_hooks", "is_primitive", "is_whole_forward"]

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", F.relu)}
OTHER_ACT_FUNCTIONS = {F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, F.hardtanh, F.mish, F.elu, F.selu}
OTHER_ACT_MODULES = (nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardtanh, nn.Mish, nn.ELU,
                     nn.SELU, nn.PReLU)
INTERPOLATE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest}
_INTERP_SIG = inspect.signature(F.interpolate)


# Every per-module hook dict (the hooks, and the flag dicts keyed by hook id): convert moves all of
# them with a replaced module, and tracing puts them aside so no hook sees proxies.
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def is_primitive(m: nn.Module) -> bool:
    """torch.nn's own layers (not its containers): leaves of every trace."""
    return type(m).__module__.startswith("torch.nn.") and not isinstance(m, CONTAINERS)


def is_frozen_bn(m: nn.Module) -> bool:
    """A BN of buffers only (e.g. torchvision's FrozenBatchNorm2d): a leaf, so that its site is
    reported (the fused ops take nn.BatchNorm2d / SyncBatchNorm)."""
    return not is_primitive(m) and not list(m.children()) and not list(m.parameters(recurse=False)) and all(
        isinstance(getattr(m, a, None), torch.Tensor) for a in ("running_mean", "running_var", "weight", "bias"))


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


class _Tracer(fx.Tracer):
    """Leaves: torch.nn layers, already fused modules / overridden forwards, and ``opaque``."""

    def __init__(self, opaque=frozenset()):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m, qualname):
        from aspp_fused.nn.fused import FusedModule

        if isinstance(m, FusedModule) or "forward" in m.__dict__:
            return True
        if qualname in self.opaque:
            return True
        return is_primitive(m) or is_frozen_bn(m)


def forward_defaults(module: nn.Module) -> Dict[str, object]:
    """Arguments of ``type(module).forward`` with a default: traced as constants (``labels=None``
    must not be traced as a tensor). Raises TypeError for *args / **kwargs forwards."""
    sig = inspect.signature(type(module).forward)
    out = {}
    for i, (name, p) in enumerate(sig.parameters.items()):
        if i == 0:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError("forward takes *%s" % name)
        if p.default is not p.empty:
            out[name] = p.default
    return out


def trace(module: nn.Module, opaque=frozenset(), cls=None) -> fx.Graph:
    """fx graph of ``type(module).forward`` (or ``cls.forward`` run on module's children)."""
    root = module
    if cls is not None and cls is not type(module):
        root = cls.__new__(cls)
        root.__dict__.update(module.__dict__)
        root.__dict__.pop("forward", None)
    defaults = forward_defaults(root)
    # The tracer calls submodules through Module.__call__, which would run their hooks on
    # proxies: a user's hook must see real calls only. Their dicts are put aside meanwhile
    # (the same objects come back, so hook handles keep working).
    saved = []
    for m in module.modules():
        for attr in HOOK_DICTS:
            d = m.__dict__.get(attr)
            if d:
                saved.append((m, attr, d))
                m.__dict__[attr] = type(d)()
    try:
        return _Tracer(opaque).trace(root, concrete_args=defaults or None)
    finally:
        for m, attr, d in saved:
            m.__dict__[attr] = d


# --------------------------------------------------------------------------- node predicates


@dataclass
class Site:
    kind: str                      # "conv-bn-act" | "separable" | "head" | "v2-sum"
    input: fx.Node
    output: fx.Node
    nodes: set
    modules: List[str]             # leaf module paths inside (relative to the traced module)
    spec: dict
    reason: Optional[str] = None   # None: the fused ops compute it exactly
    in_head: bool = False          # a branch of a head candidate
    label: str = ""
    children: list = field(default_factory=list)


class _Graph:
    def __init__(self, graph: fx.Graph, root: nn.Module):
        self.graph = graph
        self.mods = dict(root.named_modules())

    def module(self, n):
        return self.mods.get(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None

    def is_conv(self, n):
        return isinstance(self.module(n), nn.Conv2d) and len(n.args) == 1 and not n.kwargs

    def is_bn_like(self, n):
        m = self.module(n)
        if isinstance(m, _BatchNorm):
            return True
        return m is not None and is_frozen_bn(m)  # reported, never fused

    def act(self, n):
        """'relu', another activation's name, or None."""
        if not isinstance(n, fx.Node):
            return None
        m = self.module(n)
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, OTHER_ACT_MODULES):
            return type(m).__name__
        if n.op == "call_function" and n.target in RELU_FUNCTIONS:
            return "relu"
        if n.op == "call_function" and n.target in OTHER_ACT_FUNCTIONS:
            return n.target.__name__
        if n.op == "call_method" and n.target in ("relu", "relu_"):
            return "relu"
        return None

    @staticmethod
    def only_user(n):
        """The one user of n that is not a shape query (x.size(), x.shape), or None."""
        users = [u for u in n.users if not is_shape_query(u)]
        return users[0] if len(users) == 1 else None


def is_shape_query(n) -> bool:
    """x.shape / x.size(...) / x.dim() and indexing into them: reads no values."""
    if n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",):
        return True
    if n.op == "call_method" and n.target in ("size", "dim"):
        return True
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        return is_shape_query(n.args[0])
    return False


def conv_reason(conv: nn.Conv2d, kernels=(1, 3), depthwise=False) -> Optional[str]:
    """The report's short reason (the rule is fused.conv_problem, shared with from_module)."""
    problem = conv_problem(conv, kernels, depthwise)
    return None if problem is None else problem[0]


def bn_reason(bn, channels) -> Optional[str]:
    if not isinstance(bn, _BatchNorm):
        return "normalization is %s, not BatchNorm" % type(bn).__name__
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return "normalization is %s" % type(bn).__name__
    if not bn.track_running_stats or bn.running_mean is None:
        return "BN with track_running_stats=False"
    if bn.num_features != channels:
        return "BN has %d features for %d channels" % (bn.num_features, channels)
    return None


def _hook_reason(g: _Graph, nodes) -> Optional[str]:
    for n in nodes:
        m = g.module(n)
        if m is not None and has_hooks(m):
            return "%s carries a hook" % n.target
        for path in n.meta.get("nn_module_stack", {}):
            mm = g.mods.get(path)
            if mm is not None and has_hooks(mm) and path != n.target:
                return "%s carries a hook" % path
    return None


def _first(*reasons):
    return next((r for r in reasons if r), None)


# --------------------------------------------------------------------------- matchers


def _match_cbr(g: _Graph, conv_n) -> Optional[Site]:
    bn_n = g.only_user(conv_n)
    if bn_n is None or not g.is_bn_like(bn_n) or bn_n.args[0] is not conv_n:
        return None
    act_n = g.only_user(bn_n)
    act = g.act(act_n)
    if act is None or act_n.args[0] is not bn_n:
        return None
    conv, bn = g.module(conv_n), g.module(bn_n)
    nodes = {conv_n, bn_n, act_n}
    reason = _first(conv_reason(conv), bn_reason(bn, conv.out_channels),
                    None if act == "relu" else "activation %s (the fused ops apply ReLU)" % act,
                    _hook_reason(g, nodes))
    return Site("conv-bn-act", conv_n.args[0], act_n, nodes, [conv_n.target, bn_n.target],
                {"conv": conv_n.target, "bn": bn_n.target}, reason, label=conv_n.target)


def _match_separable(g: _Graph, site: Site) -> Optional[Site]:
    """A conv-bn-act site whose conv is a pointwise 1x1 fed by a depthwise conv [-> BN -> ReLU]."""
    pw_n = next(n for n in site.nodes if n.target == site.spec["conv"])
    pw = g.module(pw_n)
    if pw.kernel_size != (1, 1):
        return None
    prev = pw_n.args[0]
    mid_n = mid_act = None
    if g.act(prev) is not None and isinstance(prev.args[0], fx.Node) and g.is_bn_like(prev.args[0]):
        mid_act, mid_n = prev, prev.args[0]
        dw_n = mid_n.args[0]
    else:
        dw_n = prev
    if not g.is_conv(dw_n):
        return None
    dw = g.module(dw_n)
    if dw.groups == 1 or dw.groups != dw.in_channels:
        return None
    inner = [dw_n] + ([mid_n, mid_act] if mid_n is not None else [])
    if any(g.only_user(n) is None for n in inner):
        return None
    nodes = set(site.nodes) | set(inner)
    mid = g.module(mid_n) if mid_n is not None else None
    reason = _first(conv_reason(dw, (3,), depthwise=True), "depthwise conv has a bias" if dw.bias is not None else None,
                    bn_reason(mid, dw.out_channels) if mid is not None else None,
                    None if mid_act is None or g.act(mid_act) == "relu" else
                    "activation %s after the depthwise (the fused ops apply ReLU)" % g.act(mid_act),
                    conv_reason(pw, (1,)), "pointwise conv has a bias" if pw.bias is not None else None,
                    site.reason)
    spec = {"dw": dw_n.target, "mid": mid_n.target if mid_n is not None else None, "pw": pw_n.target,
            "bn": site.spec["bn"]}
    return Site("separable", dw_n.args[0], site.output, nodes, [n.target for n in inner if n.op == "call_module"]
                + site.modules, spec, reason, label=dw_n.target)


def _is_pool(g: _Graph, n) -> bool:
    """Global average pooling to 1x1 (keeping the dims)."""
    m = g.module(n)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return m.output_size in (1, (1, 1))
    if n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
        args = list(n.args[1:])
        dim = args[0] if args else n.kwargs.get("dim")
        keep = args[1] if len(args) > 1 else n.kwargs.get("keepdim", False)
        return keep is True and isinstance(dim, (tuple, list)) and sorted(d % 4 for d in dim) == [2, 3] and \
            all(isinstance(d, int) for d in dim)
    return False


def _match_pool_branch(g: _Graph, n, sites_by_output):
    """(site, reason) for an upsample(act(BN?(conv1x1(pool(X))))) branch ending at node n."""
    m = g.module(n)
    if n.op == "call_function" and n.target in INTERPOLATE_FUNCTIONS:
        try:
            b = _INTERP_SIG.bind(*n.args, **n.kwargs).arguments if n.target is F.interpolate else {
                "input": n.args[0], "mode": "bilinear" if n.target is F.upsample_bilinear else "nearest"}
        except TypeError:
            return None
        src, mode = b.get("input"), b.get("mode", "nearest")
        antialias = b.get("antialias", False)
    elif isinstance(m, nn.Upsample):
        src, mode, antialias = n.args[0], m.mode, False
    else:
        return None
    if not isinstance(src, fx.Node):
        return None
    inner = [src]
    if g.act(src) is not None:
        pre = src.args[0]
    else:
        return None
    act_n = src
    bn_n = None
    if g.is_bn_like(pre):
        bn_n, pre = pre, pre.args[0]
        inner.append(bn_n)
    if not g.is_conv(pre):
        return None
    conv_n = pre
    inner.append(conv_n)
    pool_n = conv_n.args[0]
    if not isinstance(pool_n, fx.Node) or not _is_pool(g, pool_n):
        return None
    inner.append(pool_n)
    if any(g.only_user(x) is None for x in inner):
        return None
    conv = g.module(conv_n)
    reason = _first(
        None if mode in ("nearest", "nearest-exact", "bilinear", "area") and not antialias else
        "image pooling upsampled with mode %r (not a constant broadcast)" % mode,
        conv_reason(conv, (1,)), bn_reason(g.module(bn_n), conv.out_channels) if bn_n is not None else None,
        None if g.act(act_n) == "relu" else "image pooling activation %s" % g.act(act_n),
        _hook_reason(g, inner + [n]))
    nodes = set(inner) | {n}
    return Site("pooling", pool_n.args[0], n, nodes, [x.target for x in inner if x.op == "call_module"],
                {"conv": conv_n.target, "bn": bn_n.target if bn_n is not None else None}, reason,
                label=conv_n.target)


def _cat_inputs(n):
    if n.op == "call_function" and n.target in (torch.cat, torch.concat):
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if isinstance(tensors, (list, tuple)) and dim in (1, -3):
            return list(tensors)
    return None


def _match_head(g: _Graph, cat_n, sites_by_output, used) -> Optional[Site]:
    parts = _cat_inputs(cat_n)
    if parts is None or len(parts) < 2 or any(not isinstance(p, fx.Node) for p in parts):
        return None
    branches, pool, pool_index, x = [], None, None, None
    for i, p in enumerate(parts):
        s = sites_by_output.get(p)
        if s is not None and s.kind in ("conv-bn-act", "separable") and id(s) not in used:
            branches.append(s)
        else:
            ps = _match_pool_branch(g, p, sites_by_output)
            if ps is None or pool is not None:
                return None
            pool, pool_index = ps, i
        src = (branches[-1] if pool_index != i else pool).input
        if x is None:
            x = src
        elif src is not x:
            return None
    if len(branches) < 1 or len(set(parts)) != len(parts):
        return None
    if any(g.only_user(b.output) is None for b in branches):
        return None
    proj = None
    user = g.only_user(cat_n)
    if user is not None and g.is_conv(user):
        for s in sites_by_output.values():
            if s.kind == "conv-bn-act" and s.spec["conv"] == user.target and s.input is cat_n:
                proj = s
    if proj is None:
        return None
    kinds = {b.kind for b in branches}
    reason = None
    for b in branches:
        b.in_head = True
        if b.reason:
            reason = reason or "branch %s: %s" % (b.label, b.reason)
        if b.kind == "conv-bn-act" and "separable" in kinds and g.mods[b.spec["conv"]].kernel_size != (1, 1):
            reason = reason or "mixes separable and plain 3x3 branches"
    if pool is not None and pool.reason:
        reason = reason or "image pooling %s: %s" % (pool.label, pool.reason)
    if proj.reason:
        reason = reason or "projection %s: %s" % (proj.label, proj.reason)
    nodes = set(proj.nodes) | {cat_n} | (pool.nodes if pool is not None else set())
    for b in branches:
        nodes |= b.nodes
    out, dropout = proj.output, None
    after = g.only_user(out)
    if isinstance(g.module(after), (nn.Dropout, nn.Dropout2d)) and after.args[0] is out:
        # run inside the fused op (the module itself), so that a Sequential projection is covered whole
        out, dropout = after, after.target
        nodes.add(after)
        reason = reason or _hook_reason(g, [after])
    spec = {"branches": [(b.kind, b.spec) for b in branches], "pool": pool.spec if pool is not None else None,
            "pool_index": pool_index, "project": proj.spec, "dropout": dropout}
    mods = [m for s in branches + ([pool] if pool else []) + [proj] for m in s.modules]
    head = Site("head", x, out, nodes, mods, spec, reason, label=proj.label,
                children=branches + ([pool] if pool else []) + [proj])
    return head


def _add_terms(g: _Graph, n, out):
    if n.op == "call_function" and n.target in (operator.add, torch.add) or (n.op == "call_method" and n.target == "add"):
        if len(n.args) != 2 or n.kwargs:
            return False
        for a in n.args:
            if isinstance(a, fx.Node):
                if g.is_conv(a):
                    out.append(a)
                elif g.only_user(a) is n and _add_terms(g, a, out):
                    out.append(("add", a))
                else:
                    return False
            elif a != 0:
                return False
        return True
    return False


def _match_v2(g: _Graph, add_n) -> Optional[Site]:
    terms = []
    if not _add_terms(g, add_n, terms):
        return None
    convs = [t for t in terms if isinstance(t, fx.Node)]
    adds = [t[1] for t in terms if isinstance(t, tuple)]
    if len(convs) < 2 or any(g.only_user(c) is None for c in convs):
        return None
    x = convs[0].args[0]
    if any(c.args[0] is not x for c in convs):
        return None
    mods = [g.module(c) for c in convs]
    reason = None
    for c, m in zip(convs, mods):
        r = conv_reason(m)
        if r:
            reason = reason or "%s: %s" % (c.target, r)
        if m.weight.shape[:2] != mods[0].weight.shape[:2]:
            reason = reason or "%s: output channels differ" % c.target
    nodes = set(convs) | set(adds) | {add_n}
    reason = reason or _hook_reason(g, nodes)
    return Site("v2-sum", x, add_n, nodes, [c.target for c in convs], {"convs": [c.target for c in convs]}, reason,
                label=convs[0].target)


def find_sites(graph: fx.Graph, root: nn.Module) -> List[Site]:
    """Every site of ``graph`` (traced from ``root``): heads and sums first, then the
    remaining conv-bn-act / separable sites. Node sets are disjoint."""
    g = _Graph(graph, root)
    basic = []
    for n in graph.nodes:
        if g.is_conv(n):
            s = _match_cbr(g, n)
            if s is not None:
                basic.append(_match_separable(g, s) or s)
    # a separable site swallows the depthwise's own conv-bn-act match
    taken = set()
    for s in basic:
        if s.kind == "separable":
            taken |= s.nodes - {s.output}
    basic = [s for s in basic if s.kind == "separable" or not (s.nodes & taken)]
    by_output = {s.output: s for s in basic}
    sites, used = [], set()
    for n in graph.nodes:
        h = _match_head(g, n, by_output, used)
        if h is not None:
            sites.append(h)
            used |= {id(c) for c in h.children}
    for n in reversed(list(graph.nodes)):  # outermost add of a chain first; its inner adds are inside it
        v = _match_v2(g, n)
        if v is not None and not any(v.nodes & s.nodes for s in sites):
            sites.append(v)
    sites += [s for s in basic if id(s) not in used]
    return sites


def is_whole_forward(graph: fx.Graph, site: Site) -> bool:
    """The site is all the forward computes (placeholder -> site -> output)."""
    outs = [n for n in graph.nodes if n.op == "output"]
    if site.input.op != "placeholder" or len(outs) != 1 or outs[0].args[0] is not site.output:
        return False
    for n in graph.nodes:
        if n.op in ("placeholder", "output") or n in site.nodes:
            continue
        if is_shape_query(n):
            continue
        return False
    return True


def graphs_equal(a: fx.Graph, b: fx.Graph) -> bool:
    """Same computation: same ops on the same modules / functions with the same arguments."""
    na, nb = list(a.nodes), list(b.nodes)
    if len(na) != len(nb):
        return False
    index = {}

    def same(x, y):
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            return isinstance(x, fx.Node) and isinstance(y, fx.Node) and index.get(x) is y
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and x == y

    for x, y in zip(na, nb):
        if x.op != y.op or (x.op != "placeholder" and x.target != y.target):
            return False
        if x.op != "placeholder" and not (same(x.args, y.args) and same(x.kwargs, y.kwargs)):
            return False
        index[x] = y
    return True
