"""The benchmark CLI: ``python -m benchmarks`` (or ``python benchmarks/run.py``).

For each (case, dtype, mode) it builds every provider from the same twin, warms each up, then
times them side by side (interleaved round after round), and reports median and p20/p80 ms,
images/s, peak memory, TFLOP/s on executed and on dense MACs and % of a matmul peak measured
in the same run. Writes ``<out>/<date>_<device>.json`` (docs/DESIGN.md's schema), a markdown table and
a PNG chart of speedups over eager_cl beside it. ``--compare OLD.json`` flags regressions.
Interrupted (Ctrl-C, or SIGTERM from a time limit), it stops after the group in flight is
abandoned and still writes the groups measured so far, marked as interrupted.
"""
import argparse
import datetime
import gc
import json
import math
import os
import signal
import sys
import time
from typing import Dict, List

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import cases as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from benchmarks.report import (REGRESSION_THRESHOLD, chart, compare, markdown, skipped_lines,  # noqa: E402
                               text_table)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
CANONICAL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MODES = ("infer", "train")
# Results go to the working directory by default; the committed figures in benchmarks/results/
# are written only when asked for (--out benchmarks/results).
DEFAULT_OUT = "bench-results"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# --------------------------------------------------------------------------- progress


class Progress:
    """tqdm when it is installed (it is optional: the [bench] extra), else one stderr line per step."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="group", dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.tty = sys.stderr.isatty()

    def status(self, text: str):
        if self.bar is not None:
            self.bar.set_description_str("[%d/%d] %s" % (self.current(), self.total, text))
        elif self.tty:
            sys.stderr.write("\r\033[K[%d/%d] %s" % (self.current(), self.total, text))
            sys.stderr.flush()
        else:
            sys.stderr.write("[%d/%d] %s\n" % (self.current(), self.total, text))

    def current(self) -> int:
        """The group in flight, counted from 1 (the done count read [0/1] for a whole group)."""
        return min(self.done + 1, self.total)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\r\033[K[%d/%d] done\n" % (self.done, self.total))

    def log(self, text: str):
        """A line that must not be overwritten by the bar (skip reasons, warnings)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            if self.tty:
                sys.stderr.write("\r\033[K")
            sys.stderr.write(text + "\n")


# --------------------------------------------------------------------------- measuring one group


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ("%s: %s" % (type(exc).__name__, first))[:300]


