"""Triton kernels of aspp_fused (installed as aspp_fused.kernels).

One file per kernel family, each with its launcher and a pure-torch ``*_ref`` beside it.
The Triton backend is not implemented yet: see aspp_fused.functional.
"""
