"""Model surgery by structure and dataflow: fuse the ASPP heads (and conv-BN-ReLU blocks) of
any model, in place, and back.

Nothing is recognised by package or class name. Each module, top-down:

1. If its children have the layout of one of the fused modules (``FusedX.check_source``) *and*
   its forward computes exactly what that module's reference twin computes over those children
   (the two torch.fx graphs are equal), the instance is replaced by ``FusedX.from_module`` (same
   children, same keys; its hooks move along). This is how torchvision's, smp's and this
   package's heads convert, through the same check as anyone's.
2. Otherwise its forward is traced (aspp_fused.recognize) and the sites it owns (heads, v2 sums,
   conv-BN-ReLU / separable blocks that are its whole forward) are fused by an instance-level
   ``forward`` (aspp_fused.nn.fused_forward); the children those sites cover run inside the fused
   op, the others as before, and are visited in turn.

Every conv-BN-act-like site found is reported (:func:`explain`) with what it became or why not.
"""
import logging
import warnings
from typing import List, NamedTuple, Optional, Tuple

from torch import nn

from aspp_fused import recognize
from aspp_fused.functional import check_backend
from aspp_fused.nn import fused_heads
from aspp_fused.nn.fused import FusedAtrousConvBNReLU, FusedModule, FusedSeparableAtrousConv
from aspp_fused.nn.fused_forward import FusedForward, analyse
from aspp_fused.nn.fused_sequential import FusedSequential

__all__ = ["convert", "revert", "list_fused", "explain", "SiteReport", "Report"]

_log = logging.getLogger("aspp_fused")

# Fused modules that replace a whole module when layout and dataflow both match; the twin
# whose forward is compared. Heads before their parts.
_REPLACEMENTS = [
    fused_heads.FusedDeepLabHead, fused_heads.FusedASPP, fused_heads.FusedSeparableASPP, fused_heads.FusedASPPv2,
    fused_heads.FusedLRASPPHead, FusedSequential, FusedAtrousConvBNReLU, FusedSeparableAtrousConv,
]


class SiteReport(NamedTuple):
    """One conv-BN-act-like site: ``path`` (module path of its first conv, or of the replaced
    module), ``kind``, ``fused`` and ``result`` (what it became, or the reason it was left)."""
    path: str
    kind: str
    fused: bool
    result: str

    def __str__(self):
        return "%-40s %-12s %s %s" % (self.path, self.kind, "->" if self.fused else "--", self.result)


class Report(list):
    """The list of SiteReport of a model; ``str()`` is a readable table."""

    @property
    def fused(self):
        return [r for r in self if r.fused]

    def __str__(self):
        lines = ["%d site(s), %d fused" % (len(self), len(self.fused))]
        return "\n".join(lines + [str(r) for r in self])


def _join(prefix, name):
    return prefix + "." + name if prefix and name else (prefix or name)


def _has_conv(m):
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


def _replacement(m) -> Optional[type]:
    if any(recognize.has_hooks(c) for c in m.modules() if c is not m):
        return None  # a hook inside would not fire in the fused module; the generic path reports it
    for cls in _REPLACEMENTS:
        try:
            cls.check_source(m)
        except (ValueError, TypeError, AttributeError):
            continue
        if cls is FusedSequential:
            return cls  # check_source: a plain nn.Sequential, whose forward is known
        if cls is FusedAtrousConvBNReLU and m[0].kernel_size == (3, 3) and m[0].dilation[0] < 2:
            continue  # a plain 3x3 gains nothing from the fused op (reported by the generic path)
        try:
            if recognize.graphs_equal(recognize.trace(m), recognize.trace(m, cls=cls.twin)):
                return cls
        except Exception:
            continue
    return None


def _share_hooks(src, dst):
    for attr in recognize.HOOK_DICTS:
        if attr in src.__dict__:
            dst.__dict__[attr] = src.__dict__[attr]


def _fused_entries(m: FusedModule, path, report):
    for name, sub in m.named_modules():
        if isinstance(sub, FusedModule):
            report.append(SiteReport(_join(path, name) or "<root>", "module", True,
                                     "%s (was %s)" % (type(sub).__name__, type(sub.__dict__["_source"]).__name__)))