def measure_group(case: C.Case, mode: str, dtype: torch.dtype, ctx: dict, progress: Progress):
    """All providers of one (case, mode, dtype), side by side. Returns (records, skipped)."""
    device, size, budget = ctx["device"], ctx["size"], ctx["budget"]
    batch = ctx["batch"] or case.batch[size]
    dname = CANONICAL[dtype]
    label = "%s %s %s" % (case.name, mode, dname)
    records, skipped = [], []

    def skip(provider, reason):
        # Listed once, at the end (skipped_lines): a live line as well printed every reason twice.
        skipped.append({"case": case.name, "provider": provider, "mode": mode, "dtype": dname, "batch": batch,
                        "reason": reason})

    try:
        dense, executed, out_shape, _ = C.meta_macs(case, size, batch)
        twin, spec = C.build_twin(case, size, device, dtype)
    except C.Skip as exc:
        for p in ctx["providers"]:
            skip(p, str(exc))
        return records, skipped
    twin.train(mode == "train")
    # Train mode: 3x the forward MACs (forward, input gradient, weight gradient).
    work = 3 if mode == "train" else 1

    providers: Dict[str, C.Provider] = {}
    for name in ctx["providers"]:
        if (name in ("compile", "compile_fused_torch") and device.type == "cpu" and case.fused is None
                and not ctx["providers_explicit"]):
            skip(name, "not in the default CPU run: inductor took ~40 s to compile ResNet-101 on a 2-core CPU "
                       "machine; ask for it with --providers")
            continue
        try:
            providers[name] = C.make_provider(name, case, twin, device, ctx["compile_mode"])
        except C.Skip as exc:
            skip(name, str(exc))
        except Exception as exc:
            skip(name, "could not be built: " + _reason(exc))
    param_bytes = sum(p.numel() * p.element_size() for p in twin.parameters())
    del twin

    count = H.rotation_count(C.input_bytes(spec, batch, dtype), device)
    # A head's input carries a gradient in training (the backbone below it needs one);
    # a whole model's input images do not.
    needs_grad = mode == "train" and case.fused is not None
    out_bytes = math.prod(out_shape) * torch.empty((), dtype=dtype).element_size()
    min_bytes = H.step_bytes(param_bytes, C.input_bytes(spec, batch, dtype), out_bytes, mode, needs_grad)
    inputs = {cl: C.make_inputs(spec, batch, count, device, dtype, cl, needs_grad)
              for cl in {p.channels_last for p in providers.values()}}
    base_grad = None
    if mode == "train":
        gen = torch.Generator(device=device).manual_seed(1)
        base_grad = torch.randn(out_shape, generator=gen, device=device, dtype=dtype)

    clock = H.Clock(device)
    runners, runs, steps, notes = {}, {}, {}, {}
    host = {name: [] for name in providers}  # CUDA: host ms per timed call (Clock.last_host_ms)
    for name, prov in list(providers.items()):
        prepare, step = C.make_step(prov, mode, inputs[prov.channels_last], base_grad)

        def timed(i, prepare=prepare, step=step, prov=prov, name=name):
            j = i % count
            prepare(j)
            with H.cudnn_benchmark(prov.cudnn_benchmark):
                ms = clock.time_ms(lambda: step(j))
            if clock.last_host_ms is not None:
                host[name].append(clock.last_host_ms)
            return ms

        progress.status("%s: warm-up %s" % (label, name))
        try:
            t0 = time.perf_counter()
            timed(0)  # first call: compilation, autotuning, allocator growth; not counted
            first_s = time.perf_counter() - t0
            warm = [timed(i + 1) for i in range(budget.warmup)]
        except Exception as exc:  # a provider that fails here is reported, not fatal
            skip(name, "failed in warm-up: " + _reason(exc))
            del providers[name]
            _free(device)
            continue
        host[name].clear()  # the timed rounds only
        runners[name], steps[name] = timed, (prepare, step)
        runs[name] = budget.runs_for(H.percentile(warm, 50))
        notes[name] = prov.note + ("; first call %.1f s" % first_s if name.startswith("compile") else "")

    # The yardsticks run in the same rounds as the providers (see harness.MatmulYardstick).
    yard, copier = H.MatmulYardstick(device, dtype, ctx["matmul_n"]), H.CopyYardstick(device)
    yard()
    copier()
    progress.status("%s: timing %s" % (label, ", ".join("%s x%d" % (n, runs[n]) for n in runners)))
    yard_runs = min(10, max(list(runs.values()) + [3]))
    times, errors = H.interleaved(dict(runners, matmul=lambda i: clock.time_ms(yard),
                                       copy=lambda i: clock.time_ms(copier)),
                                  dict(runs, matmul=yard_runs, copy=yard_runs))
    for stick in ("matmul", "copy"):
        if stick in errors:
            raise errors[stick]
    peak_tflops = yard.tflops(H.percentile(times.pop("matmul"), 50))
    gbps = copier.gbps(H.percentile(times.pop("copy"), 50))
    ctx["peaks"].setdefault(dname, []).append(peak_tflops)
    ctx["bandwidths"].append(gbps)
    bound = H.roofline_ms(executed * work, min_bytes, peak_tflops, gbps)
    for name, exc in errors.items():
        skip(name, "failed while timing: " + _reason(exc))
        del runners[name]

    for name in runners:
        prepare, step = steps[name]
        # What the provider's own plan issues (benchmarks/work.py), forward only: the backward's
        # plans are not counted, so train records carry none.
        issued, issued_why = (None, "train: the backward's plans are not counted") if mode == "train" else \
            _issued(ctx, case, size, batch, name, device.type)
        progress.status("%s: peak memory %s" % (label, name))
        prepare(0)
        with H.cudnn_benchmark(providers[name].cudnn_benchmark):
            mem = H.step_peak_memory_mb(lambda: step(0), device)
        ms = times[name]
        med = H.percentile(ms, 50)
        tf_exec = 2.0 * executed * work / (med * 1e-3) / 1e12
        tf_dense = 2.0 * dense * work / (med * 1e-3) / 1e12
        records.append({
            "case": case.name, "provider": name, "mode": mode, "dtype": dname, "batch": batch,
            "ms_median": round(med, 4), "ms_p20": round(H.percentile(ms, 20), 4),
            "ms_p80": round(H.percentile(ms, 80), 4),
            "peak_mem_mb": None if mem is None else round(mem, 2),
            "tflops_executed": _sig(tf_exec), "tflops_dense": _sig(tf_dense),
            "device": ctx["device_name"], "torch": torch.__version__, "triton": ctx["triton"],
            "commit": ctx["commit"],
            # extra fields
            "images_per_s": round(batch / (med * 1e-3), 3),
            "pct_of_matmul_peak_executed": _sig(100 * tf_exec / peak_tflops),
            "pct_of_matmul_peak_dense": _sig(100 * tf_dense / peak_tflops),
            "matmul_peak_tflops": _sig(peak_tflops), "runs": len(ms), "size": size,
            "gmacs_dense": round(dense * work / 1e9, 3),
            "gmacs_executed": round(executed * work / 1e9, 3),
            "gmacs_issued": None if issued is None else round(issued / 1e9, 3),
            "tflops_issued": None if issued is None else _sig(2.0 * issued / (med * 1e-3) / 1e12),
            "issued_note": issued_why,
            "roofline_ms": _sig(bound), "pct_of_roofline": _sig(100 * bound / med),
            # CUDA: the host's time per call (Python, dispatch, launches), beside the GPU time.
            "host_ms_median": round(H.percentile(host[name], 50), 4) if host[name] else None,
            "min_bytes_mb": round(min_bytes / 2 ** 20, 3), "copy_gbps": _sig(gbps), "note": notes[name],
        })
    base = next((r["ms_median"] for r in records if r["provider"] == C.BASELINE), None)
    for r in records:
        r["speedup_vs_eager_cl"] = None if base is None else round(base / r["ms_median"], 3)

    del providers, runners, steps, inputs
    _free(device)
    return records, skipped


