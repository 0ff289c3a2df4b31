"""An instance-level fused ``forward``: the module's own forward, traced with torch.fx, with its
fusable sites (aspp_fused.recognize) replaced by calls to the fused ops.

Installed as ``module.__dict__["forward"]`` by convert(): the module keeps its class, methods,
children, parameters and hooks (``Module.__call__`` runs hooks around ``self.forward``); revert()
deletes the attribute. The plan (the rewritten graph) is rebuilt on demand per set of
train/eval flags (fx bakes Python-level branches such as ``if self.training`` into a trace)
and is not pickled: a copy re-traces its own children on first call.
"""
import inspect
from typing import List

import torch
import torch.fx as fx
from torch import nn

from aspp_fused import recognize
from aspp_fused.nn._conv_bn import (aspp_bn_act, conv_bn_act, conv_sum, like_input_format, proj_columns,
                                    separable_bn_act)
from aspp_fused.nn._fold_cache import fold_cache
from aspp_fused.nn.fused_heads import pool_vector

__all__ = ["FusedForward", "standalone_reason"]


def standalone_reason(site, whole_forward, sequential, mods):
    """Policy: heads and sums always fuse; a lone conv-bn-act / separable site when it is the
    module's whole forward, a run of a Sequential, or a branch of a head that could not be
    fused. A lone conv-bn-act needs a 1x1 (whole forward only) or a dilated 3x3 conv: a plain
    3x3 gains nothing from the fused op."""
    if site.kind in ("head", "v2-sum") or site.in_head:
        return None
    if not (whole_forward or sequential):
        return "inside a larger forward that is not an ASPP head (left as it is)"
    if site.kind == "conv-bn-act":
        conv = mods[site.spec["conv"]]
        if conv.kernel_size == (3, 3) and conv.dilation[0] < 2:
            return "not dilated (a plain 3x3 conv gains nothing from the fused op)"
        if conv.kernel_size == (1, 1) and not whole_forward:
            return "1x1 inside a larger forward (a plain 1x1 conv gains nothing from the fused op)"
    return None


