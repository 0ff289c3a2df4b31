"""``python -m benchmarks --work-only``: the multiply-adds each backend's plan issues, without timing.

For each head case: the dense MACs (every tap, padding included), the valid MACs (the (pixel, tap)
pairs inside the image) and the issued MACs (what the kernels' plans multiply, tiling slack
included), per provider, from the provider's own launches:

* ``fused_triton``: the fused head runs once with the Triton backend with its launches skipped
  (kernels/_common.skip_launches) while kernels/_common.record_work logs each launch's plan; the
  region launches (the concat forward, kernels/plan.py) are counted again at the GPU tile
  (atrous_conv.GPU_REGION_TILE) with the same plan builder. Launches whose taps come from the tile
  inside the kernel (sum mode: the tile kernel; the separable kernel) have no issued count: the
  record's issued_macs is then null and ``partial`` names them.
* ``fused_cuda``: the fused head runs once with the ``cpp`` backend on fake tensors (nothing
  computed) while a dispatch mode notes each ``aspp_fused.atrous_conv`` call; each call is then
  counted by ``torch.ops.aspp_fused.cuda_plan_work``, the host half of the plan the CUDA glue
  launches (csrc/tap_plan.h; the exact-region plan for the concat forward unless
  ASPP_FUSED_CUDA_REGIONS=0, the tile plan in sum mode), at the bf16 GEMM tile. Separable calls
  have no count (``partial``).
* ``fused_torch_regions``: the fused head with the torch backend's exact-region convolutions
  (torch_backend.region_conv, ASPP_FUSED_TORCH_REGIONS=cuda), run on fake tensors (nothing computed) while the backend
  logs each ATen conv it asks for: a region conv issues exactly its valid (pixel, tap) pairs, a
  plain conv (1x1, depthwise, or a branch whose map needs no region split) every kept tap at
  every pixel. What cuDNN then executes inside a conv is its own choice.
* ``eager_cl`` (the twin): dense and valid only; cuDNN / oneDNN pick their own algorithms (oneDNN
  skips padded taps on CPU, measured: benchmarks/run.py's CPU note).

Writes ``<out>/work_<size>.json`` (a list of records ``{case, provider, dense_macs, valid_macs,
issued_macs, ...}``) and prints a table.
"""
import contextlib
import json
import os
from typing import List

import torch

from benchmarks import cases as C


def _triton_work(case: C.Case, size: str, batch: int) -> dict:
    from aspp_fused import _extension

    kernels = _extension.triton_kernels()
    from aspp_fused.kernels import atrous_conv as KA
    from aspp_fused.kernels import plan as P
    from aspp_fused.kernels._common import skip_launches
    from aspp_fused.kernels.worklog import record_work

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not kernels.INTERPRET:
        raise C.Skip("the Triton ops take CPU tensors only under TRITON_INTERPRET=1 (set before the first import)")
    twin, spec = C.build_twin(case, size, device, torch.float32)
    fused = case.fused.from_module(twin.eval(), backend="triton")
    x = C.make_inputs(spec, batch, 1, device, torch.float32, True, False)[0]
    with record_work() as log, skip_launches(), torch.inference_mode():
        fused(x)
    bm, bn = KA.GPU_REGION_TILE
    dense = valid = issued = 0
    partial = []
    for entry in log:
        if entry["kernel"] == "region_conv":
            n, h, w, branches = entry["geometry"]
            work = P.plan_work(P.region_plan(n, h, w, branches, bm, bn), n, h, w, branches, bm, bn)
        else:
            work = entry
            partial.append(entry["kernel"])
        dense += work["dense_macs"]
        valid = None if valid is None or work["valid_macs"] is None else valid + work["valid_macs"]
        issued = None if issued is None or work["issued_macs"] is None else issued + work["issued_macs"]
    rec = {"dense_macs": dense, "valid_macs": valid, "issued_macs": issued, "launches": len(log),
           "tile": [bm, bn]}
    if partial:
        rec["partial"] = "taps chosen inside the kernel (no plan to count): %s" % ", ".join(sorted(set(partial)))
    return rec


class _OpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Notes the args of every aspp_fused op call (the ops themselves run on, here, fake tensors)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aspp_fused":
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))


