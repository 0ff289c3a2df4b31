#!/usr/bin/env bash
# `make gpu-check`: everything that needs a GPU in one call of about 9 minutes, staged by value,
# every stage's result written as it finishes (docs/DESIGN.md, "Running on a GPU").
#
#   tools/gpu_check.sh [OUT_DIR]     (default: $GPU_CHECK_OUT or gpu-check-out)
#   tools/gpu_check.sh --plan        print the stages and their budgets, then exit
#
# Stages, in order (each may use the time the stages before it left unused, never the budget
# of a stage after it; GPU_CHECK_BUDGET_<STAGE>=S overrides one budget):
#   env       15 s  nvidia-smi, versions, python -m aspp_fused.info; the GPU's arch ("9.0a" on Hopper)
#   build    180 s  pip install -e . for that one arch (TORCH_CUDA_ARCH_LIST), MAX_JOBS = cores; with
#                   GPU_CHECK_PREBUILT=DIR the extension of an earlier run (DIR/_C*.so) instead
#   triton   (build's 180 s, in parallel: it needs no build) tools/gpu_matrix.py --backends triton
#   matrix    90 s  tools/gpu_matrix.py --backends cuda: smoke shapes, then the standard sizes
#   bench    150 s  python -m benchmarks: os16 / os8, bf16, batch 16, infer then train,
#                   torch.compile in --compile-mode default
#   sanitize  60 s  tools/sanitize_cuda.sh: memcheck, racecheck, synccheck on small cases
#   tests     rest  pytest -m gpu (-n when pytest-xdist is there)
# The matrix and the benchmark restrict Triton's autotuning to one config
# (ASPP_FUSED_TRITON_AUTOTUNE=0; GPU_CHECK_BENCH_AUTOTUNE=1 tunes the benchmark's kernels fully).
#
#   GPU_CHECK_BUDGET_S   (default 540) seconds for the whole call, GPU_CHECK_RESERVE_S (15) of them
#                        kept for packing; GPU_CHECK_STAGES: the stages to run (default: all)
#   GPU_CHECK_KEEP_BUILD=DIR  copy the built extension (aspp_fused/_C*.so) to DIR
#   GPU_CHECK_DRY_RUN=1  every stage body is a stub (how tests/test_gpu_check.py checks the plan on
#                        a CPU): GPU_CHECK_STUB_<STAGE>= ok (default) | fail | hang | sleep:S
#   PYTHON               default python, else python3
#
# OUT_DIR receives at most 8 files, each rewritten as a stage finishes: summary.txt (one line
# per stage: ok / FAILED / out of time / skipped (why), with its key numbers), results.json
# (the plan, every stage's status, the environment, the matrix records, the benchmark
# records), bench.json / bench.md / bench.png (the benchmark's own files) and logs.tar.gz
# (every log). Never the .so. Exit status: nonzero when a stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/tools/gpu_check.sh

STAGE_ORDER=(env build triton matrix bench sanitize tests)
declare -A BUDGET_OF=([env]=15 [build]=180 [triton]=0 [matrix]=90 [bench]=150 [sanitize]=60 [tests]=0)
for s in "${STAGE_ORDER[@]}"; do
    v="GPU_CHECK_BUDGET_${s^^}"
    [ -n "${!v:-}" ] && BUDGET_OF[$s]=${!v}
done
TOTAL=${GPU_CHECK_BUDGET_S:-540}
RESERVE=${GPU_CHECK_RESERVE_S:-15}
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export PYTHON PYTHONUNBUFFERED=1

# end_of STAGE: seconds after the start by which STAGE must be done. triton shares build's slot;
# tests, the last, ends at the total less the reserve.
end_of() {
    local t=0 s
    for s in "${STAGE_ORDER[@]}"; do
        [ "$s" = triton ] && { [ "$1" = triton ] && { end_of build; return; }; continue; }
        [ "$s" = tests ] && { echo $(( TOTAL - RESERVE )); return; }
        t=$(( t + ${BUDGET_OF[$s]} ))
        [ "$s" = "$1" ] && { echo $t; return; }
    done
}

