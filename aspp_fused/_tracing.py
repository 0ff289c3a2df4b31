"""Argument checks while torch.jit.trace records a graph.

Under torch.jit.trace every tensor size is a traced value, and reading one in Python, as the
argument checks do (channel counts, kernel sizes), warns "Converting a tensor to a Python
boolean might cause the trace to be incorrect". What those checks read is fixed by the module
(channels, kernel sizes, the batch of a bias computed from the input), never a choice by the
input's batch or spatial size, so the trace is right at other sizes (tests/test_export.py):
without this, a traced torchvision DeepLabV3 printed 56 such false alarms. Only that warning
category, only inside the checks, only while tracing.
"""
import contextlib
import warnings

import torch


@contextlib.contextmanager
def size_checks():
    """Runs the enclosed shape checks without TracerWarnings while tracing; a no-op otherwise."""
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield
