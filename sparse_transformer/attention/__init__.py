"""`sparse_attention(q, k, v, layout)`: exact block-sparse attention for the Sparse Transformer's layouts.

Backends: "triton" (fused CUDA kernels), "torch" (block-gather in plain PyTorch, CPU or GPU), "flex" (PyTorch
FlexAttention on the layout's element rule, CUDA), "reference" (dense masked attention: the ground truth, O(N^2)).
"auto" takes triton on CUDA when Triton is importable, else torch.
"""
from __future__ import annotations

import torch

from ..layouts import Layout
from .plan import LRUCache
from .reference import attention_ref
from .torch_blocks import attention_torch

BACKENDS = ("auto", "triton", "torch", "flex", "reference")


def sparse_attention(q, k, v, layout: Layout, scale: float | None = None, backend: str = "auto",
                     return_lse: bool = False):
    """Attention of each query over the keys its layout allows (causal, exact), shaped like
    `F.scaled_dot_product_attention(q, k, v)`.

    Args:
        q, k, v: [B, H, N, D] tensors, same shape, dtype (float16 / bfloat16 / float32 / float64) and device.
        layout: a `sparse_transformer.layouts.Layout` with layout.n == N and one pattern shared by all heads or exactly
            H patterns (one per head).
        scale: score scale, default 1 / sqrt(D).
        backend: "auto" | "triton" | "torch" | "flex" | "reference".
        return_lse: also return the log-sum-exp of each row's scores ([B, H, N], float32; -inf for an empty row).

    Returns: out [B, H, N, D] in q's dtype (and lse). A row that sees no key (only possible in custom layouts) gets
    zeros, never NaN. Differentiable in q, k, v.

    Example:
        >>> from sparse_transformer import layouts, sparse_attention
        >>> lay = layouts.fixed(1024, stride=128, summary=32)
        >>> q = k = v = torch.randn(1, 8, 1024, 64)
        >>> out = sparse_attention(q, k, v, lay)
    """
    _validate(q, k, v, layout, backend)
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "torch"
    if backend == "reference":
        out, lse = attention_ref(q, k, v, layout, scale, upcast=q.dtype == torch.float64)
        lse = lse.float()
    elif backend == "torch":
        out, lse = attention_torch(q, k, v, layout, scale)
    elif backend == "triton":
        from .triton.function import sparse_attention_triton

        out, lse = sparse_attention_triton(q, k, v, layout, scale)
    else:
        out, lse = _flex(q, k, v, layout, scale)
    return (out, lse) if return_lse else out


def _flex(q, k, v, layout, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda:
        raise ValueError("backend='flex' needs CUDA tensors")
    key = (layout.key, q.shape[1], str(q.device))
    mask = _FLEX_MASKS.get(key, lambda: layout.to_block_mask(None, q.shape[1] if layout.num_heads > 1 else None,
                                                             device=q.device))
    global _FLEX_FN
    if _FLEX_FN is None:
        _FLEX_FN = torch.compile(flex_attention, dynamic=False)
    out, lse = _FLEX_FN(q, k, v, block_mask=mask, scale=scale, return_lse=True)
    return out, lse


_FLEX_MASKS = LRUCache(32)
_FLEX_FN = None


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _validate(q, k, v, layout, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, n, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a sparse_transformer.layouts.Layout, got {type(layout).__name__}")
    B, H, N, D = q.shape
    if N != layout.n:
        raise ValueError(f"sequence length n={N} of q does not match layout.n={layout.n}")
    if layout.num_heads not in (1, H):
        raise ValueError(f"layout has {layout.num_heads} head patterns but q has heads={H}: give 1 (shared) or {H}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if B == 0 or H == 0 or D == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