print_plan() {
    local s prev=0 e
    echo "gpu-check plan: ${TOTAL} s in all, ${RESERVE} s of them kept for packing the results"
    for s in "${STAGE_ORDER[@]}"; do
        e=$(end_of "$s")
        if [ "$s" = triton ]; then
            echo "  $(printf '%-9s' "$s") in parallel with build, until ${e} s"
        else
            echo "  $(printf '%-9s' "$s") $(printf '%4d' $(( e - prev ))) s  until ${e} s"
            prev=$e
        fi
    done
    echo "  (pack)    $(printf '%4d' "$RESERVE") s  until ${TOTAL} s"
}

# ----------------------------------------------------------------------------- stage bodies
# `gpu_check.sh --stage NAME`: one stage's body, run under `timeout` by the main loop (so it
# can be stopped, with everything it started). Its log is its stdout; its last "KEY:" line
# is its summary; parts it measured go to $GPU_CHECK_WORK/parts/NAME*.json.

stage_body() {
    local name=$1 parts=$GPU_CHECK_WORK/parts
    if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
        local v="GPU_CHECK_STUB_${name^^}"
        local how=${!v:-ok}
        echo "stub $name: $how"
        echo "{\"stub\": \"$name\", \"how\": \"$how\"}" >"$parts/$name.json"
        case $how in
            ok) echo "KEY: stub $name ok"; return 0 ;;
            fail) echo "KEY: stub $name failed"; return 1 ;;
            hang) sleep "${GPU_CHECK_HANG_S:-100000}"; return 0 ;;
            sleep:*) sleep "${how#sleep:}"; echo "KEY: stub $name slept ${how#sleep:} s"; return 0 ;;
            *) echo "GPU_CHECK_STUB_${name^^}: got '$how', expected ok, fail, hang or sleep:S"; return 2 ;;
        esac
    fi
    case $name in
        env)
            command -v nvidia-smi >/dev/null && nvidia-smi
            echo "PYTHON=$PYTHON ($(command -v "$PYTHON")); $(nproc) cores"
            "$PYTHON" -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy|pytest|pytest-xdist|torchvision) "
            command -v nvcc >/dev/null && nvcc --version | tail -2
            command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)"
            "$PYTHON" - "$parts/env.json" <<'EOF'
import json, os, platform, sys
import torch
d = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
     "torch_cuda": torch.version.cuda, "cores": os.cpu_count(), "gpu": None, "arch": None}
try:
    import triton
    d["triton"] = triton.__version__
except Exception as exc:
    d["triton"] = None
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability(0)
    d["gpu"] = torch.cuda.get_device_name(0)
    # 9.0a: Hopper's wgmma / setmaxnreg need the arch-specific target, not plain 9.0.
    d["arch"] = "%d.%d%s" % (major, minor, "a" if major == 9 else "")
json.dump(d, open(sys.argv[1], "w"), indent=1)
print("KEY: %s, arch %s, torch %s, triton %s, %d cores" % (d["gpu"] or "no CUDA device", d["arch"], d["torch"],
                                                          d["triton"], d["cores"]))
EOF
            local rc=$?
            echo "--- python -m aspp_fused.info (before the build)"
            "$PYTHON" -m aspp_fused.info
            return $rc ;;
        build)
            local arch
            arch=$(cat "$GPU_CHECK_WORK/arch")
            if [ -z "$arch" ]; then  # env was not run: ask the device here
                arch=$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(0); \
print('%d.%d%s' % (m, n, 'a' if m == 9 else ''))") || return 2
            fi
            export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)}
            echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
            if [ -n "${GPU_CHECK_PREBUILT:-}" ]; then
                ls "$GPU_CHECK_PREBUILT"/_C*.so >/dev/null 2>&1 || {
                    echo "KEY: no _C*.so in GPU_CHECK_PREBUILT=$GPU_CHECK_PREBUILT"; return 2; }
                # The editable install still maps aspp_fused.kernels to kernels/; built without
                # CUDA it compiles only the CPU kernels, then the prebuilt library replaces it.
                ASPP_FUSED_SKIP_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || return $?
                cp "$GPU_CHECK_PREBUILT"/_C*.so aspp_fused/ && echo "using the prebuilt extension"
            else
                ASPP_FUSED_FORCE_CUDA=1 "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . || {
                    local rc=$?; echo "KEY: pip install -e . failed (exit $rc)"; return $rc; }
            fi
            "$PYTHON" - <<'EOF'
