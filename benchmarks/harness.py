"""The measuring instruments: environment, timing, peak memory, matmul peak, MAC counting.

Nothing here knows about ASPP: ``cases.py`` says what runs, ``run.py`` drives it.
"""
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- environment


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """A human name for the results file: the GPU's name, or the CPU model and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "%s (%d cores, %d torch threads)" % (cpu_model_name(), os.cpu_count() or 0, torch.get_num_threads())


def device_slug(device: torch.device) -> str:
    """File-name form of the device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-2c'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-%s-%dc" % (cpu_model_name(), os.cpu_count() or 0)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # not installed, or broken: either way no Triton figure can come from here
        return None
    return getattr(triton, "__version__", "unknown")


def git_commit() -> str:
    """The commit the figures were measured at ('-dirty' when the tree had local changes)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def load_average() -> Optional[List[float]]:
    """1/5/15-minute load: other processes on a shared CPU machine skew every CPU figure."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def rotation_count(input_bytes: int, device: torch.device) -> int:
    """How many distinct preallocated inputs to cycle through.

    Enough that the inputs together are at least twice the last-level cache, so a run never
    reads an input left in cache by the previous run of the same provider (L2 on a GPU, L3 on
    a CPU); at least 2, at most 8 (memory).
    """
    cache = last_level_cache_bytes(device)
    return int(min(8, max(2, math.ceil(2 * cache / max(input_bytes, 1)))))


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --------------------------------------------------------------------------- timing


class Clock:
    """Times one call in milliseconds.

    CUDA: events recorded on the current stream around the call, then a sync on the end
    event, so the figure is GPU time from the first kernel queued to the last one done
    (the GPU is idle at the start because the previous call was synced). CPU: perf_counter.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last_host_ms = None  # CUDA: host time of the last call (see time_ms)
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def time_ms(self, fn: Callable[[], None]) -> float:
        """GPU time of fn (CUDA) or its wall time (CPU). On CUDA ``last_host_ms`` is then the
        host's time inside fn (Python, dispatch, launches; it returns before the GPU is done):
        a provider whose host time reaches its GPU time is bound by the host, not its kernels."""
        if self.cuda:
            self._start.record()
            t0 = time.perf_counter()
            fn()
            self.last_host_ms = (time.perf_counter() - t0) * 1e3
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@dataclass
class Budget:
    """How many runs each provider gets.

    After warm-up a provider gets ``budget_s`` of runs, clamped to [min_runs, max_runs]; a
    provider so slow that min_runs would take more than ``cap_s`` (the CPU backend's readable loops)
    gets ``slow_runs`` instead, so one slow provider cannot eat the whole run.
    """

    warmup: int
    budget_s: float
    min_runs: int
    max_runs: int
    cap_s: float
    slow_runs: int = 3

    def runs_for(self, ms: float) -> int:
        s = max(ms, 1e-3) / 1e3
        n = int(min(self.max_runs, max(self.min_runs, self.budget_s / s)))
        if n * s > self.cap_s:
            n = max(self.slow_runs, min(n, int(self.cap_s / s)))
        return n


# Defaults. GPU: plenty of runs, they are cheap. CPU: a 2-core machine must finish the whole
# standard suite in a few minutes, so fewer runs; the median and p20/p80 still come from >= 7
# runs (3 for providers slower than cap_s / 7, i.e. the reference loops of csrc/cpu).
BUDGETS = {
    "cuda": Budget(warmup=5, budget_s=1.0, min_runs=25, max_runs=200, cap_s=20.0),
    "cpu": Budget(warmup=1, budget_s=1.0, min_runs=7, max_runs=40, cap_s=6.0),
    "quick": Budget(warmup=1, budget_s=0.2, min_runs=3, max_runs=10, cap_s=3.0, slow_runs=2),
}


def interleaved(runners: Dict[str, Callable[[int], float]], runs: Dict[str, int]
                ) -> Tuple[Dict[str, List[float]], Dict[str, BaseException]]:
    """Side-by-side timing: round after round, each provider still short of its run count
    does one run; the order rotates every round so no provider always follows the same one
    (caches, clocks and other tenants of the machine drift; interleaving spreads the drift
    over all providers instead of charging it to whichever ran last). ``runners[name](i)``
    runs the i-th timed call and returns its milliseconds. A runner that raises is dropped
    from later rounds; returns (times, errors)."""
    names = list(runners)
    times: Dict[str, List[float]] = {n: [] for n in names}
    errors: Dict[str, BaseException] = {}
    for r in range(max(runs.values(), default=0)):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name not in errors and len(times[name]) < runs[name]:
                try:
                    times[name].append(runners[name](len(times[name])))
                except Exception as exc:  # e.g. out of memory on a later input: report it, keep the others
                    errors[name] = exc
    return times, errors


# --------------------------------------------------------------------------- memory

CPU_MEMORY_SOURCE = ("CPU: peak of the torch CPU allocator's live bytes during one step, over those live "
                     "before it (torch.profiler memory events); not RSS")
CUDA_MEMORY_SOURCE = "CUDA: torch.cuda.max_memory_allocated during one step minus memory_allocated before it"


def step_peak_memory_mb(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Extra memory one call needs at its peak, over what was allocated before it (weights,
    inputs, other providers' models): the figure that tells whether a batch fits.

    CUDA: the caching allocator's own peak counter. CPU: there is no such counter, and RSS
    only grows (freed pages stay mapped), so we replay the allocator's alloc/free events that
    torch.profiler records with ``profile_memory=True`` and take the peak of the running sum.
    Returns None when the measurement is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        # kineto_results holds every allocator event (allocation > 0, free < 0) with its time;
        # the public FunctionEvent view folds allocations into the ops that made them.
        records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:
        return None
    records.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


class _quiet_stderr:
    """Silences file descriptor 2 for a moment: some builds of libkineto print a line to the C
    stderr at every profiler start and stop, which would shred the progress bar."""

    def __enter__(self):
        sys.stderr.flush()
        try:
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self.saved = None

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        return False


# --------------------------------------------------------------------------- matmul peak


class MatmulYardstick:
    """One large square torch.matmul in the benchmark's dtype on its device: the yardstick for
    '% of peak', i.e. what this device delivers to PyTorch's best-tuned kernel (cuBLAS / oneDNN)
    right now, not a datasheet number. run.py times it interleaved with the providers of each
    group, so on a shared machine it sees the same contention they do.

    fp32 on CUDA uses TF32 exactly when cuDNN convolutions do (torch.backends.cudnn.allow_tf32),
    so the yardstick does the same math as the convs it is compared with.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, n: Optional[int] = None):
        self.n = n or (8192 if device.type == "cuda" else 2048)
        gen = torch.Generator(device=device).manual_seed(0)
        self.a = torch.randn(self.n, self.n, device=device, dtype=dtype, generator=gen)
        self.b = torch.randn(self.n, self.n, device=device, dtype=dtype, generator=gen)
        self.c = torch.empty(self.n, self.n, device=device, dtype=dtype)
        self.flops = 2.0 * self.n ** 3

    def __call__(self):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
        try:
            torch.matmul(self.a, self.b, out=self.c)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    def tflops(self, ms: float) -> float:
        return self.flops / (ms * 1e-3) / 1e12


