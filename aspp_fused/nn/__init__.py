"""Drop-in modules: reference twins (plain PyTorch) and their fused versions."""
from aspp_fused.nn.fused import FusedAtrousConvBNReLU, FusedModule, FusedSeparableAtrousConv
from aspp_fused.nn.fused_sequential import FusedSequential
from aspp_fused.nn.fused_heads import FusedASPP, FusedASPPv2, FusedDeepLabHead, FusedLRASPPHead, FusedSeparableASPP
from aspp_fused.nn.reference import (
    ASPP, ASPPConv, ASPPPooling, ASPPv2, AtrousConvBNReLU, DeepLabHead, LRASPPHead, SeparableASPP,
    SeparableAtrousConv, SeparableConv2d,
)

__all__ = [
    "FusedModule", "FusedASPP", "FusedASPPv2", "FusedSeparableASPP", "FusedLRASPPHead", "FusedDeepLabHead",
    "FusedAtrousConvBNReLU", "FusedSeparableAtrousConv", "FusedSequential",
    "ASPP", "ASPPConv", "ASPPPooling", "ASPPv2", "AtrousConvBNReLU", "DeepLabHead", "LRASPPHead", "SeparableASPP",
    "SeparableAtrousConv", "SeparableConv2d",
]