import os, sys
import torch
from aspp_fused import _extension
ok = torch.cuda.is_available() and _extension.cuda_kernels_built()
print("KEY: arch %s, MAX_JOBS %s, CUDA kernels %s" % (os.environ["TORCH_CUDA_ARCH_LIST"], os.environ["MAX_JOBS"],
      "built and loaded" if ok else "NOT available (%s)" % (_extension.LOAD_ERROR or "built without CUDA")))
sys.exit(0 if ok else 3)
EOF
            ;;
        triton)
            # Runs while build writes aspp_fused/: a private copy of the Python package (no _C:
            # the Triton ops need none) with kernels/ as aspp_fused.kernels.
            local py=$GPU_CHECK_TMP/triton_py
            mkdir -p "$py" && cp -r aspp_fused "$py/" && rm -f "$py"/aspp_fused/_C*.so
            ln -sfn "$ROOT/kernels" "$py/aspp_fused/kernels"
            PYTHONPATH=$py ASPP_FUSED_TRITON_AUTOTUNE=0 "$PYTHON" tools/gpu_matrix.py --backends triton \
                --json "$parts/matrix_triton.json" --expect-package "$py/aspp_fused" ;;
        matrix)
            ASPP_FUSED_TRITON_AUTOTUNE=0 "$PYTHON" tools/gpu_matrix.py --backends cuda \
                --json "$parts/matrix_cuda.json" ;;
        bench)
            # Default compile mode: max-autotune compiles for minutes. --budget-s 1: timed runs per
            # provider and group; the warm-ups and the first (compiling) call come on top. Not
            # compile_fused_torch: a second compile per group would not fit the stage's 150 s
            # (BENCH_ARGS="--providers ...,compile_fused_torch" asks for it).
            ASPP_FUSED_TRITON_AUTOTUNE=${GPU_CHECK_BENCH_AUTOTUNE:-0} "$PYTHON" -m benchmarks \
                --cases aspp_v3_os16,aspp_v3_os8 --dtypes bf16 --modes infer,train --batch 16 \
                --providers eager_cl,compile,fused_torch,fused_torch_regions,fused_cpp,fused_cpp_tiles,fused_triton --compile-mode default \
                --budget-s 1 --out "$GPU_CHECK_WORK/bench" ${BENCH_ARGS:-} ;;
        sanitize)
            # A few small cases per kernel family (atrous and separable, eval and train, bf16 and
            # fp32), each tool under a third of the stage's time.
            SANITIZER_TIMEOUT_S=$(( ${GPU_CHECK_STAGE_LEFT:-60} / 3 )) \
                SANITIZE_SELECT="2x16x9x11 and (bfloat16 or float32)" \
                tools/sanitize_cuda.sh "$GPU_CHECK_WORK/sanitizer"
            local rc=$?
            echo "KEY: $(grep -hE "^sanitize_cuda: [a-z]+ rc=" "$GPU_CHECK_WORK"/sanitize.log 2>/dev/null |
                sed -E 's/^sanitize_cuda: ([a-z]+) rc=([0-9]+) in ([0-9]+)s.*SUMMARY: ([0-9]+) (error|hazard)s?.*/\1 rc=\2 \4 \5s (\3 s)/' |
                paste -sd ';' -)"
            return $rc ;;
        tests)
            local extra=()
            "$PYTHON" -c "import xdist" 2>/dev/null && extra+=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
            "$PYTHON" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 300)
            # The first config of each Triton kernel (no autotuning): every GPU case of every kernel
            # set (tests/test_op_dtypes.py alone holds about 170 Triton ones) in the stage's time.
            ASPP_FUSED_TRITON_AUTOTUNE=0 \
                "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "${extra[@]}" ${GPU_CHECK_PYTEST_ARGS:-}
            local rc=$?
            echo "KEY: $(grep -E "(passed|failed|error|no tests ran)" "$GPU_CHECK_WORK/tests.log" | tail -1)"
            return $rc ;;
    esac
}

if [ "${1:-}" = --plan ]; then print_plan; exit 0; fi
if [ "${1:-}" = --stage ]; then stage_body "$2" 2>&1; exit $?; fi

# ----------------------------------------------------------------------------- the main loop

