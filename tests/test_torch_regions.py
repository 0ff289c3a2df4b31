"""The torch backend's exact-region convolutions (torch_backend.region_conv; off by default until a
GPU run measures them, ASPP_FUSED_TORCH_REGIONS=cuda / 1 turn them on; forced here with
torch_backend.REGIONS = "1"): exact against ATen's padded conv on every shape
class of the plan (regions of width 0 or 1, rates >= the map, 1-pixel maps), differentiable,
counted (issued == valid), and never recorded where a graph must run at any size.
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import aspp_fused.nn as ann
from aspp_fused import functional as AF
from aspp_fused import torch_backend as T
from aspp_fused.kernels.worklog import record_work
from conftest import assert_close_rel, compare_with_twin, randomize_bn

SIZES = [1, 2, 3, 4, 5, 7, 12, 13]
DILATIONS = [1, 2, 3, 4, 6, 7, 12, 13]


@pytest.fixture
def regions():
    with T.regions("1"):
        yield


@pytest.mark.parametrize("h", SIZES)
def test_region_conv_is_the_padded_conv(h):
    """Every (H, W, d) with H, W in SIZES and d in DILATIONS: the 1-pixel map, maps smaller than d
    (one region, the centre tap), d < H <= 2d (the middle region reads neither side), H > 2d
    (3 regions), widths 0 and 1 (H = d + 1, H = 2d + 1)."""
    torch.manual_seed(h)
    for w_, d in itertools.product(SIZES, DILATIONS):
        x = torch.randn(2, 3, h, w_, dtype=torch.float64)
        wt = torch.randn(5, 3, 3, 3, dtype=torch.float64)
        b = torch.randn(5, dtype=torch.float64)
        got = T.region_conv(x, wt, d, b)
        assert got.shape == (2, 5, h, w_)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_close_rel(got, F.conv2d(x, wt, b, padding=d, dilation=d), 1e-12, "H %d W %d d %d" % (h, w_, d))


def test_region_conv_gradcheck():
    x = torch.randn(2, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: T.region_conv(x, w, 3, b), (x, w, b))


@pytest.mark.parametrize("sum_mode", [False, True])
def test_atrous_conv_with_regions_matches_without(monkeypatch, sum_mode):
    """The whole op (BN scale / shift, per-sample bias, ReLU, statistics, concat or sum) in float64."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 9, 11, dtype=torch.float64)
    ws = [torch.randn(4, 6, 1, 1, dtype=torch.float64)] + [torch.randn(4, 6, 3, 3, dtype=torch.float64)
                                                          for _ in range(3)]
    dil = [1, 2, 5, 12]
    o = 4 if sum_mode else 16
    s, t, bias = torch.rand(o, dtype=torch.float64) + 0.5, torch.randn(o, dtype=torch.float64), \
        torch.randn(3, o, dtype=torch.float64)
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setattr(T, "REGIONS", mode)
        with record_work() as log:
            outs[mode] = AF.atrous_conv(x, ws, dil, s, t, bias, sum_mode=sum_mode, act="relu", compute_stats=True,
                                        backend="torch")
        kinds = [e["kernel"] for e in log]
        # rates 2 and 5 split the 9 x 11 map into regions; 12 >= both sides leaves the centre tap
        assert kinds.count("torch_region_conv") == (2 if mode == "1" else 0), kinds
    for a, b in zip(outs["0"], outs["1"]):
        assert_close_rel(b, a, 1e-12, "regions on vs off")


def test_work_log_counts_exactly_the_valid_taps(regions):
    x = torch.randn(2, 3, 5, 4)
    w = torch.randn(2, 3, 3, 3)
    with record_work() as log:
        T.region_conv(x, w, 2)
    (entry,) = log
    # rows: [0, 2) taps 1..2, [2, 3) taps 0..2, [3, 5) taps 0..1 -> 2*2 + 3 + 2*2 = 11 row-taps;
    # cols (4, d 2): [0, 2) taps 1..2, [2, 4) taps 0..1 -> 4 + 4 = 8 col-taps
    assert entry["valid_macs"] == entry["issued_macs"] == 2 * 11 * 8 * 3 * 2
    assert entry["dense_macs"] == 2 * 5 * 4 * 9 * 3 * 2


