"""How the Triton kernels get their weights: packed once per parameter version
(kernels/pack_cache.py: PackCache), across calls, threads, optimizer steps, load_state_dict,
dtype changes and torch.compile; and region_conv's weight tiles by TMA descriptor (the Hopper
path, here under the interpreter on CPU).

The C++ kernels' pack cache (csrc/pack_cache.h): tests/test_pack_cache.py.
"""
import copy

import pytest
import torch

import aspp_fused
import aspp_fused.nn as ann
from aspp_fused import functional as AF
from conftest import (DEV, assert_close_rel, check_compiled_intermediate_weights, needs_triton, randomize_bn,
                      run_in_threads)
from op_problems import atrous_problem

TOL = 1e-5

pytestmark = [needs_triton, pytest.mark.usefixtures("no_tf32")]  # conftest: the exact fp32 path


# --------------------------------------------------------------------------- TMA weight descriptors


# Branch widths equal (a descriptor spans the packed weights as rows of one width) and 16-byte rows:
# C off the channel block (20 = 16 + 4: the last K step's rows run into the next tap's weights,
# zero-masked on the input side), width-1 regions across images, a 1-pixel map, rates beyond it.
TMA_CASES = {
    "c20_width1_regions_7x7": (3, 20, 7, 7, ((3, 4, 3), (3, 4, 5), (1, 4, 1)), True),
    "1x1_map": (2, 6, 1, 1, ((1, 8, 1), (3, 8, 2)), False),
    "rates_ge_map_c16": (2, 16, 4, 5, ((3, 4, 6), (3, 4, 2)), True),
}


@pytest.mark.parametrize("case", sorted(TMA_CASES))
def test_region_conv_weight_tiles_by_tma(monkeypatch, case):
    """ASPP_FUSED_TRITON_TMA=1: region_conv reads its weight tiles through a tensor descriptor
    (the Hopper path, here under the interpreter): the reference's numbers (forward and every
    grad), and bitwise the pointer path's (the same tiles, the same products)."""
    from aspp_fused.kernels import atrous_conv as KA
    from op_problems import atrous_fn, op_parity

    n, c, h, w, branches, bias = TMA_CASES[case]
    made = []

    def spy(w_packed, rows):
        made.append(real(w_packed, rows))
        return made[-1]

    real = KA.weight_descriptor
    monkeypatch.setattr(KA, "weight_descriptor", spy)
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "1")
    args = atrous_problem(n, c, h, w, branches, False, bias)
    op_parity("triton", lambda be: atrous_fn(be, False, 1, True), args, True)
    assert made and all(d is not None for d in made), "the descriptor path did not run"
    via_tma = AF.atrous_conv(*args, act="relu", compute_stats=True, backend="triton")
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "0")
    calls = len(made)
    via_pointers = AF.atrous_conv(*args, act="relu", compute_stats=True, backend="triton")
    assert len(made) == calls  # no descriptor asked for
    for a, b in zip(via_tma, via_pointers):
        assert torch.equal(a, b)


def test_tma_switch_and_descriptor_rules(monkeypatch):
    from aspp_fused.kernels import atrous_conv as KA

    x = torch.zeros(1, 2, 2, 2)
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="ASPP_FUSED_TRITON_TMA must be 'auto', '0' or '1', got 'yes'"):
        KA.use_tma(x)
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "auto")
    assert not KA.use_tma(x)  # CPU tensors: no copy engine

    class Row:
        def __init__(self, n_b, w_off):
            self.n_b, self.w_off = n_b, w_off

    w = torch.zeros(4096)
    assert KA.weight_descriptor(w, [Row(8, 0), Row(8, 72)]) is not None
    assert KA.weight_descriptor(w, [Row(8, 0), Row(4, 72)]) is None  # widths differ
    assert KA.weight_descriptor(w, [Row(2, 0)]) is None  # 8-byte rows
    assert KA.weight_descriptor(w, [Row(8, 0), Row(8, 12)]) is None  # a branch off a row start
    assert KA.weight_descriptor(w[1:], [Row(8, 0)]) is None  # base not 16-byte aligned
    assert KA.weight_descriptor(w[4:], [Row(8, 0)]) is not None


# --------------------------------------------------------------------------- packed weights


