"""Cached-decoding attention: one query row against the layout's element rule and the float64 reference."""
import os

import numpy as np
import pytest
import torch

from sparse_transformer import layouts
from sparse_transformer.attention.decode import decode_attention, row_keys

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _empty_row_blocks(nb):
    m = torch.tril(torch.ones(nb, nb, dtype=torch.bool))
    m[1] = False
    return m


LAYOUTS = [
    ("dense", lambda n: layouts.dense(n)),
    ("local-w7", lambda n: layouts.local(n, 7)),
    ("strided-both-l10", lambda n: layouts.strided(n, 10)),
    ("strided-local-l10", lambda n: layouts.strided(n, 10, "local")),
    ("strided-a2-l10", lambda n: layouts.strided(n, 10, "strided")),
    ("fixed-both-l16-c4", lambda n: layouts.fixed(n, 16, 4)),
    ("fixed-summary-l16-c4", lambda n: layouts.fixed(n, 16, 4, "summary")),
    ("fixed-local-l16", lambda n: layouts.fixed(n, 16, 4, "local")),
    ("fixed-verts2-l16-c4", lambda n: layouts.fixed(n, 16, 4, heads=2, num_verts=2)),
    ("split-l10", lambda n: layouts.stack([layouts.strided(n, 10, "local"), layouts.strided(n, 10, "strided")])),
    ("image-4x5x3", lambda n: layouts.image(4, 5, 3)),
]
CUSTOM = ("custom-empty-row", lambda n: layouts.from_blocks(_empty_row_blocks(4), 32, n=n))


@pytest.mark.parametrize("name,make", LAYOUTS + [CUSTOM], ids=[c[0] for c in LAYOUTS + [CUSTOM]])
def test_row_keys_equal_the_element_rule(name, make):
    lay = make(60 if "image" in name else 100)
    mask = lay.element_mask()
    mask = mask[None] if mask.dim() == 2 else mask
    for h in range(mask.shape[0]):
        for t in range(lay.n):
            assert np.array_equal(row_keys(lay, h, t), np.flatnonzero(mask[h, t].numpy())), (h, t)


def _reference(q, kc, vc, lay, t, scale):
    """Dense masked softmax over row t of the element mask, in float64."""
    mask = lay.element_mask()
    mask = (mask if mask.dim() == 3 else mask[None])[:, t, :t + 1]  # (P, t + 1)
    s = torch.einsum("bhd,bhkd->bhk", q.double(), kc[:, :, :t + 1].double()) * scale
    s = s.masked_fill(~mask.to(s.device)[None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhk,bhkd->bhd", p, vc[:, :, :t + 1].double())


def _check(backend, name, make, dtype, n, dk, dv, positions, device, tol):
    lay = make(n)
    H = 2 if lay.num_heads == 1 else lay.num_heads
    B, T = 2, n + 3  # the cache may be longer than what is written
    kc = torch.randn(B, H, T, dk, dtype=dtype, device=device)
    vc = torch.randn(B, H, T, dv, dtype=dtype, device=device)
    for t in sorted({t for t in positions if t < n}):
        q = torch.randn(B, H, dk, dtype=dtype, device=device)
        out = decode_attention(q, kc, vc, lay, t, scale=dk ** -0.5, backend=backend)
        ref = _reference(q, kc, vc, lay, t, dk ** -0.5)
        assert out.shape == (B, H, dv) and out.dtype == dtype
        assert torch.isfinite(out).all()
        err = (out.double() - ref).abs().max().item()
        assert err <= tol, f"{name} t={t}: max error {err:.2e}"


@pytest.mark.parametrize("name,make", LAYOUTS + [CUSTOM], ids=[c[0] for c in LAYOUTS + [CUSTOM]])
def test_torch_decode_matches_reference(name, make):
    n = 60 if "image" in name else 100
    _check("torch", name, make, torch.float32, n, 16, 32, [0, 1, 9, 10, 31, 32, 33, 64, n - 1], "cpu", 1e-5)


@pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name,make", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_triton_decode_matches_reference_interpreter(name, make):
    pytest.importorskip("triton")
    n = 60 if "image" in name else 100
    _check("triton", name, make, torch.float32, n, 12, 32, [0, 9, 10, 33, n - 1], DEVICE, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name,make", LAYOUTS, ids=[c[0] for c in LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("dk,dv", [(8, 16), (24, 48), (64, 64), (128, 128), (32, 256)])
def test_triton_decode_gpu(name, make, dtype, dk, dv):
    n = 60 if "image" in name else 777
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _check("triton", name, make, dtype, n, dk, dv, [0, 1, 9, 10, 15, 16, 100, 511, n - 1], "cuda", tol)


def test_decode_rejects_bad_shapes():
    lay = layouts.strided(16, 4)
    with pytest.raises(ValueError, match="cache shapes"):
        decode_attention(torch.randn(1, 2, 8), torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 8), lay, 3)
    with pytest.raises(ValueError, match="head patterns"):
        decode_attention(torch.randn(1, 3, 8), torch.randn(1, 3, 16, 8), torch.randn(1, 3, 16, 8),
                         layouts.fixed(16, 4, 2, heads=2, num_verts=2), 3)


@pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name,make", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_triton_decode_many_chunks(name, make):
    """Chunks of 4 keys: both loops (range and grid) run over many chunks, partial and empty ones included."""
    pytest.importorskip("triton")
    from sparse_transformer.attention.decode import _device_params
    from sparse_transformer.attention.triton.decode import attn_decode

    n = 60 if "image" in name else 150
    lay = make(n)
    H = 2 if lay.num_heads == 1 else lay.num_heads
    kc, vc = torch.randn(1, H, n, 16, device=DEVICE), torch.randn(1, H, n, 8, device=DEVICE)
    for t in range(0, n, 7):
        q = torch.randn(1, H, 16, device=DEVICE)
        out = attn_decode(q, kc, vc, _device_params(lay, q.device), torch.tensor([t], device=DEVICE), 0.25, block_n=4)
        ref = _reference(q, kc, vc, lay, t, 0.25)
        assert (out.double() - ref).abs().max().item() <= 1e-5, t


@pytest.mark.skipif(not (INTERP or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_decode_never_reads_past_the_cache():
    """A device position past the cache is clamped to its last row: rows of the larger buffer behind it stay unread."""
    pytest.importorskip("triton")
    lay = layouts.strided(64, 8)
    big_k, big_v = torch.randn(2, 2, 64, 16, device=DEVICE), torch.randn(2, 2, 64, 16, device=DEVICE)
    kc, vc = big_k[:, :, :32], big_v[:, :, :32]  # a 32-row view into 64 rows
    q = torch.randn(2, 2, 16, device=DEVICE)
    past = decode_attention(q, kc, vc, lay, torch.tensor([40], device=DEVICE), backend="triton")
    last = decode_attention(q, kc, vc, lay, 31, backend="triton")
    assert torch.equal(past, last)


def test_decode_position_checks():
    lay = layouts.strided(16, 4)
    q, kc, vc = torch.randn(1, 2, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        decode_attention(q, kc, vc, lay, 16)
    with pytest.raises(TypeError, match="pos must be"):
        decode_attention(q, kc, vc, lay, 2.0)
    with pytest.raises(ValueError, match="int position"):
        decode_attention(q, kc, vc, lay, torch.tensor([3]), backend="torch")
    dense = layouts.dense(16)  # SDPA with a mask: an int and a device position give the same bits
    assert torch.equal(decode_attention(q, kc, vc, dense, 5), decode_attention(q, kc, vc, dense, torch.tensor([5])))
