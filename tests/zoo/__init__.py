"""Small DeepLab-style models written in the styles found in the wild, for convert()'s tests.

Each module exposes ``build()`` (a small random model) and ``EXPECTED`` (what convert must fuse:
``fused_sites`` = fused entries of explain(), ``heads`` = fused heads / sums among them).
"""
import importlib

import torch

from benchmarks.cases import randomize_bn


def build(name, dtype=torch.float64):
    """zoo.<name>.build() in ``dtype``, seeded, with non-trivial BN statistics and affine parameters
    (fresh ones are 0 / 1) and a value in every conv bias (v2 classifiers start at zero)."""
    torch.manual_seed(0)
    return randomize_bn(importlib.import_module("zoo." + name).build().to(dtype), conv_bias=True)
