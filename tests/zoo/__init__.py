"""Small DeepLab-style models written in the styles found in the wild, for convert()'s tests.

Each module exposes ``build()`` (a small random model) and ``EXPECTED`` (what convert must fuse:
``fused_sites`` = fused entries of explain(), ``heads`` = fused heads / sums among them).
"""