@pytest.mark.parametrize("name", ["FusedASPP", "FusedASPPv2", "FusedSeparableASPP"])
def test_fused_heads_train_step_with_regions(regions, name):
    """A train-mode forward and backward of a fused head with regions on, against its twin."""
    torch.manual_seed(1)
    make = {"FusedASPP": lambda: ann.ASPP(8, [2, 5, 13], 6),
            "FusedASPPv2": lambda: ann.ASPPv2(8, 3, [2, 5, 13]),
            "FusedSeparableASPP": lambda: ann.SeparableASPP(8, 6, [2, 5, 13])}[name]
    twin = randomize_bn(make())
    ref = copy.deepcopy(twin).train()
    fused = getattr(ann, name).from_module(twin, backend="torch").train()
    compare_with_twin(ref, fused, torch.randn(2, 8, 11, 9, requires_grad=True), True)


def test_export_and_trace_keep_the_shape_generic_path(regions):
    """Under torch.export (dynamic sizes) and jit.trace nothing is recorded per region: the graph
    runs exactly at sizes on both sides of every rate."""
    m = ann.FusedASPP(8, [2, 5], out_channels=6).eval()
    ep = torch.export.export(m, (torch.randn(2, 8, 4, 6),),
                             dynamic_shapes=({0: Dim("b", max=64), 2: Dim("h", max=2048), 3: Dim("w", max=2048)},))
    assert not [n for n in ep.graph.nodes if n.target in (torch.ops.aten.cat.default,)
                and len(n.args) > 1 and n.args[1] in (2, 3)], "regions concatenated in H / W under export"
    with torch.no_grad():
        traced = torch.jit.trace(m, (torch.randn(2, 8, 4, 6),), check_trace=False, strict=False)
        for hw in [(1, 1), (3, 7), (9, 11)]:
            x = torch.randn(1, 8, *hw)
            assert_close_rel(ep.module()(x), m(x), 1e-4, "exported, run at %s" % (hw,))
            assert_close_rel(traced(x), m(x), 1e-4, "traced, run at %s" % (hw,))


def test_compile_with_regions(regions):
    torch._dynamo.reset()
    m = ann.FusedASPP(8, [2, 5], out_channels=6).eval()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    for hw in [(9, 11), (3, 7)]:
        x = torch.randn(2, 8, *hw)
        with torch.no_grad():
            assert_close_rel(compiled(x), m(x), 1e-5, "compiled at %s" % (hw,))


def test_regions_cuda_setting_is_cuda_only(monkeypatch):
    monkeypatch.setattr(T, "REGIONS", "cuda")
    assert not T._use_regions(torch.randn(1, 2, 9, 9), torch.randn(2, 2, 3, 3), 2)
    monkeypatch.setattr(T, "REGIONS", "1")
    assert T._use_regions(torch.randn(1, 2, 9, 9), torch.randn(2, 2, 3, 3), 2)
    assert not T._use_regions(torch.randn(1, 2, 9, 9), torch.randn(2, 2, 1, 1), 1)  # 1x1: no taps to skip
    assert not T._use_regions(torch.randn(1, 2, 9, 9), torch.randn(2, 2, 3, 3), 9)  # one region: centre tap


def test_bad_regions_setting_is_named(monkeypatch):
    monkeypatch.setenv("ASPP_FUSED_TORCH_REGIONS", "yes")
    with pytest.raises(ValueError, match="ASPP_FUSED_TORCH_REGIONS must be '0'.*got 'yes'"):
        T._regions_mode()


def test_benchmark_provider_with_regions_on(monkeypatch):
    """benchmarks' fused_torch_regions runs the same module with the region plan on, then restores the
    setting; the default is off (no GPU measurement yet)."""
    from benchmarks.cases import with_torch_regions

    monkeypatch.delenv("ASPP_FUSED_TORCH_REGIONS", raising=False)
    assert T._regions_mode() == "0"
    m = ann.FusedASPP(8, [2, 5], out_channels=6).eval()
    x = torch.randn(2, 8, 9, 11)
    with record_work() as log, torch.no_grad():
        off = m(x)
    assert [e["kernel"] for e in log].count("torch_region_conv") == 0
    with record_work() as log, torch.no_grad():
        on = with_torch_regions(m)(x)
    assert [e["kernel"] for e in log].count("torch_region_conv") == 2
    assert T.REGIONS == "0"
    assert_close_rel(off, on, 1e-5, "regions off vs on")
