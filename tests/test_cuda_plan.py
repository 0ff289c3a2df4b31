"""The CUDA backend's forward plan on the host (csrc/tap_plan.h, counted by the op cuda_plan_work):
the same exact-region plan as kernels/plan.py, exact work where there is no tiling slack, the
standard heads within 5% of the valid work, and the tile plan's numbers that motivated it.
No GPU needed; the kernels' results on that plan are tests/test_op_dtypes.py's (GPU or emulator)."""
import random

import pytest
import torch

from aspp_fused import _extension
from aspp_fused.kernels import plan as P  # pure Python (the kernels package imports lazily)

pytestmark = pytest.mark.skipif(not _extension.cpp_available(), reason="aspp_fused._C not built")

BF16 = 2  # elem_bytes: the bf16 GEMM tile, 128 x 128, K steps of 32 (csrc/cuda/params.cuh)


def _work(n, c, h, w, branches, sum_mode=False, regions=True, elem_bytes=BF16):
    """branches: (k, dilation, cout)."""
    return torch.ops.aspp_fused.cuda_plan_work(n, c, h, w, [b[0] for b in branches], [b[1] for b in branches],
                                               [b[2] for b in branches], sum_mode, elem_bytes, regions)


def _shapes():
    """The fuzz's shape classes (1-pixel maps, rates at / beyond the map, width-1 regions, pixel
    tiles across images, ragged column blocks) and random ones; channels a multiple of 32 so the
    K rounding of the CUDA count (to its K step) and the Triton count (none) agree."""
    rng = random.Random(0)
    cases = [(1, 32, 1, 1, ((3, 2, 5),)), (2, 64, 7, 7, ((3, 3, 200), (1, 1, 7))), (3, 32, 4, 9, ((3, 4, 130),)),
             (130, 32, 5, 3, ((3, 2, 1), (3, 7, 129))), (16, 2048, 33, 33, ((1, 1, 256), (3, 6, 256), (3, 12, 256)))]
    for _ in range(40):
        cases.append((rng.randint(1, 40), 32 * rng.randint(1, 4), rng.randint(1, 20), rng.randint(1, 20),
                      tuple((rng.choice([1, 3]), rng.randint(1, 24), rng.randint(1, 300))
                            for _ in range(rng.randint(1, 4)))))
    return cases


@pytest.mark.parametrize("case", _shapes(), ids=lambda c: "n%d_c%d_%dx%d" % c[:4])
def test_cuda_region_plan_is_the_python_plan(case):
    """dense, valid and issued MACs of the CUDA glue's region plan equal kernels/plan.py's at the
    same tile: the two statements of the plan agree (the issued count sums every item's taps)."""
    n, c, h, w, branches = case
    dense, valid, issued = _work(n, c, h, w, branches)
    py_branches = tuple((k, min(d, max(h, w)), c, o) for k, d, o in branches)  # the glue clamps rates
    py = P.plan_work(P.region_plan(n, h, w, py_branches, 128, 128), n, h, w, py_branches, 128, 128)
    assert (dense, valid, issued) == (py["dense_macs"], py["valid_macs"], py["issued_macs"])


def test_issued_equals_valid_without_tiling_slack():
    """128 images of a 3 x 3 map at rate 1: nine 1-pixel regions, each exactly one 128-pixel tile;
    128 output channels, 32 input channels: one block each. Nothing is issued beyond the valid work."""
    dense, valid, issued = _work(128, 32, 3, 3, [(3, 1, 128), (1, 1, 128)])
    assert issued == valid < dense
    taps_per_axis = 2 + 3 + 2  # valid taps at positions 0, 1, 2 of a 3-map at rate 1
    assert valid == 128 * (taps_per_axis ** 2 + 9) * 32 * 128


@pytest.mark.parametrize("hw,rates,tile_issued,tile_valid", [
    (33, (6, 12, 18), 0.79, 0.60),  # OS16: every 11 x 11 tile of the rate-6 branch runs all 9 taps
    (65, (12, 24, 36), 0.68, 0.59),  # OS8
])
def test_standard_heads(hw, rates, tile_issued, tile_valid):
    """DESIGN's standard heads (batch 16, 2048 -> 4 x 256): the region plan issues within 5% of
    the valid work; the tile plan (ASPP_FUSED_CUDA_REGIONS=0) issues the share of the dense work
    that the kernels' static review found (issue: 0.79 / 0.68 against 0.60 / 0.59 valid)."""
    branches = [(1, 1, 256)] + [(3, r, 256) for r in rates]
    dense, valid, issued = _work(16, 2048, hw, hw, branches, regions=True)
    assert valid < issued <= 1.05 * valid
    d2, v2, tiles = _work(16, 2048, hw, hw, branches, regions=False)
    assert (d2, v2) == (dense, valid)
    assert round(tiles / dense, 2) == tile_issued and round(valid / dense, 2) == tile_valid


