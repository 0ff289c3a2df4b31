"""tools/gpu_check.sh (`make gpu-check`) without a GPU: the plan, and a dry run whose stages are stubs.

The GPU call it stands for has ~540 s and returns at most 8 files: the plan must fit, every
stage must be stopped at its budget, and a failing or hanging stage must not lose the results
of the others. GPU_CHECK_DRY_RUN=1 replaces each stage's body by a stub (GPU_CHECK_STUB_<STAGE>
= ok | fail | hang | sleep:S); the main loop, the timeouts and the packing are the real ones.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
ORDER = ["env", "build", "triton", "matrix", "bench", "sanitize", "tests"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(out, env=None, args=(), timeout=60):
    e = dict(os.environ, PYTHON=sys.executable)
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run(["bash", SCRIPT] + ([str(out)] if out else []) + list(args), env=e, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.monotonic() - t0


def summary(out):
    lines = open(os.path.join(out, "summary.txt")).read().splitlines()
    return [ln.split(": ", 1)[0] for ln in lines], dict(ln.split(": ", 1) for ln in lines)


def check_outputs(out):
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8, files
    for f in files:
        assert os.path.getsize(f) <= 16 * 2**20, f
        assert not f.endswith(".so"), f
        assert not os.path.basename(f).startswith("."), "temporary file left behind: %s" % f
    return {os.path.basename(f) for f in files}


def test_plan_fits_the_call_in_order():
    p, _ = run(None, args=["--plan"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert re.match(r"gpu-check plan: 540 s in all, 15 s", lines[0]), lines[0]
    names = [ln.split()[0] for ln in lines[1:]]
    assert names == ORDER + ["(pack)"]
    ends = [int(re.search(r"until (\d+) s", ln).group(1)) for ln in lines[1:]]
    assert ends == sorted(ends) and ends[-1] == 540
    budgets = {ln.split()[0]: int(ln.split()[1]) for ln in lines[1:] if "parallel" not in ln}
    assert sum(budgets.values()) == 540
    assert all(b > 0 for b in budgets.values()), budgets
    assert "triton    in parallel with build, until %d s" % ends[1] in p.stdout  # shares build's slot


def test_dry_run_failing_and_hanging_stages_lose_nothing(tmp_path):
    hang_s = str(90000 + os.getpid() % 5000)  # a unique `sleep` to look for afterwards
    # env, matrix and sanitize get 3 s although their stubs are instant: the script counts whole
    # seconds (date +%s), so a 1 s stage that starts late in a second on a loaded machine has 0 s
    # left (CI saw env skipped so); and a hung stage's kill grace, with the summary rewritten after
    # it, can run a second or two past its budget, which comes out of the next stage's (CI saw a
    # 1 s matrix skipped so, after the hung triton).
    env = {"GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_BUDGET_S": "18", "GPU_CHECK_RESERVE_S": "2",
           "GPU_CHECK_BUDGET_ENV": "3", "GPU_CHECK_BUDGET_BUILD": "3", "GPU_CHECK_BUDGET_MATRIX": "3",
           "GPU_CHECK_BUDGET_BENCH": "2", "GPU_CHECK_BUDGET_SANITIZE": "3", "GPU_CHECK_HANG_S": hang_s,
           "GPU_CHECK_STUB_BUILD": "sleep:1", "GPU_CHECK_STUB_TRITON": "hang", "GPU_CHECK_STUB_MATRIX": "fail",
           "GPU_CHECK_STUB_BENCH": "hang"}
    p, took = run(tmp_path, env)
    assert p.returncode != 0, p.stdout  # a stage failed, two ran out of time
    assert took < 18 + 5, took  # the budget holds (plus the hung stubs' kill grace)
    names, lines = summary(tmp_path)
    assert names == ORDER, p.stdout
    assert lines["env"].startswith("ok"), lines
    assert lines["build"].startswith("ok") and "slept 1 s" in lines["build"], lines
    # triton hangs: stopped at build's end (3 s + env's 3 s), not at the end of the call. The
    # script counts whole seconds (date +%s), so a stage's length reads up to 1 s long.
    m = re.match(r"out of time \(stopped after (\d+) s", lines["triton"])
    assert m and int(m.group(1)) <= 6 + 1, lines["triton"]
    assert lines["matrix"].startswith("FAILED (exit 1") and "stub matrix failed" in lines["matrix"], lines
    m = re.match(r"out of time \(stopped after (\d+) s", lines["bench"])
    # its 2 s plus what matrix left unused (at most its 3 s), not the rest of the call (16 s)
    assert m and int(m.group(1)) <= 2 + 3 + 1, lines["bench"]
    # ... and the stages after them still ran
    assert lines["sanitize"].startswith("ok") and lines["tests"].startswith("ok"), lines
    files = check_outputs(tmp_path)
    assert {"summary.txt", "results.json", "logs.tar.gz"} <= files
    doc = json.load(open(os.path.join(tmp_path, "results.json")))
    assert doc["stages"] == lines
    assert {"build", "triton", "matrix", "bench", "sanitize", "tests"} <= set(doc), sorted(doc)  # each stub's part
    with tarfile.open(os.path.join(tmp_path, "logs.tar.gz")) as tar:
        logs = {os.path.basename(n) for n in tar.getnames()}
    assert {"%s.log" % s for s in ORDER} <= logs, logs
    left = subprocess.run(["pgrep", "-f", "sleep %s" % hang_s], capture_output=True, text=True).stdout
    assert not left.strip(), "a hung stage's process outlived the call: %s" % left


def test_dry_run_build_failure_skips_what_needs_it(tmp_path):
    env = {"GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_BUDGET_S": "8", "GPU_CHECK_RESERVE_S": "1",
           "GPU_CHECK_STUB_BUILD": "fail", "GPU_CHECK_STAGES": "env build matrix bench sanitize"}
    p, _ = run(tmp_path, env)
    assert p.returncode != 0
    names, lines = summary(tmp_path)
    assert names == ORDER
    assert lines["build"].startswith("FAILED")
    assert lines["matrix"].startswith("skipped (the build failed")
    assert lines["sanitize"].startswith("skipped (the build failed")
    assert lines["bench"].startswith("ok")  # eager / compile / Triton providers need no build
    assert lines["triton"] == lines["tests"] == "skipped (not in GPU_CHECK_STAGES)"
    check_outputs(tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_real_run_without_a_gpu_says_so_for_every_stage(tmp_path):
    # env's real body imports torch and triton (python -m aspp_fused.info): 60 s rather than its
    # 15 s, which a machine running other heavy jobs was seen to exceed.
    p, _ = run(tmp_path, {"GPU_CHECK_BUDGET_S": "120", "GPU_CHECK_BUDGET_ENV": "60"}, timeout=150)
    names, lines = summary(tmp_path)
    assert names == ORDER, p.stdout + p.stderr
    assert lines["env"].startswith("ok") and "no CUDA device" in lines["env"], lines["env"]
    for s in ORDER[1:]:
        assert lines[s] == "skipped (no CUDA device here)", (s, lines[s])
    doc = json.load(open(os.path.join(tmp_path, "results.json")))
    assert doc["env"]["gpu"] is None and doc["env"]["torch"]
    check_outputs(tmp_path)


def test_autotune_switch_keeps_the_first_config():
    """ASPP_FUSED_TRITON_AUTOTUNE=0 (set by the matrix and bench stages): one config per kernel and
    launch. tap_conv keeps the first config of each column width, and its per-launch prune
    (fit_column_tile) leaves one of them, so nothing is benchmarked there either."""
    pytest.importorskip("triton")
    code = ("from aspp_fused.kernels import atrous_conv as a, separable_conv as s; "
            "k = a.tap_conv_kernel.configs; "
            "print(len(k), len({c.kwargs['BN'] for c in a.FWD_CONFIGS}), "
            "max(len(a.fit_column_tile(k, {'NMAX': n})) for n in (1, 21, 64, 256)), "
            "len(a.tap_wgrad_kernel.configs), len(s.sep_conv_kernel.configs), k[0] is a.FWD_CONFIGS[0])")
    counts = {}
    for switch in ("0", "1"):
        env = dict(os.environ, ASPP_FUSED_TRITON_AUTOTUNE=switch, TRITON_INTERPRET="0")
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        counts[switch] = p.stdout.split()
    kept, widths, per_launch, wgrad, sep, first = counts["0"]
    assert (kept, per_launch, wgrad, sep, first) == (widths, "1", "1", "1", "True"), counts
    assert int(counts["1"][0]) > int(widths) and all(int(n) > 1 for n in counts["1"][3:5]), counts


def test_matrix_script_runs_its_cells_on_cpu(tmp_path):
    """tools/gpu_matrix.py (the matrix stages) on the CPU kernels: records, JSON, KEY line."""
    from aspp_fused import _extension

    if not _extension.cpp_available():
        pytest.skip("aspp_fused._C not built")
    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_matrix.py"), "--device", "cpu",
                        "--backends", "cpp", "--size", "smoke", "--cases", "aspp_v3_os16", "--dtypes", "fp32",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("KEY: 3/3 cells ok"), p.stdout
    recs = json.load(open(out))["records"]
    assert [r["mode"] for r in recs] == ["eval", "train", "backward"]
    assert all(r["ok"] and r["err"] <= r["limit"] for r in recs), recs
    assert any(q.endswith("running_var") for q in recs[1]["quantities"])  # the first-call statistics
    assert "grad x" in recs[2]["quantities"]
