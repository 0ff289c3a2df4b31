"""The benchmark harness (benchmarks/): MAC counting, the results schema, --compare.

Fast CPU tests: one tiny case, two providers, a few runs each.
"""
import copy
import json
import os
import random
import signal
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is a folder of the repository, not part of the installed package
    sys.path.insert(0, ROOT)

from benchmarks import harness as H  # noqa: E402
from benchmarks import report as REP  # noqa: E402
from benchmarks import run as R  # noqa: E402
from aspp_fused.nn import ASPP  # noqa: E402

SCHEMA = {"case": str, "provider": str, "mode": str, "dtype": str, "batch": int, "ms_median": float,
          "ms_p20": float, "ms_p80": float, "peak_mem_mb": (float, type(None)), "tflops_executed": float,
          "tflops_dense": float, "device": str, "torch": str, "triton": (str, type(None)), "commit": str}


# --------------------------------------------------------------------------- MAC counting


def brute_force_macs(conv: nn.Conv2d, shape):
    """(dense, executed) by visiting every (output pixel, tap) pair of the convolution."""
    n, c, h, w = shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = H._conv_padding(conv)
    ho, wo = F.conv2d(torch.empty(1, c, h, w, device="meta"), conv.weight.to("meta"), None, conv.stride,
                      conv.padding, conv.dilation, conv.groups).shape[-2:]
    dense = executed = 0
    for oy in range(ho):
        for ox in range(wo):
            for ky in range(kh):
                for kx in range(kw):
                    dense += 1
                    iy, ix = oy * sh - ph + ky * dh, ox * sw - pw + kx * dw
                    executed += 0 <= iy < h and 0 <= ix < w
    per_pair = n * conv.out_channels * (c // conv.groups)
    return dense * per_pair, executed * per_pair


def test_conv_macs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        k = rng.choice([1, 3, 3, 5, 7])
        d = rng.randint(1, 12)
        s = rng.choice([1, 1, 2])
        h, w = rng.randint(1, 20), rng.randint(1, 20)
        groups = rng.choice([1, 2])
        if rng.random() < 0.2 and s == 1:
            padding = "same"
        else:
            padding = (rng.randint(0, d * (k // 2) + 2), rng.randint(0, d * (k // 2) + 2))
        conv = nn.Conv2d(4, 6, k, stride=s, padding=padding, dilation=d, groups=groups, device="meta")
        ph, pw = H._conv_padding(conv)
        if min(h + 2 * ph, w + 2 * pw) < d * (k - 1) + 1:
            continue  # the kernel does not fit: no output, not a valid conv
        shape = (2, 4, h, w)
        assert H.conv_macs(conv, shape) == brute_force_macs(conv, shape), (k, d, s, h, w, padding, groups)


def test_executed_fraction_of_design_rates():
    """docs/DESIGN.md: at OS16 (33x33, rates 6/12/18) and OS8 (65x65, rates 12/24/36) only 77% / 57% /
    40% of a dilated 3x3's (pixel, tap) pairs lie inside the image; at rate >= size only the centre."""
    for size, rates in ((33, (6, 12, 18)), (65, (12, 24, 36))):
        fracs = [H.valid_taps_1d(size, 3, 1, r, r) ** 2 / (9 * size * size) for r in rates]
        assert [round(f, 2) for f in fracs] == [0.77, 0.57, 0.40]
    assert H.valid_taps_1d(9, 3, 1, 9, 9) == 9  # rate 9 on a 9-pixel axis: one tap per pixel


def test_count_macs_of_an_aspp():
    n, c, o, hw, rates = 2, 16, 8, 9, (2, 4, 6)
    with torch.device("meta"):
        aspp = ASPP(c, rates, o).eval()
        dense, executed, out = H.count_macs(aspp, torch.empty(n, c, hw, hw))
    assert tuple(out.shape) == (n, o, hw, hw)
    pix = n * hw * hw
    one_by_one = pix * c * o + n * c * o + pix * (len(rates) + 2) * o * o  # 1x1, pooling conv, projection
    assert dense == one_by_one + len(rates) * pix * 9 * c * o
    assert executed == one_by_one + sum(n * c * o * H.valid_taps_1d(hw, 3, 1, r, r) ** 2 for r in rates)


def test_interleaved_rotates_and_survives_a_failing_runner():
    calls = []

    def runner(name, fail_at=None):
        def run(i):
            calls.append(name)
            if i == fail_at:
                raise RuntimeError("boom")
            return 1.0
        return run

    times, errors = H.interleaved({"a": runner("a"), "b": runner("b"), "c": runner("c", fail_at=1)},
                                  {"a": 3, "b": 2, "c": 3})
    assert calls == ["a", "b", "c", "b", "c", "a", "a"]  # order rotates each round; c stops at its failure
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 2, "c": 1}
    assert list(errors) == ["c"] and str(errors["c"]) == "boom"


def test_percentile_and_budget():
    assert H.percentile([4, 1, 3, 2], 50) == 2.5
    assert H.percentile([1, 2, 3, 4, 5], 20) == pytest.approx(1.8)
    b = H.Budget(warmup=1, budget_s=1.0, min_runs=5, max_runs=40, cap_s=8.0, slow_runs=3)
    assert b.runs_for(10.0) == 40      # fast: capped by max_runs
    assert b.runs_for(100.0) == 10     # budget / time
    assert b.runs_for(1000.0) == 5     # min_runs
    assert b.runs_for(3000.0) == 3     # min_runs would exceed cap_s: slow_runs


# --------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = R.main(["--cases", "tiny", "--providers", "eager_cl,fused_torch", "--device", "cpu", "--quick",
                 "--min-runs", "3", "--max-runs", "3", "--out", str(out)])
    files = sorted(os.listdir(out))
    return rc, out, files


def test_tiny_run_writes_the_schema(tiny_run):
    rc, out, files = tiny_run
    assert rc == 0
    stem = [f[:-5] for f in files if f.endswith(".json")]
    assert len(stem) == 1 and stem[0].endswith("_" + H.device_slug(torch.device("cpu")))
    assert stem[0] + ".md" in files
    try:
        import matplotlib  # noqa: F401  (installed: the chart must be there)
        assert stem[0] + ".png" in files
    except ImportError:
        assert stem[0] + ".png" not in files
    with open(os.path.join(out, stem[0] + ".json")) as f:
        doc = json.load(f)
    recs = doc["records"]
    assert sorted(r["provider"] for r in recs) == ["eager_cl", "fused_torch"]
    for r in recs:
        for key, typ in SCHEMA.items():
            assert key in r and isinstance(r[key], typ), (key, r.get(key))
        assert (r["case"], r["mode"], r["dtype"], r["batch"]) == ("tiny", "infer", "fp32", 2)
        assert 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["runs"] == 3
        assert 0 < r["tflops_executed"] < r["tflops_dense"]  # rates 4 and 6 on a 9x9 map read padding
        assert r["device"] == doc["meta"]["device"]
        # The roofline bound beside each time: nothing measured may beat it.
        assert 0 < r["roofline_ms"] <= r["ms_median"] and 0 < r["pct_of_roofline"] <= 100
        assert r["copy_gbps"] > 0 and r["min_bytes_mb"] > 0
    assert [r["speedup_vs_eager_cl"] for r in recs if r["provider"] == "eager_cl"] == [1.0]
    assert doc["meta"]["peak_mem_source"]
    assert doc["skipped"] == []


def test_compare_flags_a_regression(tiny_run):
    _, out, files = tiny_run
    with open(os.path.join(out, [f for f in files if f.endswith(".json")][0])) as f:
        new = json.load(f)["records"]
    old = copy.deepcopy(new)
    old[0]["ms_median"] = new[0]["ms_median"] / 2      # now twice as slow: a regression
    old[1]["ms_median"] = new[1]["ms_median"] * 1.04   # faster than before: not flagged
    rows, regressions = REP.compare(old, new)
    assert len(rows) == 2
    assert [(g["case"], g["provider"]) for g in regressions] == [(new[0]["case"], new[0]["provider"])]
    old[1]["ms_median"] = new[1]["ms_median"] / 1.04   # 4% slower: within the 5% threshold
    assert len(REP.compare(old, new)[1]) == 1
    old[1]["ms_median"] = new[1]["ms_median"] / 1.06   # 6% slower: flagged
    assert len(REP.compare(old, new)[1]) == 2
    other = dict(old[0], batch=old[0]["batch"] + 1)     # records match on case/provider/mode/dtype/batch
    assert REP.compare([other], new) == ([], [])


def test_cli_compare_exit_status(tiny_run, tmp_path, capsys):
    _, out, files = tiny_run
    with open(os.path.join(out, [f for f in files if f.endswith(".json")][0])) as f:
        doc = json.load(f)
    for r in doc["records"]:
        r["ms_median"] = 1e-6  # an impossibly fast past: every record has regressed
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    rc = R.main(["--cases", "tiny", "--providers", "fused_torch", "--device", "cpu", "--quick", "--min-runs", "2",
                 "--max-runs", "2", "--out", str(tmp_path / "new"), "--compare", str(old)])
    assert rc == 1
    assert "REGRESSION" in capsys.readouterr().out
    (new_json,) = [p for p in (tmp_path / "new").iterdir() if p.suffix == ".json"]
    regressions = json.loads(new_json.read_text())["regressions"]
    assert [(g["provider"], g["case"]) for g in regressions] == [("fused_torch", "tiny")]


def test_sigterm_writes_the_groups_measured_so_far(tmp_path, monkeypatch):
    # A time limit (`timeout`, the gpu-check budget) ends a run with SIGTERM: the groups already
    # measured must still be written, marked as interrupted, with a nonzero exit status.
    real = R.measure_group
    calls = []

    def measure_then_terminate(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler run.main installed
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "measure_group", measure_then_terminate)
    rc = R.main(["--cases", "tiny", "--providers", "fused_torch", "--device", "cpu", "--modes", "infer,train",
                 "--quick", "--min-runs", "2", "--max-runs", "2", "--out", str(tmp_path)])
    assert rc == 130
    assert calls == ["infer", "train"]
    assert signal.getsignal(signal.SIGTERM) is not R._raise_interrupted  # handler restored
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    doc = json.loads(path.read_text())
    assert doc["meta"]["interrupted"] == "SIGTERM after 1 of 2 groups"
    assert [(r["provider"], r["mode"]) for r in doc["records"]] == [("fused_torch", "infer")]
    assert any(n.startswith("INTERRUPTED") for n in doc["meta"]["notes"])


# --------------------------------------------------------------------------- what a new user sees


def test_default_out_is_not_the_committed_results(tmp_path, monkeypatch, capsys):
    """The default --out is ./bench-results (gitignored); benchmarks/results/ only when asked."""
    args = R.parse_args([])
    assert args.out == "bench-results"
    assert args.compile_mode == "default"
    monkeypatch.chdir(tmp_path)
    committed = os.path.join(ROOT, "benchmarks", "results")
    before = sorted(os.listdir(committed))
    rc = R.main(["--cases", "tiny", "--providers", "eager_cl,fused_triton", "--device", "cpu", "--quick",
                 "--min-runs", "2", "--max-runs", "2"])
    assert rc == 0
    assert sorted(os.listdir(committed)) == before
    (json_path,) = [p for p in (tmp_path / "bench-results").iterdir() if p.suffix == ".json"]
    doc = json.loads(json_path.read_text())
    assert doc["meta"]["compile_mode"] == "default" and doc["meta"]["cuda_graphs"] is False
    # fused_triton is skipped on CPU: its reason is printed once, not once live and once at the end
    captured = capsys.readouterr()
    reason = doc["skipped"][0]["reason"]
    assert (captured.out + captured.err).count(reason) == 1, captured


def test_progress_counts_the_group_in_flight(monkeypatch, capsys):
    """Without tqdm and a terminal: [1/2] while the first group runs (it read [0/2] for a whole group)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    p = R.Progress(2)
    assert p.bar is None
    p.tty = False
    p.status("a: warm-up x")
    p.advance()
    p.status("b: warm-up x")
    p.advance()
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[1/2] a: warm-up x", "[2/2] b: warm-up x"]


def test_compile_mode_flag_reaches_the_provider():
    from benchmarks import cases as C

    twin = ASPP(4, (2,), 4).eval()
    prov = C.make_provider("compile", C.CASES["tiny"], twin, torch.device("cpu"), "reduce-overhead")
    assert "reduce-overhead" in prov.note
    with pytest.raises(SystemExit):
        R.parse_args(["--compile-mode", "fastest"])


def test_compile_of_the_converted_model_is_a_provider():
    """compile_fused_torch: torch.compile of what fused_torch runs, same numbers."""
    from benchmarks import cases as C

    twin = C.randomize_bn(C.CASES["tiny"].build("cpu")[0]).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    fused = C.make_provider("fused_torch", C.CASES["tiny"], twin, torch.device("cpu"))
    compiled = C.make_provider("compile_fused_torch", C.CASES["tiny"], twin, torch.device("cpu"))
    assert "torch.compile(" in compiled.note and "backend='torch'" in compiled.note
    with torch.no_grad():
        assert torch.allclose(compiled.module(x), fused.module(x), rtol=1e-5, atol=1e-5)


def test_roofline_bound_is_the_slower_of_compute_and_memory():
    # 1 GMAC at 2 TFLOP/s is 1 ms; 100 MB at 50 GB/s is 2 ms: memory-bound, 2 ms.
    assert H.roofline_ms(1e9, 100e6, 2.0, 50.0) == pytest.approx(2.0)
    assert H.roofline_ms(4e9, 100e6, 2.0, 50.0) == pytest.approx(4.0)  # compute-bound
    # Training moves the tensors again (gradients, the backward's re-reads); an input that needs
    # no gradient (a whole model's images) writes none.
    infer = H.step_bytes(10, 100, 50, "infer", False)
    assert infer == 160
    assert H.step_bytes(10, 100, 50, "train", True) == 160 + 50 + 100 + 20 + 100
    assert H.step_bytes(10, 100, 50, "train", False) == 160 + 50 + 100 + 20


def test_work_only_reports_the_plans_issued_multiply_adds(tmp_path):
    """--work-only times nothing: each head's dense / valid / issued MACs per provider, the torch
    backend's from the ATen convs its region plan asks for, the Triton figures from its own
    launches' plans at the GPU tile, the CUDA figures from the host half of the CUDA glue's plan
    (docs/DESIGN.md's standard OS16 head: issued within 5% of the valid work; the sum-mode v2
    head's Triton tile kernel has no plan to count, the CUDA tile plan has)."""
    pytest.importorskip("triton")
    rc = R.main(["--work-only", "--cases", "aspp_v3_os16,aspp_v2_os8", "--size", "gpu", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.load(open(os.path.join(str(tmp_path), "work_gpu.json")))
    recs = {(r["case"], r["provider"]): r for r in doc["records"]}
    assert set(recs) == {(c, p) for c in ("aspp_v3_os16", "aspp_v2_os8")
                         for p in ("eager_cl", "fused_torch_regions", "fused_triton", "fused_cuda")}
    for case in ("aspp_v3_os16", "aspp_v2_os8"):
        # the torch backend's region convs issue exactly the valid work
        t = recs[(case, "fused_torch_regions")]
        assert t["issued_macs"] == t["valid_macs"] < 0.75 * t["dense_macs"], t
    tri = recs[("aspp_v3_os16", "fused_triton")]
    assert tri["tile"] == [128, 128] and "partial" not in tri
    assert tri["valid_macs"] < tri["issued_macs"] <= 1.05 * tri["valid_macs"] < tri["dense_macs"]
    v2 = recs[("aspp_v2_os8", "fused_triton")]
    assert v2["issued_macs"] is None and "tap_conv" in v2["partial"]
    # CUDA: the same region plan and tile as Triton for the concat head, so the same count; the
    # v2 head (sum mode, 21 classes in one 128-column block) runs the tile plan, column slack included
    cu = recs[("aspp_v3_os16", "fused_cuda")]
    assert "partial" not in cu and (cu["dense_macs"], cu["valid_macs"], cu["issued_macs"]) == (
        tri["dense_macs"], tri["valid_macs"], tri["issued_macs"])
    cu2 = recs[("aspp_v2_os8", "fused_cuda")]
    assert cu2["valid_macs"] == recs[("aspp_v2_os8", "fused_torch_regions")]["valid_macs"]
    assert cu2["issued_macs"] > 128 / 21 * cu2["valid_macs"]


def test_records_carry_the_issued_work_of_the_providers_plan():
    """benchmarks/work.issued_for: what a provider's own plan issues, for the benchmark's records
    (gmacs_issued, tflops_issued): the CUDA plan counted on the host (region plan, and the tile
    plan of fused_cpp_tiles), none with a reason where there is no plan to count."""
    from benchmarks import cases as C
    from benchmarks import work as W

    case = C.CASES["aspp_v3_os16"]
    regions, why = W.issued_for(case, "gpu", 16, "fused_cpp", "cuda")
    tiles, _ = W.issued_for(case, "gpu", 16, "fused_cpp_tiles", "cuda")
    dense, executed, _, _ = C.meta_macs(case, "gpu", 16)
    assert why is None and executed < regions <= 1.05 * executed < tiles < dense
    for provider, device in (("eager_cl", "cuda"), ("compile", "cuda"), ("fused_cpp", "cpu")):
        issued, why = W.issued_for(case, "gpu", 16, provider, device)
        assert issued is None and why, (provider, device)