class _SiteCall:
    """One fused site of an owner module, called from the rewritten graph with the site's input."""

    def __init__(self, owner, site: recognize.Site, key, backend):
        self.owner, self.kind, self.spec, self.key, self.backend = owner, site.kind, site.spec, key, backend
        self.__name__ = "fused_" + site.kind.replace("-", "_")

    def m(self, path):
        return self.owner.get_submodule(path) if path else None

    def _branch(self, kind, spec):
        if kind == "separable":
            return (self.m(spec["dw"]), self.m(spec["mid"]), self.m(spec["pw"])), self.m(spec["bn"])
        return (None, None, self.m(spec["conv"])), self.m(spec["bn"])

    def __call__(self, x):
        cache = fold_cache(self.owner)
        if self.kind == "conv-bn-act":
            conv, bn = self.m(self.spec["conv"]), self.m(self.spec["bn"])
            return like_input_format(conv_bn_act(x, [conv], [bn], self.backend, cache=cache, cache_key=self.key), x)
        if self.kind == "separable":
            branch, bn = self._branch("separable", self.spec)
            return like_input_format(separable_bn_act(x, [branch], [bn], self.backend), x)
        if self.kind == "v2-sum":
            return like_input_format(conv_sum(x, [self.m(p) for p in self.spec["convs"]], self.backend), x)
        return self._head(x, cache)

    def _head(self, x, cache):
        out = self._head_conv(x, cache)
        dropout = self.m(self.spec["dropout"])
        if dropout is not None:
            # The original draws its mask over the projection's NCHW output: same order, same mask.
            out = like_input_format(dropout(out.contiguous()), x)
        return out

    def _head_conv(self, x, cache):
        branches = [self._branch(k, s) for k, s in self.spec["branches"]]
        separable = any(kind == "separable" for kind, _ in self.spec["branches"])
        proj, proj_bn = self.m(self.spec["project"]["conv"]), self.m(self.spec["project"]["bn"])
        pool = self.spec["pool"]
        p = None if pool is None else pool_vector(self.m(pool["conv"]), self.m(pool["bn"]), x)
        widths = [b[2].out_channels for b, _ in branches]
        start_index = self.spec["pool_index"] if p is not None else len(widths)
        start = sum(widths[:start_index])
        po = 0 if p is None else self.m(pool["conv"]).out_channels
        w = proj.weight
        if p is None or proj.kernel_size == (1, 1):
            # proj(cat(h, broadcast(p))) = W_main h + W_pool p: the pooled branch is a per-sample bias
            bias = None if p is None else p @ w[:, start:start + po, 0, 0].to(p.dtype).t()
            # branch i's columns of the projection weight: after the pooled branch's from pool_index on
            cols = [sum(widths[:i]) + (po if i >= start_index else 0) for i in range(len(widths))]
            if not separable and proj.kernel_size == (1, 1):
                out = aspp_bn_act(x, [b[2] for b, _ in branches], [bn for _, bn in branches], proj, proj_bn, cols,
                                  bias, self.backend, cache=cache, cache_key=(self.key,))
            else:
                h = self._branches_out(x, branches, separable, cache)
                out = conv_bn_act(h, [proj], [proj_bn], self.backend, sample_bias=bias, cache=cache,
                                  cache_key=(self.key, "project"),
                                  **proj_columns(w, [(0, start), (start + po, proj.in_channels)]))
            return like_input_format(out, x)
        # a 3x3 projection sees the zero padding around the constant map: materialise it
        h = self._branches_out(x, branches, separable, cache)
        n, _, hh, ww = h.shape
        pm = p.to(h.dtype)[:, :, None, None].expand(n, po, hh, ww)
        parts = [h[:, :start], pm, h[:, start:]]
        out = conv_bn_act(torch.cat(parts, 1), [proj], [proj_bn], self.backend, cache=cache,
                          cache_key=(self.key, "project"))
        return like_input_format(out, x)

    def _branches_out(self, x, branches, separable, cache):
        """The branches' concatenated output."""
        if separable:
            return separable_bn_act(x, [b for b, _ in branches], [bn for _, bn in branches], self.backend)
        return conv_bn_act(x, [b[2] for b, _ in branches], [bn for _, bn in branches], self.backend, cache=cache,
                           cache_key=(self.key, "branches"))


def _training_key(owner):
    return tuple(m.training for m in owner.modules())