OUT=${1:-${GPU_CHECK_OUT:-gpu-check-out}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
GPU_CHECK_TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
GPU_CHECK_WORK=$GPU_CHECK_TMP/logs    # packed into logs.tar.gz
mkdir -p "$GPU_CHECK_WORK/parts" "$GPU_CHECK_WORK/status"
export GPU_CHECK_WORK GPU_CHECK_TMP
rm -f "$OUT"/summary.txt "$OUT"/results.json "$OUT"/bench.* "$OUT"/logs.tar.gz
T0=$(date +%s)
WANT=" ${GPU_CHECK_STAGES:-${STAGE_ORDER[*]}} "
print_plan | tee "$GPU_CHECK_WORK/plan.txt"

# status NAME LINE: records a stage's summary line; every write re-renders the outputs.
status() { echo "$2" >"$GPU_CHECK_WORK/status/$1"; publish; }

publish() {
    local tmp s
    tmp=$(mktemp "$OUT/.summary.XXXXXX")
    for s in "${STAGE_ORDER[@]}"; do
        if [ -f "$GPU_CHECK_WORK/status/$s" ]; then echo "$s: $(cat "$GPU_CHECK_WORK/status/$s")"; fi
    done >"$tmp"
    chmod 644 "$tmp" && mv -f "$tmp" "$OUT/summary.txt"
    # The benchmark's own files, under fixed names.
    for ext in json md png; do
        f=$(ls -t "$GPU_CHECK_WORK"/bench/*."$ext" 2>/dev/null | head -1)
        [ -n "$f" ] && cp -f "$f" "$OUT/bench.$ext"
    done
    "$PYTHON" - "$GPU_CHECK_WORK" "$OUT" "$T0" <<'EOF' 2>>"$GPU_CHECK_WORK/publish.log"
import glob, json, os, sys, time
work, out, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
doc = {"plan": open(os.path.join(work, "plan.txt")).read().splitlines(), "elapsed_s": int(time.time()) - t0,
       "stages": {}, "matrix": []}
for line in open(os.path.join(out, "summary.txt")):
    name, _, rest = line.rstrip("\n").partition(": ")
    doc["stages"][name] = rest
for path in sorted(glob.glob(os.path.join(work, "parts", "*.json"))):
    key = os.path.basename(path)[:-5]
    try:
        part = json.load(open(path))
    except ValueError:
        continue  # being written
    if key.startswith("matrix_") and "records" in part:
        doc["matrix"] += part["records"]
    else:
        doc[key] = part
bench = os.path.join(out, "bench.json")
if os.path.exists(bench):
    try:
        b = json.load(open(bench))
        doc["bench"] = {"meta": b.get("meta"), "records": b.get("records"), "skipped": b.get("skipped")}
    except ValueError:
        pass
tmp = os.path.join(out, ".results.%d.tmp" % os.getpid())
json.dump(doc, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, "results.json"))
EOF
    # Logs: any one over 4 MiB keeps its first and last 1 MiB, so the archive stays far under 16 MiB.
    find "$GPU_CHECK_WORK" -type f -size +4M 2>/dev/null | while read -r big; do
        { head -c 1048576 "$big"; printf '\n[... cut by gpu_check.sh ...]\n'; tail -c 1048576 "$big"; } >"$big.cut" &&
            mv -f "$big.cut" "$big"
    done
    tmp=$(mktemp "$OUT/.logs.XXXXXX")
    # Exit 1 is "a file changed as we read it": a stage still writing its log.
    tar czf "$tmp" --warning=no-file-changed --exclude='*.so' --exclude='*.tmp' -C "$GPU_CHECK_TMP" logs 2>/dev/null
    if [ $? -le 1 ]; then
        chmod 644 "$tmp" && mv -f "$tmp" "$OUT/logs.tar.gz"
    else
        rm -f "$tmp"
    fi
}

# key NAME: the stage's last KEY: line.
key() { grep -a "^KEY: " "$GPU_CHECK_WORK/$1.log" 2>/dev/null | tail -1 | cut -c6-; }

# run NAME: runs stage NAME until its end in the plan; records ok / FAILED / out of time.
run() {
    local name=$1 left start rc took k
    left=$(( T0 + $(end_of "$name") - $(date +%s) ))
    if [ "$left" -lt 1 ]; then
        status "$name" "skipped (no time left: the stages before it used its budget)"; return 99
    fi
    start=$(date +%s)
    echo "gpu-check: $name (at most ${left} s)"
    GPU_CHECK_STAGE_LEFT=$left timeout --kill-after=10 "$left" "$SELF" --stage "$name" \
        >"$GPU_CHECK_WORK/$name.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    k=$(key "$name")
    if [ "$name" = bench ] && bench_key; then k=$(cat "$GPU_CHECK_WORK/bench.key"); fi
    case $rc in
        0) status "$name" "ok (${took} s${k:+; $k})" ;;
        124|137) status "$name" "out of time (stopped after ${took} s, its budget${k:+; $k})" ;;
        *) status "$name" "FAILED (exit $rc after ${took} s${k:+; $k})" ;;
    esac
    echo "gpu-check: $name: $(cat "$GPU_CHECK_WORK/status/$name")"
    return $rc
}

# bench_key: the benchmark's key numbers (from its JSON, also when it was stopped) -> bench.key.
bench_key() {
    ls "$GPU_CHECK_WORK"/bench/*.json >/dev/null 2>&1 || return 1
    "$PYTHON" - "$GPU_CHECK_WORK" >"$GPU_CHECK_WORK/bench.key" 2>/dev/null <<'EOF' || { rm -f "$GPU_CHECK_WORK/bench.key"; return 1; }
import glob, json, sys
paths = sorted(glob.glob(sys.argv[1] + "/bench/*.json"))
doc = json.load(open(paths[-1]))
parts = []
for r in doc["records"]:
    if r["provider"] != "eager_cl" and r.get("speedup_vs_eager_cl"):
        parts.append("%s %s %s %.2fx" % (r["case"].replace("aspp_v3_", ""), r["mode"], r["provider"],
                                         r["speedup_vs_eager_cl"]))
cg = doc["meta"].get("cuda_graphs")
print("%d records, x eager_cl: %s%s%s" % (len(doc["records"]), ", ".join(parts) or "-",
      "; CUDA graphs: %s" % cg if cg is not None else "", "; INTERRUPTED" if doc["meta"].get("interrupted") else ""))
EOF
}

want() { [[ "$WANT" == *" $1 "* ]]; }
failed=0
skip_all=""  # reason every later stage is skipped

for s in "${STAGE_ORDER[@]}"; do
    want "$s" || status "$s" "skipped (not in GPU_CHECK_STAGES)"
done

if want env; then
    run env || failed=1
fi
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    echo "dry-run" >"$GPU_CHECK_WORK/arch"
else
    "$PYTHON" -c "import json,sys; sys.stdout.write(json.load(open(sys.argv[1]))['arch'] or '')" \
        "$GPU_CHECK_WORK/parts/env.json" >"$GPU_CHECK_WORK/arch" 2>/dev/null
    if [ ! -s "$GPU_CHECK_WORK/arch" ]; then
        "$PYTHON" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null ||
            skip_all="skipped (no CUDA device here)"
    fi
fi

for s in build triton matrix bench sanitize tests; do
    if [ -n "$skip_all" ] && want "$s"; then status "$s" "$skip_all"; fi
done
if [ -z "$skip_all" ]; then
    build_ok=1
    # build and triton together; each writes its own line as it finishes.
    pids=()
    if want build; then ( run build ) & pids+=($!); fi
    if want triton; then ( run triton ) & pids+=($!); fi
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    if want build; then
        case $(cat "$GPU_CHECK_WORK/status/build") in ok*) ;; *) build_ok=0 ;; esac
        if [ $build_ok = 1 ] && [ -n "${GPU_CHECK_KEEP_BUILD:-}" ]; then
            mkdir -p "$GPU_CHECK_KEEP_BUILD" && cp aspp_fused/_C*.so "$GPU_CHECK_KEEP_BUILD"/
        fi
    fi
    for s in matrix bench sanitize tests; do
        want "$s" || continue
        if [ $build_ok = 0 ] && { [ "$s" = matrix ] || [ "$s" = sanitize ]; }; then
            status "$s" "skipped (the build failed: the CUDA kernels are not there)"; failed=1; continue
        fi
        run "$s" || failed=1
    done
fi
echo "done in $(( $(date +%s) - T0 )) s" >"$GPU_CHECK_WORK/done.txt"
publish
rm -rf "$GPU_CHECK_TMP"
echo "gpu-check: done in $(( $(date +%s) - T0 )) s; $OUT:"
cat "$OUT/summary.txt"
exit $failed
