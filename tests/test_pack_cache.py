"""The compiled CPU / CUDA kernels pack each weight set once per parameter version (csrc/pack_cache.h):
counted packings across calls, optimizer steps, load_state_dict, dtype changes, torch.compile and
threads; per-call views of a parameter still hit; ASPP_FUSED_FOLD_CACHE=0 packs on every call.
(The Triton backend's PackCache: tests/test_triton_weights.py.)"""
import copy

import pytest
import torch

import aspp_fused
import aspp_fused.nn as ann
from aspp_fused import _extension
from aspp_fused import functional as AF
from conftest import assert_close_rel, check_compiled_intermediate_weights, randomize_bn, run_in_threads

pytestmark = pytest.mark.skipif(not _extension.cpp_available(), reason="the compiled extension is not built")


def info():
    hits, packs, entries = torch.ops.aspp_fused.pack_cache_info()
    return dict(hits=hits, packs=packs, entries=entries)


@pytest.fixture(autouse=True)
def fresh_cache():
    torch.ops.aspp_fused.pack_cache_clear()
    yield
    torch.ops.aspp_fused.pack_cache_clear()


def _head(name="aspp"):
    torch.manual_seed(0)
    twin = {"aspp": lambda: ann.ASPP(8, [2, 5], 6), "sep": lambda: ann.SeparableASPP(8, 6, [2, 5]),
            "v2": lambda: ann.ASPPv2(8, 3, [2, 5])}[name]()
    randomize_bn(twin)
    return twin, getattr(ann, {"aspp": "FusedASPP", "sep": "FusedSeparableASPP", "v2": "FusedASPPv2"}[name]) \
        .from_module(copy.deepcopy(twin), backend="cpp")


def _twin_without_dropout(backend="cpp"):
    """A float64 ASPP twin without dropout (the same numbers on both sides in training) and its
    conversion."""
    torch.manual_seed(0)
    twin = randomize_bn(ann.ASPP(8, [2, 3], out_channels=6)).double()
    for mod in twin.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return twin, aspp_fused.convert(copy.deepcopy(twin), backend=backend)


def _step(outs, opts):
    for out, opt in zip(outs, opts):
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["aspp", "sep", "v2"])
def test_eval_packs_once_across_calls(name):
    _, m = _head(name)
    m.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        first = m(x)
        packs = info()["packs"]
        assert packs >= 1
        for _ in range(3):
            assert_close_rel(m(x), first, 0.0, "cached call")
    assert info()["packs"] == packs, info()
    assert info()["hits"] >= 3 * packs


def test_train_repacks_once_per_optimizer_step():
    _, m = _head()
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(2, 8, 9, 9)
    counts, entries = [], []
    for _ in range(3):
        before = info()["packs"]
        m(x).square().mean().backward()
        counts.append(info()["packs"] - before)
        entries.append(info()["entries"])
        opt.step()
        opt.zero_grad()
        assert info()["entries"] == 0, "an optimizer step drops every entry (fused optimizers bump no counter)"
    # forward + recompute + dgrad of the branch op and of the projection: the same count each step
    assert counts[1] == counts[2] >= 1, counts
    assert entries[1] == entries[2] >= 1, entries


def test_load_state_dict_and_dtype_change_invalidate():
    twin, m = _head()
    m.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        m(x)
        packs = info()["packs"]
        m(x)
        assert info()["packs"] == packs
        other = copy.deepcopy(twin)
        for p in other.parameters():
            p.data.add_(0.5)
        m.load_state_dict(other.state_dict())
        y = m(x)
        assert info()["packs"] > packs, "load_state_dict did not invalidate"
        assert_close_rel(y, other.eval()(x), 1e-5, "after load_state_dict")
        packs = info()["packs"]
        m.double()
        y = m(x.double())
        assert info()["packs"] > packs, "dtype change did not invalidate"
        assert_close_rel(y, other.double()(x.double()), 1e-10, "after .double()")


def test_data_write_needs_clear_caches():
    """An in-place write through .data moves no version counter (PyTorch's rule): the cached pack
    stays until aspp_fused.clear_caches."""
    twin, m = _head("v2")
    m.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        m(x)
        for p in m.parameters():
            p.data.mul_(2.0)
        for p in twin.parameters():
            p.data.mul_(2.0)
        aspp_fused.clear_caches(m)
        assert info() == dict(hits=0, packs=0, entries=0)
        assert_close_rel(m(x), twin.eval()(x), 1e-5, "after clear_caches")


