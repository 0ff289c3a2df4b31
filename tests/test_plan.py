"""The exact-region tap plan of the Triton forward (kernels/plan.py): every output once, exactly the
valid taps, and the work it issues. Pure Python: the kernel's results are tests/test_op_cases.py's (backend
triton) and tests/test_triton_weights.py's (TMA)."""
import itertools
import random

import pytest

pytest.importorskip("triton")  # kernels/ is the Triton backend's package
from aspp_fused.kernels import plan as P  # noqa: E402


def _valid_taps(p, size, k, step):
    return [t for t in range(k) if 0 <= p + (t - k // 2) * step < size]


@pytest.mark.parametrize("k", [1, 3])
def test_axis_regions_partition_the_axis_with_exactly_the_valid_taps(k):
    for size, step in itertools.product(range(1, 14), [s for s in range(-15, 16) if s]):
        regions = P.axis_regions(size, k, step)
        assert regions[0][0] == 0 and regions[-1][1] == size
        for (lo, hi, t0, t1), nxt in zip(regions, regions[1:] + [None]):
            assert lo < hi and (nxt is None or nxt[0] == hi), (size, step, regions)
            for p in range(lo, hi):  # the same interval of taps for every position of the region
                assert _valid_taps(p, size, k, step) == list(range(t0, t1 + 1)), (size, k, step, p)


def _shapes():
    """The fuzz's shape classes: 1-pixel maps, rates at / beyond the map, width-1 regions (7 at
    rate 3: breakpoints 3 and 4), several images per tile, ragged channel blocks."""
    rng = random.Random(0)
    cases = [(1, 1, 1, ((3, 5, 2, 3),)), (2, 7, 7, ((3, 3, 2, 5), (1, 1, 2, 3))), (3, 4, 9, ((3, 9, 1, 4), (3, 4, 1, 2))),
             (2, 5, 3, ((3, 2, 3, 1), (3, 6, 3, 7)))]
    for _ in range(20):
        cases.append((rng.randint(1, 3), rng.randint(1, 9), rng.randint(1, 9),
                      tuple((rng.choice([1, 3]), rng.randint(1, 12), rng.randint(1, 4), rng.randint(1, 9))
                            for _ in range(rng.randint(1, 3)))))
    return cases


@pytest.mark.parametrize("bm,bn", [(1, 1), (4, 2), (16, 16)])
def test_plan_writes_every_output_once_over_its_valid_taps(bm, bn):
    for n, h, w, branches in _shapes():
        seen = {}
        for it in P.region_plan(n, h, w, branches, bm, bn):
            k, step, _, nb = branches[it.branch]
            rh, rw = it.h1 - it.h0, it.w1 - it.w0
            for q in range(it.p0, min(it.p0 + bm, n * rh * rw)):
                img, r = divmod(q, rh * rw)
                ph, pw = it.h0 + r // rw, it.w0 + r % rw
                assert _valid_taps(ph, h, k, step) == list(range(it.ky0, it.ky1 + 1))
                assert _valid_taps(pw, w, k, step) == list(range(it.kx0, it.kx1 + 1))
                for o in range(it.o0, min(it.o0 + bn, nb)):
                    key = (it.branch, img, ph, pw, o)
                    assert key not in seen, (n, h, w, branches, key)
                    seen[key] = True
        expected = sum(n * h * w * nb for _, _, _, nb in branches)
        assert len(seen) == expected, (n, h, w, branches)


def test_issued_equals_valid_without_tiling_slack():
    """One pixel and one channel per item: the plan multiplies exactly the valid (pixel, tap)
    pairs; with larger tiles it issues more, never less."""
    for n, h, w, branches in _shapes():
        work = P.plan_work(P.region_plan(n, h, w, branches, 1, 1), n, h, w, branches, 1, 1)
        assert work["issued_macs"] == work["valid_macs"] <= work["dense_macs"], (n, h, w, branches, work)
        big = P.plan_work(P.region_plan(n, h, w, branches, 16, 16), n, h, w, branches, 16, 16)
        assert big["valid_macs"] == work["valid_macs"] and big["issued_macs"] >= big["valid_macs"]


@pytest.mark.parametrize("hw,rates,limit", [(33, (6, 12, 18), 1.03), (65, (12, 24, 36), 1.01)], ids=["os16", "os8"])
def test_standard_heads_issue_within_5_percent_of_the_valid_work(hw, rates, limit):
    """docs/DESIGN.md's standard heads (batch 16, 2048 -> 4 x 256), the GPU tile (128 x 128):
    issued / valid 1.027 at OS16 and 1.006 at OS8 (the per-tile tap rectangles of the tile
    kernel issue 0.79 / 0.68 of the dense MACs; this plan 0.61 / 0.60)."""
    branches = ((1, 1, 2048, 256),) + tuple((3, r, 2048, 256) for r in rates)
    work = P.plan_work(P.region_plan(16, hw, hw, branches, 128, 128), 16, hw, hw, branches, 128, 128)
    assert work["issued_macs"] / work["valid_macs"] <= limit
    assert work["issued_macs"] / work["dense_macs"] < 0.62


def test_items_run_longest_first():
    branches = ((1, 1, 8, 4), (3, 2, 8, 4))
    items = P.region_plan(2, 6, 6, branches, 4, 4)
    taps = [(it.ky1 - it.ky0 + 1) * (it.kx1 - it.kx0 + 1) * branches[it.branch][2] for it in items]
    assert taps == sorted(taps, reverse=True) and taps[0] == 9 * 8
