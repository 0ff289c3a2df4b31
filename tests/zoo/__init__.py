"""Small DeepLab-style models written in the styles found in the wild, for convert()'s tests.

Each module exposes ``build()`` (a small random model) and ``EXPECTED`` (what convert must fuse:
``fused_sites`` = fused entries of explain(), ``heads`` = fused heads / sums among them).
"""
import importlib

import torch
from torch import nn


def build(name, dtype=torch.float64):
    """zoo.<name>.build() in ``dtype``, seeded, with non-trivial BN statistics and affine parameters
    (fresh ones are 0 / 1) and a value in every conv bias (v2 classifiers start at zero). One loop
    in module order (not conftest.randomize_bn, then the biases): the tests' values come from this
    draw order."""
    torch.manual_seed(0)
    model = importlib.import_module("zoo." + name).build().to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return model