def test_views_made_per_call_hit():
    """A slice of one weight tensor, taken afresh on every call, is the same source."""
    base = torch.nn.Parameter(torch.randn(12, 4, 3, 3))
    x = torch.randn(1, 4, 6, 6)
    s, t = torch.ones(8), torch.zeros(8)
    for _ in range(3):
        AF.atrous_conv(x, [base[:4], base[4:8]], [1, 2], s, t, backend="cpp")
    assert info()["packs"] == 1 and info()["hits"] == 2, info()
    with torch.no_grad():
        base.add_(1.0)  # the views share the base's version counter
    AF.atrous_conv(x, [base[:4], base[4:8]], [1, 2], s, t, backend="cpp")
    assert info()["packs"] == 2 and info()["entries"] == 1, info()
    AF.atrous_conv(x, [base[4:8], base[:4]], [1, 2], s, t, backend="cpp")  # other views: another entry
    assert info()["packs"] == 3, info()


def test_only_parameters_requiring_grad_are_kept():
    """What the C++ cache cannot follow packs per call (pack_cache.h, cacheable): a plain tensor
    (in a compiled graph: an intermediate whose buffer inductor reuses), a `.data` alias, a frozen
    parameter; a parameter and its views are kept."""
    x = torch.randn(1, 4, 6, 6)
    s, t = torch.ones(4), torch.zeros(4)
    p = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
    frozen = torch.nn.Parameter(torch.randn(4, 4, 3, 3), requires_grad=False)
    plain = torch.randn(4, 4, 3, 3)
    for w, kept in ((p, True), (p.data, False), (frozen, False), (plain, False)):
        torch.ops.aspp_fused.pack_cache_clear()
        for _ in range(3):
            AF.atrous_conv(x, [w], [2], s, t, backend="cpp")
        assert info()["packs"] == (1 if kept else 3), (w.requires_grad, info())


def test_reused_buffers_of_a_compiled_graph_are_not_served():
    """Two ops in one compiled graph whose weights are intermediates (here w * 2): inductor
    reuses the first one's buffer for the second one's weight, the same storage with no counter
    bump, and the cache served the first packing to the second op (391 off)."""
    check_compiled_intermediate_weights("cpp", "cpu", 1e-6)


@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float64), ("torch", torch.float64), ("torch", torch.float32)],
                         ids=["cpp", "torch-foldcache", "torch-onednn"])