def _visit(m: nn.Module, path: str, backend: str, report: List[SiteReport], apply: bool,
           skip=frozenset()) -> nn.Module:
    """Converts (apply) or only reports m and its subtree; returns m or its replacement."""
    if isinstance(m, FusedModule):
        _fused_entries(m, path, report)
        if isinstance(m, FusedSequential):
            _visit_children(m, path, backend, report, apply, skip)
        return m
    fwd = m.__dict__.get("forward")
    if isinstance(fwd, FusedForward):
        report.extend(SiteReport(_join(path, p), k, f, r) for p, k, f, r in fwd.report)
        _visit_children(m, path, backend, report, apply, fwd.consumed)
        return m
    if recognize.is_primitive(m) or not _has_conv(m):
        return m
    cls = _replacement(m)
    if cls is not None:
        if not apply:
            report.append(SiteReport(path or "<root>", "module", True, "%s (was %s)" % (cls.__name__,
                                                                                          type(m).__name__)))
            if cls in (FusedSequential, fused_heads.FusedDeepLabHead):
                _visit_children(m, path, backend, report, apply, skip)
            return m
        new = cls.from_module(m, backend=backend)
        _share_hooks(m, new)
        _fused_entries(new, path, report)
        if cls is FusedSequential:
            _visit_children(new, path, backend, report, apply, skip)
        return new
    try:
        graph, sites, consumed, owned = analyse(m)
    except Exception as exc:
        direct = list(m.children())
        if any(isinstance(c, nn.Conv2d) for c in direct) and any(
                isinstance(c, nn.modules.batchnorm._BatchNorm) for c in direct):
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            report.append(SiteReport(path or "<root>", "module", False, "forward not traceable: %s" % msg[:160]))
        _visit_children(m, path, backend, report, apply, skip)
        return m
    entries = []
    for s, why in owned:
        what = ("fused %s in %s.forward%s" % (s.kind, type(m).__name__, _parts(s, path))) if why is None else why
        entries.append((s.label, s.kind, why is None, what))
        if s.kind in ("head", "v2-sum") and why is not None:
            warnings.warn("aspp_fused.convert: left %s (%s) unconverted: %s"
                          % (path or "<root>", type(m).__name__, why), stacklevel=4)
    report.extend(SiteReport(_join(path, p), k, f, r) for p, k, f, r in entries)
    if apply and graph is not None:
        m.__dict__["forward"] = FusedForward(m, backend, entries, consumed)
    _visit_children(m, path, backend, report, apply, frozenset(consumed))
    return m


def _parts(site, path):
    """The modules a fused head / sum runs, for the report."""
    if site.kind == "conv-bn-act":
        return ""
    return " (%s)" % ", ".join(_join(path, p) for p in site.modules)


def _visit_children(m, path, backend, report, apply, consumed):
    for name, child in list(m.named_children()):
        if child is None or name in consumed:
            continue
        sub = frozenset(p[len(name) + 1:] for p in consumed if p.startswith(name + "."))
        if sub and not isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            continue  # partly run inside a fused site of m: leave it
        new = _visit(child, _join(path, name), backend, report, apply, sub)
        if new is not child:
            m._modules[name] = new  # direct: keeps the child's position and key


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Fuses every ASPP head and conv-BN-ReLU block of ``model`` that the fused ops compute
    exactly, in place (see the module docstring for how they are recognised).

    Parameters and buffers are shared, not copied: state_dict keys and optimizers are
    unaffected; the model keeps its class. Returns ``model`` (or, when ``model`` itself is a
    recognised head, its fused replacement). What happened to every site: :func:`explain`.
    A model with dilated convolutions of which nothing could be fused warns.
    """
    check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError("convert: model must be an nn.Module, got %s" % type(model).__name__)
    report = Report()
    root = _visit(model, "", backend, report, True)
    for r in report:
        _log.info("aspp_fused.convert: %s", r)
    if not report.fused and any(isinstance(m, nn.Conv2d) and max(m.dilation) > 1 for m in model.modules()):
        left = "; ".join("%s: %s" % (r.path, r.result) for r in report[:6]) or "no conv-BN-ReLU site found"
        warnings.warn("aspp_fused.convert: NOTHING was fused in this %s, which has dilated convolutions (a DeepLab?). "
                      "The model runs unchanged. %s. See aspp_fused.explain(model)." % (type(model).__name__, left),
                      stacklevel=2)
    return root


def explain(model: nn.Module) -> Report:
    """Every conv-BN-act-like site of ``model``: fused (-> what it became) or not (-- why).

    On an unconverted model it says what :func:`convert` would do; on a converted one, what it did."""
    if not isinstance(model, nn.Module):
        raise TypeError("explain: model must be an nn.Module, got %s" % type(model).__name__)
    report = Report()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _visit(model, "", "auto", report, False)
    return report


def revert(model: nn.Module) -> nn.Module:
    """Undoes :func:`convert`: the original modules and forwards are back (same parameters)."""
    if not isinstance(model, nn.Module):
        raise TypeError("revert: model must be an nn.Module, got %s" % type(model).__name__)
    for name, child in list(model.named_children()):
        model._modules[name] = revert(child)
    if isinstance(model.__dict__.get("forward"), FusedForward):
        del model.__dict__["forward"]
    if isinstance(model, FusedModule):
        return model.to_reference()
    return model


def list_fused(model: nn.Module) -> List[Tuple[str, str, str]]:
    """(qualified name, original class, fused class) of every fused module in ``model``;
    modules with a fused forward are listed as (name, their class, "FusedForward")."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FusedModule):
            out.append((name or "<root>", type(m.__dict__["_source"]).__name__, type(m).__name__))
        elif isinstance(m.__dict__.get("forward"), FusedForward):
            out.append((name or "<root>", type(m).__name__, "FusedForward"))
    return out
