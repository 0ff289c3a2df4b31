"""DeepLab-family segmentation models whose ASPP heads run the fused ops.

    from aspp_fused.models import deeplabv3_resnet101
    model = deeplabv3_resnet101(num_classes=21, output_stride=16).eval()   # fused heads inside
    logits = model(images)                                                 # [N, 21, H, W]

Backbones (torchvision layouts where torchvision has them): resnet.py, mobilenet.py, xception.py.
Models: deeplab.py. Multi-scale + flip evaluation: inference.py.
"""
from aspp_fused.models.deeplab import (
    DeepLabV2, DeepLabV3, DeepLabV3Plus, DeepLabV3PlusHead, FCNHead, LRASPP, SegmentationModel, deeplabv2_resnet101,
    deeplabv3_mobilenetv3_large, deeplabv3_resnet50, deeplabv3_resnet101, deeplabv3plus_mobilenetv2,
    deeplabv3plus_resnet101, deeplabv3plus_xception65, lraspp_mobilenetv3_large,
)
from aspp_fused.models.inference import multi_scale_inference
from aspp_fused.models.mobilenet import MobileNetV2, MobileNetV3Large, mobilenet_v2, mobilenet_v3_large
from aspp_fused.models.resnet import ResNet, resnet50, resnet101
from aspp_fused.models.xception import AlignedXception65, xception65

__all__ = [
    "deeplabv2_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenetv3_large",
    "deeplabv3plus_resnet101", "deeplabv3plus_xception65", "deeplabv3plus_mobilenetv2", "lraspp_mobilenetv3_large",
    "multi_scale_inference",
    "SegmentationModel", "DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "LRASPP", "DeepLabV3PlusHead", "FCNHead",
    "ResNet", "resnet50", "resnet101", "MobileNetV2", "MobileNetV3Large", "mobilenet_v2", "mobilenet_v3_large",
    "AlignedXception65", "xception65",
]