@pytest.mark.parametrize("compile_step", [False, True], ids=["eager-step", "compiled-step"])
def test_fused_optimizer_steps_are_followed(backend, dtype, compile_step):
    """torch.optim's fused optimizers write the parameters without bumping their version
    counters: every optimizer step ends every cache entry (aspp_fused/nn/_fold_cache.py: the C++
    cache, PackCache of the oneDNN path, FoldCache's step count), also when the step itself is
    compiled (a traced drop was deleted: stale from the second step). The BN is frozen, as in
    fine-tuning, so that no BN change invalidates the caches on its own. Training and the eval
    after each epoch match the twin (before: cpp 2.5 off in training, 0.6 in eval; torch 0.35 and
    1.4)."""
    torch._dynamo.reset()
    twin, fused = _twin_without_dropout(backend)
    twin, fused = twin.to(dtype), fused.to(dtype)
    for m in (twin, fused):
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.requires_grad_(False)
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05, fused=True)
            for m in (twin, fused)]
    steps = [opt.step for opt in opts]
    if compile_step:
        steps = [torch.compile(st) for st in steps]
    x = torch.randn(2, 8, 5, 6, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for epoch in range(3):
        for m in (twin, fused):
            m.eval()
        with torch.no_grad():
            assert_close_rel(fused(x), twin(x), tol, "eval after epoch %d" % epoch)
        for m in (twin, fused):
            m.train()
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.eval()  # frozen BN: running statistics unchanged
        outs = [m(x) for m in (twin, fused)]
        assert_close_rel(outs[1], outs[0], tol, "train step %d" % epoch)
        for out, opt, st in zip(outs, opts, steps):
            out.square().sum().backward()
            st()
            opt.zero_grad()


def test_a_packing_begun_before_a_drop_is_not_kept():
    """A packing computed while another thread steps the optimizer is not stored (the sources'
    state is read before packing, and a drop during it keeps the result out): simulated here by
    a drop inside the packing itself."""
    from aspp_fused.kernels.pack_cache import PACKED

    w = torch.nn.Parameter(torch.randn(4))

    def pack():
        PACKED.clear()  # what the optimizer step hook does, in the middle of this packing
        return object()

    a = PACKED.get(("test-drop-during-pack",), [w], pack)
    b = PACKED.get(("test-drop-during-pack",), [w], object)
    assert a is not b and PACKED.get(("test-drop-during-pack",), [w], object) is b


def test_compiled_eval_with_frozen_weights_and_an_input_needing_grad():
    """column_conv has no autograd formula: a compiled graph uses it only when no tensor of the
    call needs a gradient, the input included (a saliency map through a frozen head)."""
    torch._dynamo.reset()
    twin, m = _head()
    twin.eval(), m.eval()
    for mod in (twin, m):
        mod.requires_grad_(False)
    compiled = torch.compile(m, fullgraph=True)
    grads = []
    for f in (twin, compiled):
        x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        f(x).square().sum().backward()
        grads.append(x.grad)
    assert_close_rel(grads[1], grads[0], 1e-5, "input grad")


def test_dead_sources_leave_no_entries():
    """An entry whose weights are gone is dropped (it holds no reference to them: a packing is a
    copy even where no cast is needed, e.g. the CPU separable kernel's fp32 pointwise weights)."""
    x = torch.randn(1, 4, 6, 6)
    s, t = torch.ones(4), torch.zeros(4)
    for _ in range(40):
        AF.atrous_conv(x, [torch.randn(4, 4, 3, 3)], [1], s, t, backend="cpp")
    assert info()["packs"] == 40 and info()["entries"] <= 2, info()
    for _ in range(40):
        AF.separable_conv(x, [torch.randn(4, 1, 3, 3)], [2], [None], [None], "relu", [torch.randn(4, 4, 1, 1)], s,
                          t, backend="cpp")
    assert info()["packs"] == 80 and info()["entries"] <= 2, info()


def test_fold_cache_off_packs_every_call(monkeypatch):
    monkeypatch.setenv("ASPP_FUSED_FOLD_CACHE", "0")
    w = torch.randn(4, 4, 3, 3)
    x = torch.randn(1, 4, 6, 6)
    for _ in range(3):
        AF.atrous_conv(x, [w], [1], torch.ones(4), torch.zeros(4), backend="cpp")
    assert info() == dict(hits=0, packs=3, entries=0)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_model_reuses_packings(compiler):
    """A compiled graph's calls hit the cache: the projection, a slice of its parameter, through
    aspp_fused::column_conv (which slices inside the op, where the view shares the parameter's
    version counter)."""
    torch._dynamo.reset()
    _, m = _head()
    m.eval()
    compiled = torch.compile(m, fullgraph=True, backend=compiler)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        y = compiled(x)
        compiled(x)  # the first run of a new graph gets aliases of the parameters: packed, not kept
        for _ in range(3):
            before = info()
            assert_close_rel(compiled(x), y, 0.0, "compiled, cached")
            # the branches' launch and the projection's, both served from the cache
            assert info()["hits"] - before["hits"] == 2 and info()["packs"] == before["packs"], (before, info())


@pytest.mark.parametrize("name", ["aspp", "sep", "v2"])
def test_compiled_eval_follows_in_place_updates(name):
    """Inductor hands the ops a slice of a parameter as an alias with a version counter of its own
    (reinterpret_tensor): keyed by its storage, a packing outlived the parameter's update and the
    compiled model went on with the old weights. Every parameter is updated in place here."""
    torch._dynamo.reset()
    twin, m = _head(name)
    twin.eval(), m.eval()
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        for step in range(3):
            assert_close_rel(compiled(x), twin(x), 1e-5, "compiled, step %d" % step)
            for a, b in zip(twin.parameters(), m.parameters()):
                a.mul_(0.75).add_(0.01)
                b.mul_(0.75).add_(0.01)


def test_compiled_training_follows_optimizer_steps():
    """The same in training: a compiled train step with SGD matched the twin at step 0 and was
    off by 30 at step 1 while the projection's stale packing was served."""
    torch._dynamo.reset()
    twin, fused = _twin_without_dropout()
    compiled = torch.compile(fused, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (twin, fused)]
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    for step in range(3):
        outs = [twin(x), compiled(x)]
        assert_close_rel(outs[1], outs[0], 1e-10, "compiled train step %d" % step)
        _step(outs, opts)


def test_threads_share_one_pack():
    """8 threads run one model at once after a warm-up call: no new packing, the same outputs."""
    _, m = _head()
    m.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = m(x)
    packs = info()["packs"]

    def run(_):
        with torch.no_grad():
            for _ in range(5):
                assert_close_rel(m(x), ref, 0.0, "thread")

    run_in_threads(run, 8)
    assert info()["packs"] == packs, info()


def test_column_conv_opcheck_and_values():
    """aspp_fused::column_conv is the slice path's numbers (opcheck: schema, fake kernel, no
    aliasing of its inputs)."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 5, 6)
    w = torch.randn(4, 14, 1, 1)
    scale, shift, bias = torch.rand(4) + 0.5, torch.randn(4), torch.randn(2, 4)
    args = (x, [w], [2], [12], [1], scale, shift, bias, 1, "cpp")
    torch.library.opcheck(torch.ops.aspp_fused.column_conv, args)
    want, _, _ = AF.atrous_conv(x, [w[:, 2:12]], [1], scale, shift, bias, act="relu", backend="cpp")
    assert_close_rel(torch.ops.aspp_fused.column_conv(*args), want, 0.0, "column_conv")
