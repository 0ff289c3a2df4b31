"""DeepLab v2 / v3 / v3+ and LR-ASPP models with fused ASPP heads.

Every builder assembles the model from plain-PyTorch twins (``aspp_fused.nn``), loads
``pretrained`` (a local file, nothing is downloaded) and, with ``fused=True`` (the default),
calls :func:`aspp_fused.convert` so the heads run the fused ops; state_dict keys are the same
either way. ``model(images)`` returns logits at the input size (bilinear, align_corners=False).

Layouts (state_dict keys):

* ``deeplabv3_resnet50/101``, ``deeplabv3_mobilenetv3_large``, ``lraspp_mobilenetv3_large``:
  torchvision's segmentation models (``backbone.*``, ``classifier.*``, ``aux_classifier.*``
  with ``aux_loss=True``), so torchvision checkpoints load. With ``output_stride=8``,
  ``multi_grid=None`` (and, for MobileNetV3, ``output_stride=16, atrous_rates=(12, 24, 36)``)
  the numbers are torchvision's too. The head is torchvision's DeepLabHead (ASPP, 3x3
  conv-BN-ReLU, 1x1 classifier with bias), not the seed's ASPP + bias-free 1x1.
* ``deeplabv2_resnet101``, ``deeplabv3plus_*``: no torchvision equivalent; the layout is ours
  (``backbone.*`` is the backbone's own layout, ``classifier.*`` the head's), documented on
  :class:`DeepLabV3PlusHead`.
"""
import os
from typing import Dict, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from aspp_fused.convert import convert
from aspp_fused.functional import check_backend
from aspp_fused.models._utils import check_int, check_rates, check_return_layers, load_state_dict_checked, \
    read_state_dict
from aspp_fused.models.mobilenet import MobileNetV2, MobileNetV3Large
from aspp_fused.models.resnet import resnet50, resnet101
from aspp_fused.models.xception import AlignedXception65
from aspp_fused.nn.reference import ASPPv2, AtrousConvBNReLU, DeepLabHead, LRASPPHead, SeparableASPP, \
    SeparableAtrousConv

__all__ = [
    "SegmentationModel", "DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "LRASPP", "DeepLabV3PlusHead", "FCNHead",
    "deeplabv2_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenetv3_large",
    "deeplabv3plus_resnet101", "deeplabv3plus_xception65", "deeplabv3plus_mobilenetv2", "lraspp_mobilenetv3_large",
]

PathLike = Union[str, "os.PathLike[str]"]

# DeepLab v3's rates: they scale with the feature map (x2 at OS8)
_ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


# --------------------------------------------------------------------------- heads


class FCNHead(nn.Sequential):
    """torchvision's FCNHead (the auxiliary classifier): 3x3 conv-BN-ReLU to in/4, Dropout(0.1), 1x1."""

    def __init__(self, in_channels: int, num_classes: int):
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


class DeepLabV3PlusHead(nn.Module):
    """DeepLab v3+ head: separable ASPP on the deep features + decoder with low-level features.

    Keys (our layout, not torchvision's): ``aspp`` (:class:`aspp_fused.nn.SeparableASPP`, smp's
    layout), ``project`` (the 48-channel 1x1 conv-BN-ReLU of the low-level features),
    ``decoder.0`` / ``decoder.1`` (two separable 3x3 conv-BN-ReLU blocks,
    :class:`aspp_fused.nn.SeparableAtrousConv` at rate 1), ``classifier`` (1x1 conv with bias).
    The ASPP output is upsampled to the low-level size and concatenated before it, as in TF.
    ``mid_norm=True`` puts BN + ReLU between depthwise and pointwise (TF / mmseg) everywhere.
    """

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, atrous_rates: Sequence[int],
                 channels: int = 256, low_proj_channels: int = 48, mid_norm: bool = False):
        super().__init__()
        self.aspp = SeparableASPP(in_channels, channels, atrous_rates, mid_norm=mid_norm)
        self.project = AtrousConvBNReLU(low_channels, low_proj_channels, kernel_size=1)
        self.decoder = nn.Sequential(
            SeparableAtrousConv(channels + low_proj_channels, channels, 1, mid_norm=mid_norm),
            SeparableAtrousConv(channels, channels, 1, mid_norm=mid_norm),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = self.aspp(x)
        low = self.project(low)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.decoder(torch.cat([x, low], dim=1)))


