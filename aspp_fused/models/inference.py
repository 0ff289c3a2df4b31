"""Multi-scale + horizontal-flip inference (the DeepLab papers' "MS + Flip" evaluation)."""
import numbers
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["multi_scale_inference"]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):  # torchvision's segmentation models return {"out": ..., ["aux": ...]}
        out = out["out"]
    return out


@torch.no_grad()
def multi_scale_inference(model: nn.Module, images: torch.Tensor,
                          scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                          flip: bool = True) -> torch.Tensor:
    """Average of the model's logits over rescaled (and horizontally flipped) copies of ``images``.

    Each scale resizes the images bilinearly (align_corners=False) to ``round(s * H) x round(s * W)``
    (at least 1 pixel), runs ``model`` (its own output size does not matter: logits are resized
    back), and resizes the logits to H x W; with ``flip`` every scale also runs on the mirrored
    images, whose logits are mirrored back. Logits, not probabilities, are averaged.
    Works with this package's models (tensor output) and torchvision's (``{"out": ...}``).
    Put the model in eval mode first: BatchNorm in training mode would use batch statistics
    (a warning says so). Returns [N, num_classes, H, W], under ``torch.no_grad()``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = "shape %s" % (tuple(images.shape),) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError("multi_scale_inference: images must be a 4-D tensor [N, C, H, W], got %s" % got)
    scales = tuple(scales)
    if not scales or any(isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0 for s in scales):
        raise ValueError("multi_scale_inference: scales must be a non-empty sequence of positive numbers, got %r"
                         % (scales,))
    if not isinstance(flip, bool):
        raise ValueError("multi_scale_inference: flip must be True or False, got %r" % (flip,))
    if model.training:
        warnings.warn("multi_scale_inference: the model is in training mode (BatchNorm uses batch statistics, "
                      "dropout is on); call model.eval() first", stacklevel=3)
    h, w = images.shape[-2:]
    total = None
    count = 0
    for s in scales:
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = [(x, False)] + ([(x.flip(-1), True)] if flip else [])
        for view, flipped in views:
            y = _logits(model, view)
            if flipped:
                y = y.flip(-1)
            if y.shape[-2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            y = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y  # sum low precision in fp32
            total = y if total is None else total + y
            count += 1
    return total / count
