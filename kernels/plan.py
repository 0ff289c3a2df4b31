"""Exact-region tap plans: the work list of the Triton forward in concat mode (region_conv_kernel).

Pure Python (no triton import): the one statement of which taps of a dilated conv touch the image
where, and of how that work is cut into kernel programs. Counted work (``plan_work``) comes from
the very rows the kernel executes.

Per axis, a k-tap conv at step d (tap t reads position p + (t - k//2) * d) has breakpoints where
a tap enters or leaves the image (d and size - d for k = 3); between two breakpoints the set of
valid taps is constant and contiguous (``axis_regions``). Per branch the output splits into the
product of the row and column regions (at most 3 x 3 = 9 for k = 3), inside which every pixel has
the same valid tap rectangle: a program over one region runs exactly those taps and needs no
image-bounds masks. A program (``RegionItem``) takes BM consecutive pixels of one region counted
across the whole batch (image-major), so a 6 x 6 corner region of 16 images fills 128-row tiles,
and BN output channels of its branch. Items are ordered longest first (most taps), so the uneven
items of a launch do not leave a tail.

issued MACs (``plan_work``) = sum over items of BM x taps x K_b x BN: what the kernel's tl.dot
calls multiply, masked rows and columns included. valid MACs = the (pixel, tap) pairs inside the
image x K_b x N_b. Their ratio is the tiling slack (< 1 row tile per region and branch, plus the
column blocks' padding).
"""
import functools
from typing import List, NamedTuple, Sequence, Tuple

# Columns of the item table (int32 rows, REGION_COLS wide; see _common.meta_tensor).
REGION_COLS = 12


class RegionItem(NamedTuple):
    """One program of region_conv_kernel: output pixels [p0, p0 + BM) of region
    [h0, h1) x [w0, w1) of branch ``branch``, counted across the batch (pixel q is image
    q // area, offset q % area in the region, row-major), output channels [o0, o0 + BN) of the
    branch, taps [ky0, ky1] x [kx0, kx1] (all valid for every pixel of the region)."""
    branch: int
    h0: int
    h1: int
    w0: int
    w1: int
    p0: int
    ky0: int
    ky1: int
    kx0: int
    kx1: int
    o0: int


def axis_regions(size: int, k: int, step: int) -> List[Tuple[int, int, int, int]]:
    """(lo, hi, t0, t1) per region of one axis: output positions [lo, hi) whose valid taps are
    exactly [t0, t1]. The regions cover [0, size) in order; k odd; step may be negative."""
    half = k // 2
    cuts = {0, size}
    for t in range(k):
        off = (t - half) * step
        for b in (-off, size - off):  # tap t is valid for p in [-off, size - off)
            if 0 < b < size:
                cuts.add(b)
    cuts = sorted(cuts)
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        valid = [t for t in range(k) if 0 <= lo + (t - half) * step < size]
        out.append((lo, hi, min(valid), max(valid)))
    return out


@functools.lru_cache(maxsize=256)
def region_plan(n: int, h: int, w: int, branches: Tuple[Tuple[int, int, int, int], ...], bm: int,
                bn: int) -> Tuple[RegionItem, ...]:
    """The items of one launch. ``branches``: (k, step, K_b, N_b) per branch."""
    items = []
    for b, (k, step, _, nb) in enumerate(branches):
        for h0, h1, ky0, ky1 in axis_regions(h, k, step):
            for w0, w1, kx0, kx1 in axis_regions(w, k, step):
                pixels = n * (h1 - h0) * (w1 - w0)
                for p0 in range(0, pixels, bm):
                    for o0 in range(0, nb, bn):
                        items.append(RegionItem(b, h0, h1, w0, w1, p0, ky0, ky1, kx0, kx1, o0))

    def cost(it):
        return (it.ky1 - it.ky0 + 1) * (it.kx1 - it.kx0 + 1) * branches[it.branch][2]

    return tuple(sorted(items, key=cost, reverse=True))  # stable: ties keep their order


def plan_work(items: Sequence[RegionItem], n: int, h: int, w: int,
              branches: Sequence[Tuple[int, int, int, int]], bm: int, bn: int) -> dict:
    """{dense_macs, valid_macs, issued_macs} of one launch of ``items`` (see the module
    docstring): dense and valid from the branches' geometry, issued from the items."""
    dense = valid = 0
    for k, step, kb, nb in branches:
        dense += n * h * w * k * k * kb * nb
        taps_h = sum((hi - lo) * (t1 - t0 + 1) for lo, hi, t0, t1 in axis_regions(h, k, step))
        taps_w = sum((hi - lo) * (t1 - t0 + 1) for lo, hi, t0, t1 in axis_regions(w, k, step))
        valid += n * taps_h * taps_w * kb * nb
    issued = sum(bm * (it.ky1 - it.ky0 + 1) * (it.kx1 - it.kx0 + 1) * branches[it.branch][2] * bn for it in items)
    return {"dense_macs": dense, "valid_macs": valid, "issued_macs": issued}