# --------------------------------------------------------------------------- models


class SegmentationModel(nn.Module):
    """backbone -> head -> bilinear upsampling of the logits to the input size.

    ``return_layers`` maps backbone stage names to the roles the head reads ("out", "low",
    "aux"). Methods from the seed's DeeplabV3: :meth:`get_1x_lr_params` (the backbone),
    :meth:`get_10x_lr_params` (everything else), :meth:`freeze_bn`, :meth:`freeze_backbone_bn`.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, return_layers: Dict[str, str],
                 aux_classifier: Optional[nn.Module] = None):
        super().__init__()
        check_return_layers(type(self).__name__, backbone.named_stages(), return_layers)
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier  # None registers no keys, as in torchvision
        self.return_layers = dict(return_layers)

    def _layers(self, with_aux: bool) -> Dict[str, str]:
        return {k: v for k, v in self.return_layers.items() if with_aux or v != "aux"}

    def _head(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(features["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes, H, W] at the input's size."""
        features = self.backbone.forward_features(x, self._layers(False))
        return F.interpolate(self._head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_with_aux(self, x: torch.Tensor):
        """(logits, auxiliary logits), both at the input's size, for training with torchvision's
        auxiliary loss; needs a model built with ``aux_loss=True``."""
        if self.aux_classifier is None:
            raise RuntimeError("%s.forward_with_aux: this model has no aux_classifier (build it with aux_loss=True)"
                               % type(self).__name__)
        features = self.backbone.forward_features(x, self._layers(True))
        size = x.shape[-2:]
        out = F.interpolate(self._head(features), size=size, mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear", align_corners=False)
        return out, aux

    def get_1x_lr_params(self) -> Iterator[nn.Parameter]:
        """Trainable backbone parameters (the seed's base learning rate group)."""
        for p in self.backbone.parameters():
            if p.requires_grad:
                yield p

    def get_10x_lr_params(self) -> Iterator[nn.Parameter]:
        """Trainable parameters outside the backbone: heads and auxiliary classifier (10x lr)."""
        backbone = set(id(p) for p in self.backbone.parameters())
        for p in self.parameters():
            if p.requires_grad and id(p) not in backbone:
                yield p

    def freeze_bn(self) -> "SegmentationModel":
        """Every BatchNorm (SyncBatchNorm too, fused heads' too) to eval: running statistics are
        used and no longer updated. ``model.train()`` undoes it: call this after it."""
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def freeze_backbone_bn(self) -> "SegmentationModel":
        """:meth:`freeze_bn` for the backbone only (the seed's intent; its version iterated the
        blocks of each layer and never reached a BatchNorm inside them)."""
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class DeepLabV2(SegmentationModel):
    """DeepLab v2: ASPP v2 (sum of dilated 3x3 classifiers) on the backbone's last features."""


class DeepLabV3(SegmentationModel):
    """DeepLab v3: ASPP head (torchvision's DeepLabHead) on the backbone's last features."""


class DeepLabV3Plus(SegmentationModel):
    """DeepLab v3+: separable ASPP + decoder on the stride-4 low-level features."""

    def _head(self, features):
        return self.classifier(features["out"], features["low"])


class LRASPP(SegmentationModel):
    """LR-ASPP (torchvision's LRASPP): the head reads the stride-8 "low" and the last "high" features."""

    def _head(self, features):
        return self.classifier({"low": features["low"], "high": features["out"]})


# --------------------------------------------------------------------------- builders


def _check_bool(owner, name, value):
    if not isinstance(value, bool):
        raise ValueError("%s: %s must be True or False, got %r" % (owner, name, value))


def _check_common(owner, num_classes, output_stride, atrous_rates, n_rates, backend, fused, **flags):
    """Checks every argument before anything is built; returns the atrous rates (or None)."""
    check_int(owner, "num_classes", num_classes, minimum=1)
    check_int(owner, "output_stride", output_stride, choices=(8, 16))
    check_backend(backend)
    _check_bool(owner, "fused", fused)
    for name, value in flags.items():
        _check_bool(owner, name, value)
    if atrous_rates is None:
        return None
    return check_rates(owner, "atrous_rates", atrous_rates, n_rates)


def _finish(owner: str, model: SegmentationModel, pretrained, pretrained_backbone, fused: bool, backend: str):
    """Local weights, then conversion: keys are identical before and after convert(), loading
    first just keeps the error messages about the plain modules."""
    if pretrained is not None and pretrained_backbone is not None:
        raise ValueError("%s: pass pretrained (the whole model) or pretrained_backbone, not both" % owner)
    if pretrained_backbone is not None:
        sd = model.backbone.adapt_classification_state_dict(read_state_dict(pretrained_backbone, owner,
                                                                            "pretrained_backbone"))
        load_state_dict_checked(model.backbone, sd, owner, "pretrained_backbone", os.fspath(pretrained_backbone))
    if pretrained is not None:
        sd = read_state_dict(pretrained, owner, "pretrained")
        hint = ""
        if (isinstance(model, DeepLabV3) and model.aux_classifier is None
                and any(k.startswith("aux_classifier.") for k in sd)):
            hint = " (the file has an auxiliary classifier: build the model with aux_loss=True)"
        load_state_dict_checked(model, sd, owner, "pretrained", os.fspath(pretrained), hint)
    if fused:
        model = convert(model, backend=backend)
    return model


def _resnet_trunk(owner, depth, output_stride, multi_grid, cascaded_blocks):
    # checked here too so that errors name the model, not the ResNet inside it
    if multi_grid is not None:
        multi_grid = check_rates(owner, "multi_grid", multi_grid, 3)
    check_int(owner, "cascaded_blocks", cascaded_blocks, choices=(0, 1, 2, 3))
    make = resnet50 if depth == 50 else resnet101
    return make(output_stride=output_stride, multi_grid=multi_grid, cascaded_blocks=cascaded_blocks)


def _deeplabv3_resnet(owner, depth, num_classes, output_stride, multi_grid, cascaded_blocks, atrous_rates, aux_loss,
                      pretrained, pretrained_backbone, fused, backend):
    rates = _check_common(owner, num_classes, output_stride, atrous_rates, 3, backend, fused, aux_loss=aux_loss)
    backbone = _resnet_trunk(owner, depth, output_stride, multi_grid, cascaded_blocks)
    rates = rates or _ASPP_RATES[output_stride]
    return_layers = {backbone.last_stage: "out"}
    aux = None
    if aux_loss:
        return_layers["layer3"] = "aux"
        aux = FCNHead(1024, num_classes)
    model = DeepLabV3(backbone, DeepLabHead(backbone.out_channels, num_classes, rates), return_layers, aux)
    return _finish(owner, model, pretrained, pretrained_backbone, fused, backend)


def deeplabv2_resnet101(num_classes: int = 21, output_stride: int = 8,
                        atrous_rates: Sequence[int] = (6, 12, 18, 24), pretrained: Optional[PathLike] = None,
                        pretrained_backbone: Optional[PathLike] = None, fused: bool = True,
                        backend: str = "auto") -> DeepLabV2:
    """DeepLab v2 (ASPP-L): ResNet-101 (output stride 8 as in the paper, or 16) + ASPP v2, the sum of
    four dilated 3x3 classifiers at rates 6/12/18/24 (``aspp_fused.nn.ASPPv2``).

    Keys: ``backbone.*`` (torchvision ResNet-101), ``classifier.convs.<i>.{weight,bias}``.
    ``pretrained``: a local state_dict of this model; ``pretrained_backbone``: a local torchvision
    ResNet-101 ImageNet checkpoint (its ``fc`` is skipped).
    """
    owner = "deeplabv2_resnet101"
    rates = _check_common(owner, num_classes, output_stride, atrous_rates, None, backend, fused)
    backbone = resnet101(output_stride=output_stride)
    model = DeepLabV2(backbone, ASPPv2(backbone.out_channels, num_classes, rates), {backbone.last_stage: "out"})
    return _finish(owner, model, pretrained, pretrained_backbone, fused, backend)


_V3_DOC = """DeepLab v3: ResNet-{depth} + torchvision's DeepLabHead (ASPP, 3x3 conv-BN-ReLU, classifier).

    Args:
        num_classes: classes of the logits.
        output_stride: 16 (layer4 dilated; ASPP rates 6/12/18) or 8 (layer3 and layer4 dilated;
            12/24/36).
        multi_grid: unit rates of layer4 (and of cascaded blocks), ``rate * multi_grid[i]``;
            default (1, 2, 4), the paper's; ``None`` = torchvision's rates.
        cascaded_blocks: 0-3 extra atrous copies of block4 (block5-7 of the paper), before the ASPP.
        atrous_rates: override the ASPP rates (3 positive ints).
        aux_loss: add torchvision's auxiliary FCNHead on layer3 (``aux_classifier``; torchvision's
            COCO checkpoints have one); ``forward`` still returns the main logits, use
            :meth:`SegmentationModel.forward_with_aux` for both.
        pretrained: local file with a state_dict of this model (e.g. torchvision's
            deeplabv3_resnet{depth} checkpoint: build it with ``output_stride=8,
            multi_grid=None, aux_loss=True`` to also get torchvision's numbers).
        pretrained_backbone: local torchvision ResNet-{depth} ImageNet checkpoint (``fc`` skipped).
        fused: convert the head to fused modules (``aspp_fused.convert``).
        backend: the fused modules' backend.

    Keys: torchvision's ``backbone.*``, ``classifier.*``, ``aux_classifier.*``.
    """


def deeplabv3_resnet50(num_classes: int = 21, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = (1, 2, 4),
                       cascaded_blocks: int = 0, atrous_rates: Optional[Sequence[int]] = None, aux_loss: bool = False,
                       pretrained: Optional[PathLike] = None, pretrained_backbone: Optional[PathLike] = None,
                       fused: bool = True, backend: str = "auto") -> DeepLabV3:
    return _deeplabv3_resnet("deeplabv3_resnet50", 50, num_classes, output_stride, multi_grid, cascaded_blocks,
                             atrous_rates, aux_loss, pretrained, pretrained_backbone, fused, backend)


def deeplabv3_resnet101(num_classes: int = 21, output_stride: int = 16,
                        multi_grid: Optional[Sequence[int]] = (1, 2, 4), cascaded_blocks: int = 0,
                        atrous_rates: Optional[Sequence[int]] = None, aux_loss: bool = False,
                        pretrained: Optional[PathLike] = None, pretrained_backbone: Optional[PathLike] = None,
                        fused: bool = True, backend: str = "auto") -> DeepLabV3:
    return _deeplabv3_resnet("deeplabv3_resnet101", 101, num_classes, output_stride, multi_grid, cascaded_blocks,
                             atrous_rates, aux_loss, pretrained, pretrained_backbone, fused, backend)


deeplabv3_resnet50.__doc__ = _V3_DOC.format(depth=50)
deeplabv3_resnet101.__doc__ = _V3_DOC.format(depth=101)


def deeplabv3_mobilenetv3_large(num_classes: int = 21, output_stride: int = 16,
                                atrous_rates: Optional[Sequence[int]] = None, aux_loss: bool = False,
                                pretrained: Optional[PathLike] = None, pretrained_backbone: Optional[PathLike] = None,
                                fused: bool = True, backend: str = "auto") -> DeepLabV3:
    """DeepLab v3: MobileNetV3-Large (dilated tail, output stride 16 or 8) + DeepLabHead on its
    960-channel last features.

    torchvision's layout (``backbone.<i>.*`` = ``features.<i>``, ``classifier.*``,
    ``aux_classifier.*`` on the stride-8 40-channel ``features.4`` with ``aux_loss=True``).
    torchvision runs its head at rates 12/24/36 at output stride 16; the default here is the
    DeepLab rule (6/12/18 at 16): pass ``atrous_rates=(12, 24, 36)`` for torchvision's numbers.
    ``pretrained_backbone``: a torchvision MobileNetV3-Large ImageNet checkpoint (its
    classifier is skipped). Other arguments as :func:`deeplabv3_resnet101`.
    """
    owner = "deeplabv3_mobilenetv3_large"
    rates = _check_common(owner, num_classes, output_stride, atrous_rates, 3, backend, fused, aux_loss=aux_loss)
    backbone = MobileNetV3Large(output_stride=output_stride).features
    rates = rates or _ASPP_RATES[output_stride]
    return_layers = {backbone.last_stage: "out"}
    aux = None
    if aux_loss:
        return_layers["4"] = "aux"
        aux = FCNHead(backbone[4].out_channels, num_classes)
    model = DeepLabV3(backbone, DeepLabHead(backbone.out_channels, num_classes, rates), return_layers, aux)
    return _finish(owner, model, pretrained, pretrained_backbone, fused, backend)


def lraspp_mobilenetv3_large(num_classes: int = 21, output_stride: int = 16, inter_channels: int = 128,
                             pretrained: Optional[PathLike] = None, pretrained_backbone: Optional[PathLike] = None,
                             fused: bool = True, backend: str = "auto") -> LRASPP:
    """LR-ASPP: MobileNetV3-Large (dilated tail) + torchvision's LRASPPHead on the stride-8
    ``features.4`` ("low", 40 channels) and the last features ("high", 960 channels).

    torchvision's layout and numbers at the default output stride 16
    (``lraspp_mobilenet_v3_large``; ``backbone.<i>.*``, ``classifier.{cbr,scale,low_classifier,
    high_classifier}.*``). Other arguments as :func:`deeplabv3_resnet101`.
    """
    owner = "lraspp_mobilenetv3_large"
    _check_common(owner, num_classes, output_stride, None, None, backend, fused)
    check_int(owner, "inter_channels", inter_channels, minimum=1)
    backbone = MobileNetV3Large(output_stride=output_stride).features
    head = LRASPPHead(backbone[4].out_channels, backbone.out_channels, num_classes, inter_channels)
    model = LRASPP(backbone, head, {"4": "low", backbone.last_stage: "out"})
    return _finish(owner, model, pretrained, pretrained_backbone, fused, backend)


def _deeplabv3plus(owner, backbone, low_stage, low_channels, num_classes, output_stride, atrous_rates, mid_norm,
                   pretrained, pretrained_backbone, fused, backend):
    rates = atrous_rates or _ASPP_RATES[output_stride]
    head = DeepLabV3PlusHead(backbone.out_channels, low_channels, num_classes, rates, mid_norm=mid_norm)
    model = DeepLabV3Plus(backbone, head, {low_stage: "low", backbone.last_stage: "out"})
    return _finish(owner, model, pretrained, pretrained_backbone, fused, backend)


def deeplabv3plus_resnet101(num_classes: int = 21, output_stride: int = 16,
                            multi_grid: Optional[Sequence[int]] = (1, 2, 4),
                            atrous_rates: Optional[Sequence[int]] = None, mid_norm: bool = False,
                            pretrained: Optional[PathLike] = None, pretrained_backbone: Optional[PathLike] = None,
                            fused: bool = True, backend: str = "auto") -> DeepLabV3Plus:
    """DeepLab v3+: ResNet-101 + separable ASPP + decoder (:class:`DeepLabV3PlusHead`).

    The decoder reads ``layer1`` (stride 4, 256 channels). ``output_stride`` 16 (ASPP rates
    6/12/18) or 8 (12/24/36); ``atrous_rates`` overrides. ``multi_grid`` as
    :func:`deeplabv3_resnet101`. ``mid_norm=True``: BN + ReLU between depthwise and pointwise
    (TF / mmseg), else smp's layout. Keys (our layout, no torchvision equivalent):
    ``backbone.*`` = torchvision ResNet-101, ``classifier.*`` = :class:`DeepLabV3PlusHead`.
    ``pretrained``: a local state_dict of this model; ``pretrained_backbone``: a local
    torchvision ResNet-101 ImageNet checkpoint (``fc`` skipped). ``fused`` / ``backend`` as
    :func:`deeplabv3_resnet101`.
    """
    owner = "deeplabv3plus_resnet101"
    rates = _check_common(owner, num_classes, output_stride, atrous_rates, 3, backend, fused, mid_norm=mid_norm)
    backbone = _resnet_trunk(owner, 101, output_stride, multi_grid, 0)
    return _deeplabv3plus(owner, backbone, "layer1", 256, num_classes, output_stride, rates, mid_norm, pretrained,
                          pretrained_backbone, fused, backend)


def deeplabv3plus_xception65(num_classes: int = 21, output_stride: int = 16,
                             atrous_rates: Optional[Sequence[int]] = None, mid_norm: bool = False,
                             pretrained: Optional[PathLike] = None, pretrained_backbone: Optional[PathLike] = None,
                             fused: bool = True, backend: str = "auto") -> DeepLabV3Plus:
    """DeepLab v3+: aligned Xception-65 + separable ASPP + decoder (:class:`DeepLabV3PlusHead`).

    The decoder reads the ReLU'd ``block1`` output (stride 4, 128 channels), as the common
    PyTorch port does. Keys (our layout): ``backbone.*`` = the port's AlignedXception (see
    :mod:`aspp_fused.models.xception`), ``classifier.*`` = :class:`DeepLabV3PlusHead`.
    ``pretrained_backbone``: a local state_dict of the port's AlignedXception. Other arguments
    as :func:`deeplabv3plus_resnet101`.
    """
    owner = "deeplabv3plus_xception65"
    rates = _check_common(owner, num_classes, output_stride, atrous_rates, 3, backend, fused, mid_norm=mid_norm)
    backbone = AlignedXception65(output_stride=output_stride)
    return _deeplabv3plus(owner, backbone, "block1", 128, num_classes, output_stride, rates, mid_norm, pretrained,
                          pretrained_backbone, fused, backend)


def deeplabv3plus_mobilenetv2(num_classes: int = 21, output_stride: int = 16,
                              atrous_rates: Optional[Sequence[int]] = None, mid_norm: bool = False,
                              pretrained: Optional[PathLike] = None, pretrained_backbone: Optional[PathLike] = None,
                              fused: bool = True, backend: str = "auto") -> DeepLabV3Plus:
    """DeepLab v3+: MobileNetV2 (dilated tail, TF DeepLab's rule) + separable ASPP on its
    320-channel ``features.17`` + decoder on ``features.3`` (stride 4, 24 channels).

    Keys (our layout): ``backbone.<i>.*`` = torchvision's ``features.<i>`` (0-17),
    ``classifier.*`` = :class:`DeepLabV3PlusHead`. ``pretrained_backbone``: a local torchvision
    MobileNetV2 ImageNet checkpoint (``features.18`` and ``classifier`` skipped). Other
    arguments as :func:`deeplabv3plus_resnet101`.
    """
    owner = "deeplabv3plus_mobilenetv2"
    rates = _check_common(owner, num_classes, output_stride, atrous_rates, 3, backend, fused, mid_norm=mid_norm)
    backbone = MobileNetV2(output_stride=output_stride).features
    return _deeplabv3plus(owner, backbone, "3", backbone[3].out_channels, num_classes, output_stride, rates, mid_norm,
                          pretrained, pretrained_backbone, fused, backend)