def _issued(ctx, case, size, batch, provider, device_type):
    """benchmarks/work.issued_for, once per (case, size, batch, provider) of a run."""
    from benchmarks import work as W

    key = (case.name, size, batch, provider, device_type)
    cache = ctx.setdefault("issued", {})
    if key not in cache:
        cache[key] = W.issued_for(case, size, batch, provider, device_type)
    return cache[key]


def _sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits (a tiny case's TFLOP/s must not round to 0)."""
    return float("%.*g" % (digits, x))


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="standard",
                   help="comma list of cases, 'standard' (default) or 'all'; see --list")
    p.add_argument("--providers", default=None, help="comma list (default: all of %s)" % ", ".join(C.PROVIDERS))
    p.add_argument("--modes", default=None, help="comma list of infer, train (default: both on CUDA, infer on CPU)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every case (default: the case's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", default="auto", choices=["auto", "gpu", "cpu"],
                   help="case sizes: gpu = docs/DESIGN.md's (batch 16, C=2048), cpu = scaled down (batch 2, C=512); "
                        "auto: by device")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU runs (default: PyTorch's, one per core)")
    p.add_argument("--quick", action="store_true", help="few runs per provider (smoke test, noisy figures)")
    p.add_argument("--min-runs", type=int, default=None)
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="seconds of timed runs per provider and group")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder for <date>_<device>.json/.md/.png (default: ./%(default)s; the committed results: "
                        "--out benchmarks/results)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the compile provider (default: %(default)s, compiles in seconds; "
                        "reduce-overhead / max-autotune capture CUDA graphs, max-autotune compiles for minutes)")
    p.add_argument("--compare", metavar="OLD.json", default=None,
                   help="flag records more than --threshold slower than in OLD.json (exit status 1)")
    p.add_argument("--threshold", type=float, default=REGRESSION_THRESHOLD, help="regression threshold (0.05 = 5%%)")
    p.add_argument("--list", action="store_true", help="list cases and providers, then exit")
    p.add_argument("--work-only", action="store_true",
                   help="time nothing: write the dense / valid / issued multiply-adds of each backend's plan "
                        "(benchmarks/work.py) to <out>/work_<size>.json")
    return p.parse_args(argv)