def test_sum_mode_region_plan():
    """Sum mode (every item runs every branch into the same columns: the v2 head, and the dgrad of
    every head) plans over the common refinement of the branches' regions: exact work without
    tiling slack, and at DESIGN's v2 head less than the tile plan (whose 21 classes in a
    128-column block dominate either way: 128 / 21 = 6.1x)."""
    # 128 images of a 3 x 3 map, rates 1 and 2: nine 1-pixel regions of one 128-pixel tile each
    dense, valid, issued = _work(128, 32, 3, 3, [(3, 1, 128), (3, 2, 128)], sum_mode=True, regions=True)
    assert issued == valid < dense
    v2 = [(3, r, 21) for r in (6, 12, 18, 24)]
    regions, tiles = (_work(16, 2048, 65, 65, v2, sum_mode=True, regions=flag) for flag in (True, False))
    assert regions[:2] == tiles[:2] and regions[2] < tiles[2]
    assert 128 / 21 * regions[1] < regions[2] < 6.5 * regions[1] < 7.3 * regions[1] < tiles[2]


def test_dgrad_region_plan():
    """The backward's dgrad is the sum mode of the branches with negated rates (the same valid
    taps, mirrored): counted with the forward's rates, cin = the branches' outputs, cout = C. The
    region plan cuts the OS8 dgrad from 1.152 to 1.042 of the valid work, OS16 from 1.318 to 1.269
    (49 small regions of a 33 x 33 map, each with its last tile part empty)."""
    for hw, rates, want_regions, want_tiles in ((33, (6, 12, 18), 1.27, 1.32), (65, (12, 24, 36), 1.04, 1.15)):
        branches = [(1, 1, 2048)] + [(3, r, 2048) for r in rates]
        _, valid, regions = _work(16, 256, hw, hw, branches, sum_mode=True, regions=True)
        _, _, tiles = _work(16, 256, hw, hw, branches, sum_mode=True, regions=False)
        assert (round(regions / valid, 2), round(tiles / valid, 2)) == (want_regions, want_tiles)


@pytest.mark.parametrize("shape,auto_picks", [
    ((2, 64, 33, 33, [(3, 6, 256), (3, 12, 256)]), "regions"),  # a DeepLab map: regions issue less
    ((2, 64, 9, 11, [(3, 2, 64), (1, 1, 64)]), "tiles"),  # one tile per image; 9 mostly empty region tiles
])
def test_the_glue_picks_the_plan_that_issues_less(monkeypatch, shape, auto_picks):
    """regions=None is the glue's choice: ASPP_FUSED_CUDA_REGIONS=1 / 0 force a plan; unset or
    auto, the one that issues fewer MACs."""
    on, off = _work(*shape, regions=True), _work(*shape, regions=False)
    assert (on[2] < off[2]) == (auto_picks == "regions")
    for env, want in ((None, auto_picks), ("auto", auto_picks), ("1", "regions"), ("0", "tiles")):
        if env is None:
            monkeypatch.delenv("ASPP_FUSED_CUDA_REGIONS", raising=False)
        else:
            monkeypatch.setenv("ASPP_FUSED_CUDA_REGIONS", env)
        assert _work(*shape, regions=None) == (on if want == "regions" else off), env


@pytest.mark.parametrize("args,match", [
    (dict(elem_bytes=3), "elem_bytes must be 2, 4 or 8, got 3"),
    (dict(branches=[(5, 1, 8)]), r"ksizes\[0\] must be 1 or 3, got 5"),
    (dict(branches=[(3, 0, 8)]), r"dilations\[0\] must be >= 1, got 0"),
])
def test_bad_arguments_are_named(args, match):
    kw = dict(branches=[(3, 2, 8)], elem_bytes=BF16)
    kw.update(args)
    with pytest.raises(RuntimeError, match=match):
        _work(2, 32, 5, 5, kw["branches"], elem_bytes=kw["elem_bytes"])
