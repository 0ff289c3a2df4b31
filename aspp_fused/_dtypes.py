"""The one accumulation-dtype rule of every op, backend and module (C++: csrc/checks.h, acc_dtype):
float64 inputs accumulate in float64, every other float dtype in float32."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and batch-statistics) dtype of inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32