class CopyYardstick:
    """One large device-to-device copy (``dst.copy_(src)``, 4x the last-level cache, at least
    64 MiB): the memory-bandwidth yardstick of the roofline bound, timed with the providers of
    each group like MatmulYardstick. Bandwidth counts the read and the write."""

    def __init__(self, device: torch.device, nbytes: Optional[int] = None):
        nbytes = nbytes or max(64 << 20, 4 * last_level_cache_bytes(device))
        self.src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2.0 * self.src.numel() * 4

    def __call__(self):
        self.dst.copy_(self.src)

    def gbps(self, ms: float) -> float:
        return self.bytes / (ms * 1e-3) / 1e9


def step_bytes(param_bytes: int, input_bytes: int, output_bytes: int, mode: str, input_grad: bool) -> int:
    """The bytes a step cannot avoid moving, each tensor once: inference reads the input and the
    weights and writes the output; training adds the backward's reads of the output gradient,
    the input and the weights, and its writes of the weight gradients (and of the input
    gradient when the input needs one). Activations a fused kernel keeps on chip are not
    counted, so this is a lower bound for every provider."""
    total = input_bytes + param_bytes + output_bytes
    if mode == "train":
        total += output_bytes + input_bytes + 2 * param_bytes + (input_bytes if input_grad else 0)
    return total


def roofline_ms(macs: float, nbytes: float, peak_tflops: float, gbps: float) -> float:
    """The time no implementation can beat: the larger of the MACs at the measured matmul peak
    and the bytes at the measured copy bandwidth."""
    return max(2.0 * macs / (peak_tflops * 1e12), nbytes / (gbps * 1e9)) * 1e3


# --------------------------------------------------------------------------- MAC counting


def valid_taps_1d(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Sum over the output positions of one spatial axis of the kernel taps that read a real
    input position (0 <= o * stride - padding + k * dilation < size), not zero padding."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    total = 0
    for o in range(max(out, 0)):
        base = o * stride - padding
        for k in range(kernel):
            if 0 <= base + k * dilation < size:
                total += 1
    return total


def _conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0
        # 'same' (stride 1): PyTorch pads dilation * (k - 1) in total, the smaller half first.
        return tuple((d * (k - 1)) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


def conv_macs(conv: nn.Conv2d, input_shape: Sequence[int]) -> Tuple[int, int]:
    """(dense, executed) multiply-adds of ``conv`` on an input of ``input_shape`` [N, C, H, W].

    Dense: every output pixel times every tap, padding included (what a dense conv library
    computes). Executed: only the (pixel, tap) pairs whose tap lands inside the image. An
    axis's validity does not depend on the other axis, so the count of valid 2-D pairs is the
    product of the two 1-D counts. Non-zero padding modes read real data at every tap: dense.
    """
    n, c, h, w = (int(v) for v in input_shape)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = _conv_padding(conv)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_pair = n * conv.out_channels * (c // conv.groups)
    dense = per_pair * ho * wo * kh * kw
    if conv.padding_mode != "zeros":
        return dense, dense
    executed = per_pair * valid_taps_1d(h, kh, sh, ph, dh) * valid_taps_1d(w, kw, sw, pw, dw)
    return dense, executed


def count_macs(module: nn.Module, inputs) -> Tuple[int, int, object]:
    """(dense, executed) conv MACs of one forward of ``module`` on ``inputs``, and its output.

    Counts every nn.Conv2d call through forward hooks (a conv called twice counts twice);
    linear layers, BN, pooling and interpolation are not counted (they are < 1% of the work
    of every case here). Run it on the meta device: only shapes are needed.
    """
    totals = [0, 0]

    def hook(mod, args):
        dense, executed = conv_macs(mod, args[0].shape)
        totals[0] += dense
        totals[1] += executed

    handles = [m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            out = module(inputs)
    finally:
        for h in handles:
            h.remove()
    return totals[0], totals[1], out


# --------------------------------------------------------------------------- misc


class cudnn_benchmark:
    """Context: torch.backends.cudnn.benchmark set to ``on`` for the calls inside, restored after
    (providers are interleaved, and only some of them ask for autotuned cuDNN algorithms)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.prev = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.on

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.prev
        return False