def _fake_run(case: C.Case, size: str, batch: int, backend: str, mode=None) -> list:
    """Runs the fused head once on fake tensors with ``backend``; returns the aspp_fused op calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    twin, spec = C.build_twin(case, size, "cpu", torch.float32)
    fused = case.fused.from_module(twin.eval(), backend=backend)
    calls = _OpCalls()
    # no fake weights kept in the fold cache
    with C.env_set("ASPP_FUSED_FOLD_CACHE", "0"), mode or contextlib.nullcontext(), \
            FakeTensorMode(allow_non_fake_inputs=True):
        x = C.make_inputs(spec, batch, 1, "cpu", torch.float32, True, False)[0]
        with calls, torch.inference_mode():
            fused(x)
    return calls.calls


def _cuda_work(case: C.Case, size: str, batch: int, regions=None) -> dict:
    from aspp_fused import _extension

    if not _extension.cpp_available():
        raise C.Skip("aspp_fused._C is not built (the CUDA plan is counted by its cuda_plan_work op)")
    dense = valid = issued = 0
    partial = []
    calls = _fake_run(case, size, batch, "cpp")
    for name, args in calls:
        if name != "atrous_conv":
            partial.append(name)
            continue
        x, weights, dilations, sum_mode = args[0], args[1], args[2], args[6]
        n, c, h, w = x.shape
        d, v, i = torch.ops.aspp_fused.cuda_plan_work(n, c, h, w, [wt.shape[-1] for wt in weights], list(dilations),
                                                      [wt.shape[0] for wt in weights], sum_mode, 2, regions)
        dense, valid, issued = dense + d, valid + v, issued + i
    rec = {"dense_macs": dense, "valid_macs": valid, "issued_macs": issued, "launches": len(calls),
           "note": "csrc/tap_plan.h at the bf16 GEMM tile"}
    if partial:  # the head's totals are unknown: report none rather than a part of them
        rec.update(dense_macs=None, valid_macs=None, issued_macs=None,
                   partial="not counted: %s" % ", ".join(sorted(set(partial))))
    return rec


def _torch_work(case: C.Case, size: str, batch: int) -> dict:
    from aspp_fused import torch_backend
    from aspp_fused.kernels.worklog import record_work

    with record_work() as log:
        _fake_run(case, size, batch, "torch", torch_backend.regions("1"))
    return {"dense_macs": sum(e["dense_macs"] for e in log), "valid_macs": sum(e["valid_macs"] for e in log),
            "issued_macs": sum(e["issued_macs"] for e in log), "launches": len(log),
            "note": "ATen convs asked for (region plan on)"}


def issued_for(case: C.Case, size: str, batch: int, provider: str, device_type: str):
    """(issued MACs of one forward of ``provider`` from its own plan, or None; why None). The
    benchmark's records carry it beside the dense and executed counts (gmacs_issued)."""
    try:
        if provider in ("fused_cpp", "fused_cpp_tiles"):
            if device_type != "cuda":
                return None, "the CPU kernels' tiles are not counted"
            rec = _cuda_work(case, size, batch, regions=False if provider == "fused_cpp_tiles" else None)
        elif provider == "fused_triton":
            rec = _triton_work(case, size, batch)
        elif provider == "fused_torch_regions":
            rec = _torch_work(case, size, batch)
        else:
            return None, "no plan of its own to count (cuDNN / oneDNN / inductor choose)"
    except C.Skip as exc:
        return None, str(exc)
    return rec["issued_macs"], rec.get("partial")


def work_records(case_names: List[str], size: str, batch_override=None):
    records, skipped = [], []
    for name in case_names:
        case = C.CASES[name]
        batch = batch_override or case.batch[size]
        if case.fused is None:
            skipped.append({"case": name, "provider": "*", "reason": "whole models: converted by "
                            "aspp_fused.convert, not counted here"})
            continue
        dense, executed, _, _ = C.meta_macs(case, size, batch)
        records.append({"case": name, "provider": "eager_cl", "batch": batch, "dense_macs": dense,
                        "valid_macs": executed, "issued_macs": None,
                        "note": "cuDNN / oneDNN choose their own algorithm"})
        records.append(dict({"case": name, "provider": "fused_torch_regions", "batch": batch},
                            **_torch_work(case, size, batch)))
        try:
            records.append(dict({"case": name, "provider": "fused_cuda", "batch": batch}, **_cuda_work(case, size, batch)))
        except C.Skip as exc:
            skipped.append({"case": name, "provider": "fused_cuda", "reason": str(exc)})
        try:
            rec = _triton_work(case, size, batch)
        except C.Skip as exc:
            skipped.append({"case": name, "provider": "fused_triton", "reason": str(exc)})
        except ImportError as exc:
            skipped.append({"case": name, "provider": "fused_triton", "reason": "triton: %s" % exc})
        else:
            records.append(dict({"case": name, "provider": "fused_triton", "batch": batch}, **rec))
    return records, skipped


def _g(v):
    return "-" if v is None else "%.3f" % (v / 1e9)


def work_table(records) -> str:
    lines = ["%-18s %-19s %10s %10s %10s %13s %13s" % ("case", "provider", "dense G", "valid G", "issued G",
                                                        "issued/valid", "issued/dense")]
    for r in records:
        iv = "-" if not (r["issued_macs"] and r["valid_macs"]) else "%.4f" % (r["issued_macs"] / r["valid_macs"])
        idn = "-" if not (r["issued_macs"] and r["dense_macs"]) else "%.3f" % (r["issued_macs"] / r["dense_macs"])
        lines.append("%-18s %-19s %10s %10s %10s %13s %13s" % (r["case"], r["provider"], _g(r["dense_macs"]),
                                                               _g(r["valid_macs"]), _g(r["issued_macs"]), iv, idn))
    return "\n".join(lines)


def main_work_only(case_names, size, batch, out_dir) -> int:
    records, skipped = work_records(case_names, size, batch)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "work_%s.json" % size)
    with open(path, "w") as f:
        json.dump({"size": size, "records": records, "skipped": skipped}, f, indent=1)
    print(work_table(records))
    for s in skipped:
        print("skipped %s / %s: %s" % (s["case"], s["provider"], s["reason"]))
    print("\nwrote %s" % path)
    return 0
