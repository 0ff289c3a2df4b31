"""What each launch's plan multiplies, logged per thread while ``record_work`` is on.

Pure Python (no triton import): the Triton launchers and the torch backend's convolutions log
here, and ``python -m benchmarks --work-only`` reads the log (benchmarks/work.py).
"""
import contextlib
import threading

_work = threading.local()


@contextlib.contextmanager
def record_work():
    """Collects, per launch in this thread, what the launch's plan multiplies: a list of
    {"kernel", "dense_macs", "valid_macs", "issued_macs"} (issued None where the kernel derives
    its taps inside the kernel: the tile kernels). ``python -m benchmarks --work-only``."""
    prev = getattr(_work, "log", None)
    _work.log = []
    try:
        yield _work.log
    finally:
        _work.log = prev


def log_work(kernel: str, work):
    """Logs ``work()`` (a dict) for ``kernel`` while record_work is on; otherwise computes
    nothing (it is called on every launch)."""
    log = getattr(_work, "log", None)
    if log is not None:
        log.append(dict(work(), kernel=kernel))