def test_weights_are_packed_once_per_parameter_version():
    """The Triton ops keep packed weights while their parameters are unchanged (kernels/pack_cache.
    PackCache): repeated eval calls and threads sharing a model pack once; an optimizer-style
    in-place update, load_state_dict and a dtype change repack; results stay exact throughout."""
    from aspp_fused.kernels.pack_cache import PACKED

    twin = randomize_bn(ann.ASPP(8, [2, 3], out_channels=6)).to(DEV).eval()
    fused = aspp_fused.convert(copy.deepcopy(twin), backend="triton")
    x = torch.randn(2, 8, 5, 6, device=DEV)

    def check():
        with torch.no_grad():
            assert_close_rel(fused(x), twin(x), TOL, "output")

    PACKED.clear()
    start = PACKED.misses
    check()
    first = PACKED.misses - start  # the branches' launch and the projection's
    assert first >= 2
    for _ in range(3):
        check()
    assert PACKED.misses - start == first, "repacked without a change"
    # Threads asking for the same packing at once get one packing. (The interpreter cannot run
    # kernels from several threads, so the threads meet in the cache itself.)
    w = fused.convs[1][0].weight
    made = []

    def pack():
        made.append(1)
        return object()

    got = run_in_threads(lambda _: PACKED.get(("test-threads",), [w], pack), 6)
    assert len(made) == 1 and len(got) == 6 and all(v is got[0] for v in got)
    start += 1
    with torch.no_grad():  # an optimizer step: in place, the version counter moves
        for m in (twin, fused):
            m.convs[1][0].weight.mul_(0.5)
    check()
    assert PACKED.misses - start == first + 1  # only the launch that reads that weight
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    state["project.0.weight"].add_(0.1)
    twin.load_state_dict(state)
    fused.load_state_dict(state)
    check()
    assert PACKED.misses - start == first + 1 + first  # load_state_dict writes every parameter
    # .to(dtype) gives new parameters: a packing of the old ones is never served for them.
    w2 = fused.convs[1][0].weight
    before = PACKED.misses
    a = PACKED.get(("test-dtype",), [w2], object)
    b = PACKED.get(("test-dtype",), [torch.nn.Parameter(w2.detach().to(torch.float64))], object)
    c = PACKED.get(("test-dtype",), [w2], object)
    # the new tensor gets a packing of its own; the old one's is kept beside it, for the old one
    assert b is not a and c is a and PACKED.misses - before == 2


def test_compiled_model_packs_once_and_follows_updates():
    """The Triton ops are opaque to torch.compile (kernels/ops.py), so a compiled graph runs their
    host code each call and keeps the packed weights: no packing per call, a repack after an
    in-place update, the twin's numbers throughout."""
    from aspp_fused.kernels.pack_cache import PACKED

    twin = randomize_bn(ann.ASPP(8, [2, 3], out_channels=6)).to(DEV).eval()
    fused = aspp_fused.convert(copy.deepcopy(twin), backend="triton")
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 8, 5, 6, device=DEV)
    with torch.no_grad():
        assert_close_rel(compiled(x), twin(x), TOL, "compiled")
        compiled(x)  # the first run of a new graph gets aliases of the parameters: packed, then dropped
        misses = PACKED.misses
        for _ in range(3):
            compiled(x)
        assert PACKED.misses == misses, "the compiled graph repacks every call"
        for m in (twin, fused):
            m.convs[1][0].weight.mul_(0.5)
        assert_close_rel(compiled(x), twin(x), TOL, "compiled, after an update")
        assert PACKED.misses == misses + 1, "one repack: the launch that reads the updated weight"


def test_reused_buffers_of_a_compiled_graph_are_not_served():
    """Two ops in one compiled graph whose weights are intermediates (w * 2): inductor reuses the
    first one's buffer, the same tensor object, for the second one's weight; PackCache keeps only
    parameters, so the second op packs its own (it was served the first one's: 391 off)."""
    check_compiled_intermediate_weights("triton", DEV, TOL)


def test_packed_weights_go_with_their_model():
    """A deleted model's packed weights are not kept (the entry's weakref to a source drops it)."""
    import gc

    from aspp_fused.kernels.pack_cache import PACKED

    fused = aspp_fused.convert(randomize_bn(ann.ASPP(8, [2], out_channels=4)).to(DEV).eval(), backend="triton")
    PACKED.clear()
    with torch.no_grad():
        fused(torch.randn(1, 8, 4, 4, device=DEV))
    assert len(PACKED.entries) >= 2
    del fused
    gc.collect()
    assert len(PACKED.entries) == 0