class FusedForward:
    """The fused forward of ``owner`` (see the module docstring). ``sites``: the report."""

    def __init__(self, owner: nn.Module, backend: str, report: List[tuple], consumed=frozenset()):
        self.owner, self.backend, self.report, self.consumed = owner, backend, report, frozenset(consumed)
        self._plans = {}

    def __getstate__(self):
        return {"owner": self.owner, "backend": self.backend, "report": self.report, "consumed": self.consumed}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._plans = {}

    def _plan(self):
        key = _training_key(self.owner)
        if key not in self._plans:
            self._plans[key] = build_plan(self.owner, self.backend)
        return self._plans[key]

    def __call__(self, *args, **kwargs):
        owner = self.owner
        plan = self._plan()
        fwd = type(owner).forward
        if plan is None:
            return fwd(owner, *args, **kwargs)
        graph, defaults, signature, placeholders = plan
        bound = signature.bind(owner, *args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        for name, d in defaults.items():
            if values.get(name) is not d:  # the trace holds the default: another value, the original forward
                return fwd(owner, *args, **kwargs)
        return fx.Interpreter(owner, graph=graph).run(*[values[name] for name in placeholders])


class _FakeShape:
    """Stands in for a tensor that the fused op no longer materialises, for shape queries only."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self):
        return len(self.shape)


def _shape_of(x, channels):
    return _FakeShape((x.shape[0], channels) + tuple(x.shape[2:]))


def _channels(n, mods):
    """Channels of an intermediate site value (a conv / BN output, or an activation of one)."""
    while n.op != "call_module" or not hasattr(mods[n.target], "num_features") and \
            not isinstance(mods[n.target], nn.Conv2d):
        n = n.args[0]
    m = mods[n.target]
    return m.num_features if hasattr(m, "num_features") else m.out_channels


def build_plan(owner: nn.Module, backend: str):
    """(rewritten graph, traced defaults, forward's signature, the graph's input names), or None
    when nothing of owner's own forward fuses."""
    plan = analyse(owner)
    if plan is None:
        return None
    graph, sites = plan[0], plan[1]
    fused = [s for s in sites if s.fused]
    if not fused:
        return None
    mods = dict(owner.named_modules())
    for i, s in enumerate(fused):
        with graph.inserting_before(s.output):
            call = graph.call_function(_SiteCall(owner, s, i, backend), (s.input,))
        s.output.replace_all_uses_with(call)
        for n in list(s.nodes):
            if n is s.output:
                continue
            for u in [u for u in n.users if u not in s.nodes and recognize.is_shape_query(u)]:
                # x4.size() of a branch x4 run inside the fused op: the same shape, from the input
                with graph.inserting_before(u):
                    shape = graph.call_function(_shape_of, (s.input, _channels(n, mods)))
                u.replace_input_with(n, shape)
        for n in reversed(list(graph.nodes)):
            if n in s.nodes and not n.users:
                graph.erase_node(n)
    graph.lint()
    defaults = recognize.forward_defaults(owner)
    # placeholders of traced-as-constant defaults stay in the graph with their default value;
    # the signature and the names the graph takes are read once here, not on every call
    placeholders = [n.target for n in graph.nodes if n.op == "placeholder" and n.target not in defaults]
    return graph, defaults, inspect.signature(type(owner).forward), placeholders


def analyse(owner: nn.Module):
    """(graph with the consumed children inlined or None, its sites with .fused set, consumed
    paths, report) where report lists the sites this module's own forward owns as
    (site, reason or None); or raises the trace's error.

    Two traces: every non-torch.nn module inlined (what the forward computes), then with only
    the children that fused sites cover completely inlined, so the rest still run as modules
    (their hooks, their own conversion)."""
    flat = recognize.trace(owner)
    sites = recognize.find_sites(flat, owner)
    mods = dict(owner.named_modules())
    sequential = type(owner).forward is nn.Sequential.forward
    owned = [s for s in sites if _owned(s)]
    for s in owned:
        whole = recognize.is_whole_forward(flat, s)
        s.why = s.reason or standalone_reason(s, whole, sequential, mods)
        s.fused = s.why is None
    # a fused site must cover every node of each non-torch.nn module it reaches into
    while True:
        covered = set().union(*[s.nodes for s in owned if s.fused]) if any(s.fused for s in owned) else set()
        changed = False
        for s in owned:
            if not s.fused:
                continue
            for path in _touched(s):
                inside = [n for n in flat.nodes if path in n.meta.get("nn_module_stack", {})
                          and not recognize.is_shape_query(n)]
                if any(n not in covered for n in inside):
                    s.fused, s.why, changed = False, "covers only part of %s's forward" % path, True
                    break
        if not changed:
            break
    consumed = set()
    for s in owned:
        if s.fused:
            consumed |= _touched(s)
    report = [(s, s.why) for s in owned]
    if not any(s.fused for s in owned):
        return None, [], consumed, report
    opaque = frozenset(p for p, m in mods.items() if p and p not in consumed and not recognize.is_primitive(m))
    graph = recognize.trace(owner, opaque=opaque)
    fused_labels = {(s.kind, s.label) for s in owned if s.fused}
    final = recognize.find_sites(graph, owner)
    for s in final:
        s.fused = (s.kind, s.label) in fused_labels and s.reason is None
    return graph, final, consumed, report


def _owned(site):
    """Not entirely inside one submodule (that submodule's own analysis owns it)."""
    stacks = [list(n.meta.get("nn_module_stack", {})) for n in site.nodes]
    common = None
    for st in stacks:
        first = st[0] if st else None
        if common is None:
            common = first
        if first is None or first != common:
            return True
    return False


def _touched(site):
    """Non-leaf module paths whose forward the site's nodes run inside."""
    out = set()
    for n in site.nodes:
        for path in n.meta.get("nn_module_stack", {}):
            if path != n.target:
                out.add(path)
    return out