def _split(text: str, known, what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise SystemExit("unknown %s %s (known: %s)" % (what, ", ".join(bad) or "(none)", ", ".join(known)))
    return items


def _case_names(args) -> List[str]:
    return (C.STANDARD if args.cases == "standard" else list(C.CASES) if args.cases == "all"
            else _split(args.cases, list(C.CASES), "case"))


class Interrupted(Exception):
    """SIGTERM (a time limit) or Ctrl-C during the measurements."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, case in C.CASES.items():
            print("%-24s %s%s" % (name, case.title, "" if case.standard else "  [not in the standard set]"))
        print("\nproviders: %s (baseline for speedups: %s)" % (", ".join(C.PROVIDERS), C.BASELINE))
        return 0

    if args.work_only:
        from benchmarks.work import main_work_only

        if not torch.cuda.is_available():
            # The Triton ops take CPU tensors only under the interpreter (read when aspp_fused.kernels
            # is first imported); nothing is launched here.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        wsize = args.size if args.size != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
        return main_work_only(_case_names(args), wsize, args.batch, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    size = args.size if args.size != "auto" else ("gpu" if cuda else "cpu")
    case_names = _case_names(args)
    providers = _split(args.providers, C.PROVIDERS, "provider") if args.providers else list(C.PROVIDERS)
    modes = _split(args.modes or ("infer,train" if cuda else "infer"), MODES, "mode")
    dtypes = [DTYPES[d] for d in _split(args.dtypes or ("bf16" if cuda else "fp32"), list(DTYPES), "dtype")]
    dtypes = list(dict.fromkeys(dtypes))
    budget = H.BUDGETS["quick" if args.quick else device.type]
    for attr, val in (("min_runs", args.min_runs), ("max_runs", args.max_runs), ("budget_s", args.budget_s)):
        if val is not None:
            setattr(budget, attr, val)
    old_doc = None
    if args.compare:
        with open(args.compare) as f:
            old_doc = json.load(f)

    t_start = time.perf_counter()
    date = datetime.date.today().isoformat()
    ctx = {"device": device, "size": size, "budget": budget, "batch": args.batch, "providers": providers,
           "providers_explicit": args.providers is not None, "device_name": H.device_name(device),
           "triton": H.triton_version(), "commit": H.git_commit(), "peaks": {}, "bandwidths": [],
           "compile_mode": args.compile_mode}
    load_start = H.load_average()
    progress = Progress(len(case_names) * len(dtypes) * len(modes))
    if load_start and not cuda and load_start[0] > 0.5 * (os.cpu_count() or 1):
        progress.log("warning: load average %s on %d CPUs: other processes share this machine; CPU figures "
                     "are skewed (interleaving keeps the comparison fair)" % (load_start, os.cpu_count() or 0))
    ctx["matmul_n"] = 1024 if args.quick and not cuda else None

    records, skipped, case_info = [], [], []
    groups_total, groups_done, interrupted = len(case_names) * len(dtypes) * len(modes), 0, None
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        for name in case_names:
            case = C.CASES[name]
            batch = args.batch or case.batch[size]
            try:
                dense, executed, _, spec = C.meta_macs(case, size, batch)
                case_info.append({"case": name, "title": case.title + ("; %s" % case.notes[size]
                                                                       if size in case.notes else ""),
                                  "batch": batch, "input": C.channel_count(spec), "gmacs_dense": dense / 1e9,
                                  "gmacs_executed": executed / 1e9})
            except C.Skip:
                pass
            for dt in dtypes:
                for mode in modes:
                    recs, skips = measure_group(case, mode, dt, ctx, progress)
                    records += recs
                    skipped += skips
                    groups_done += 1
                    progress.advance()
    except (Interrupted, KeyboardInterrupt) as exc:
        interrupted = "%s after %d of %d groups" % (str(exc) or "KeyboardInterrupt", groups_done, groups_total)
        progress.log("interrupted (%s): writing the groups measured so far" % interrupted)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    progress.close()
    wall = time.perf_counter() - t_start

    notes = ["device: %s; %s-sized cases; %s" % (ctx["device_name"], size,
             "CUDA events after warm-up" if cuda else "time.perf_counter after warm-up"),
             "median and p20/p80 over the runs of each provider; providers interleaved round by round; "
             "inputs rotated among preallocated copies so caches do not flatter",
             "%% of peak: against a square torch.matmul (%s, same dtype and device) timed interleaved with the "
             "providers of each group; its median over the groups: %s TFLOP/s" % (
                 "8192^3" if cuda else ("1024^3" if args.quick else "2048^3"),
                 ", ".join("%s %.3g" % (k, H.percentile(v, 50)) for k, v in ctx["peaks"].items())),
             "TFLOP/s: 2 x conv MACs / median time; train = 3 x forward MACs (forward, input grad, weight grad); "
             "executed counts only (pixel, tap) pairs that touch the image",
             "roofline: the larger of the executed MACs at that matmul peak and the step's unavoidable bytes "
             "(harness.step_bytes: input, weights, output once; training adds their gradients) at the copy "
             "bandwidth (a %s copy timed in the same rounds; median %s GB/s); %% roofline = bound / median time" % (
                 "device-to-device" if cuda else "memory-to-memory",
                 "%.3g" % H.percentile(ctx["bandwidths"], 50) if ctx["bandwidths"] else "-"),
             "peak_mem_mb: " + (H.CUDA_MEMORY_SOURCE if cuda else H.CPU_MEMORY_SOURCE),
             "speedups are eager_cl median / provider median"]
    compiled = [p for p in providers if p.startswith("compile")]
    cuda_graphs = cuda and bool(compiled) and args.compile_mode in C.GRAPH_MODES
    if compiled:
        notes.append("%s: %s" % (", ".join(compiled), C._compile_note(device, args.compile_mode)))
    if cuda_graphs:
        notes.append("CUDA graphs: the compile providers only; eager and fused providers launch without them")
    if cuda:
        notes.append("eager: cudnn.benchmark off (PyTorch's default); every other provider: on")
    else:
        notes.append("CPU: oneDNN's convolutions skip the taps that fall in the zero padding (a 512 -> 256 3x3 "
                     "conv at 33x33, batch 2, fp32, 2 cores: 20.0 / 15.5 / 11.7 / 8.4 ms at rates 6 / 12 / 18 / 24, "
                     "valid (pixel, tap) fractions 0.77 / 0.57 / 0.41 / 0.27), so TFLOP/s on dense MACs (and its % "
                     "of peak) can exceed what the CPU does; the executed figure is the honest one")
    load_end = H.load_average()
    if not cuda:
        notes.append("load average at start %s, at end %s (%d CPUs): other tenants of the machine slow every "
                     "provider alike" % (load_start, load_end, os.cpu_count() or 0))
    notes.append("wall time %.0f s" % wall)
    if interrupted:
        notes.append("INTERRUPTED (%s): the records cover only the groups measured before it" % interrupted)

    doc = {
        "meta": {"date": date, "device": ctx["device_name"], "device_type": device.type, "torch": torch.__version__,
                 "triton": ctx["triton"], "commit": ctx["commit"], "python": sys.version.split()[0],
                 "command": " ".join(["python -m benchmarks"] + list(sys.argv[1:] if argv is None else argv)),
                 "size": size, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                 "load_average_start": load_start, "load_average_end": load_end,
                 "matmul_peak_tflops": {k: round(H.percentile(v, 50), 4) for k, v in ctx["peaks"].items()},
                 "copy_gbps": round(H.percentile(ctx["bandwidths"], 50), 2) if ctx["bandwidths"] else None,
                 "peak_mem_source": H.CUDA_MEMORY_SOURCE if cuda else H.CPU_MEMORY_SOURCE,
                 "budget": vars(budget), "wall_s": round(wall, 1), "cases": case_info,
                 "compile_mode": args.compile_mode, "cuda_graphs": cuda_graphs,
                 "triton_autotune": os.environ.get("ASPP_FUSED_TRITON_AUTOTUNE", "1") != "0",
                 "interrupted": interrupted, "notes": notes},
        "records": records,
        "skipped": skipped,
    }

    status = 0
    if old_doc is not None:
        rows, regressions = compare(old_doc.get("records", []), records, args.threshold)
        doc["regressions"] = regressions
        doc["meta"]["compared_with"] = args.compare
        doc["meta"]["regression_threshold"] = args.threshold
        status = 1 if regressions else 0

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "%s_%s" % (date, H.device_slug(device)))
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(doc))
    why_no_png = chart(doc, stem + ".png")

    print(text_table(records))
    if skipped:
        print("\nskipped:")
        for line in skipped_lines(skipped):
            print(line)
    print()
    for n in notes:
        print("note: " + n)
    if old_doc is not None:
        old_dev = (old_doc.get("meta") or {}).get("device")
        if old_dev and old_dev != ctx["device_name"]:
            print("\nwarning: %s was measured on %s, not %s: the comparison says little" % (
                args.compare, old_dev, ctx["device_name"]))
        print("\ncompared with %s (%d matching records, threshold %.0f%%):" % (args.compare, len(rows),
                                                                              100 * args.threshold))
        for r in rows:
            print("  %-6s %-24s %-13s %-5s %-4s %9.3f ms -> %9.3f ms  %+6.1f%%" % (
                "REGRESSION" if r["regression"] else "ok", r["case"], r["provider"], r["mode"], r["dtype"],
                r["old_ms"], r["new_ms"], 100 * (r["ratio"] - 1)))
        print("%d regression(s)" % len(doc["regressions"]))
    print("\nwrote %s.json, %s.md%s" % (stem, stem, "" if why_no_png else ", %s.png" % stem))
    if why_no_png:
        print(why_no_png)
    if interrupted:
        print("interrupted: %s" % interrupted)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
