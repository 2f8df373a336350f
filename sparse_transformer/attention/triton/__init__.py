"""Fused Triton kernels for block-sparse attention (forward, backward)."""
