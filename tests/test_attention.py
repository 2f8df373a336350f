"""sparse_attention: the reference and torch backends against float64 dense masked attention; tables; errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import check_against_reference, make_qkv
from sparse_transformer import layouts, sparse_attention
from sparse_transformer.attention.plan import FULL, build_tables, classify_segment, get_segments, segment_rule

CASES = [
    ("dense-n1", layouts.dense(1)),
    ("dense-n63", layouts.dense(63)),
    ("local-n97-w9", layouts.local(97, 9)),
    ("strided-both-n97-l10", layouts.strided(97, 10)),
    ("strided-a2-n100-l10", layouts.strided(100, 10, "strided")),
    ("strided-a1-n255-l16", layouts.strided(255, 16, "local")),
    ("fixed-both-n97-l16-c4", layouts.fixed(97, 16, 4)),
    ("fixed-summary-n130-l32-c8", layouts.fixed(130, 32, 8, "summary")),
    ("fixed-local-n17-l4-c1", layouts.fixed(17, 4, 1, "local")),
    ("fixed-verts4-n130-l32-c8", layouts.fixed(130, 32, 8, heads=4, num_verts=4)),
    ("split-heads-n97-l10", layouts.stack([layouts.strided(97, 10, "local"), layouts.strided(97, 10, "strided")])),
    ("image-4x8x3", layouts.image(4, 8, 3)),
    ("custom-empty-row-n100", layouts.from_blocks(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0],
                                                                  [0, 1, 0, 1]], dtype=torch.bool), 32, n=100)),
]


def _heads(lay, H=2):
    return H if lay.num_heads == 1 else lay.num_heads


@pytest.mark.parametrize("name,lay", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_torch_backend_matches_reference(name, lay, dtype):
    q, k, v = make_qkv(2, _heads(lay), lay.n, 16, dtype)
    fn = lambda q, k, v, lay: sparse_attention(q, k, v, lay, backend="torch", return_lse=True)  # noqa: E731
    check_against_reference(fn, q, k, v, lay, floor=1e-9 if dtype == torch.float64 else 1e-5)


LONG_PARTS = [  # parts longer than the sequence, some past int32 (the kernels' parameters)
    ("local-w2^32", lambda: layouts.local(50, 2**32 + 5)),
    ("strided-l2^31", lambda: layouts.strided(60, 2**31 + 7)),  # transposed slots would be L x C = 2^31 + 7
    ("strided-l100-n60", lambda: layouts.strided(60, 100)),
    ("fixed-local-l2^31", lambda: layouts.fixed(40, 2**31 + 3, 4, "local")),
]


@pytest.mark.parametrize("name,make", LONG_PARTS, ids=[c[0] for c in LONG_PARTS])
def test_parts_longer_than_the_sequence(name, make):
    """A window, stride or block of n or more acts as one of n: the plan clamps it (tables O(n), int32 parameters),
    and the torch backend matches the reference; a summary past int32 is refused with a clear error."""
    lay = make()
    P = torch.stack([s.params[:, :8].abs().max(0).values for s in get_segments(lay)])
    assert P.max() <= lay.n and sum(s.nq for s in get_segments(lay)) <= 2 * lay.n
    q, k, v = make_qkv(1, 2, lay.n, 16, torch.float32)
    fn = lambda q, k, v, lay: sparse_attention(q, k, v, lay, backend="torch", return_lse=True)  # noqa: E731
    check_against_reference(fn, q, k, v, lay, floor=1e-5)


def test_summary_past_int32_is_refused():
    with pytest.raises(ValueError, match="int32"):
        get_segments(layouts.fixed(70, 2**31 + 3, 4))


@pytest.mark.parametrize("D", [16, 64, 128])
def test_torch_backend_head_dims(D):
    lay = layouts.fixed(70, 16, 4)
    q, k, v = make_qkv(1, 3, 70, D, torch.float32)
    fn = lambda q, k, v, lay: sparse_attention(q, k, v, lay, backend="torch", return_lse=True)  # noqa: E731
    check_against_reference(fn, q, k, v, lay, floor=1e-5)


def test_reference_backend_and_scale():
    lay = layouts.strided(50, 7)
    q, k, v = make_qkv(1, 2, 50, 8, torch.float64, requires_grad=False)
    a = sparse_attention(q, k, v, lay, scale=0.3, backend="reference")
    b = sparse_attention(q, k, v, lay, scale=0.3, backend="torch")
    assert torch.allclose(a, b, atol=1e-12)
    m = lay.element_mask()
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~m, float("-inf"))
    assert torch.allclose(a, torch.softmax(s, -1) @ v, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 80), l=st.integers(1, 12), c=st.integers(1, 12), kind=st.sampled_from(["fixed", "strided"]),
       part=st.sampled_from(["local", "other", "both"]), H=st.integers(1, 3))
def test_torch_backend_fuzz(n, l, c, kind, part, H):
    c = min(c, l)
    if kind == "fixed":
        lay = layouts.fixed(n, l, c, {"other": "summary"}.get(part, part))
    else:
        lay = layouts.strided(n, l, {"other": "strided"}.get(part, part))
    q, k, v = make_qkv(1, H, n, 8, torch.float64)
    fn = lambda q, k, v, lay: sparse_attention(q, k, v, lay, backend="torch", return_lse=True)  # noqa: E731
    check_against_reference(fn, q, k, v, lay, floor=1e-9)


@pytest.mark.parametrize("name,lay", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 32)])
def test_tables_are_sound(name, lay, tiles):
    """Every visible pair lies in a listed tile of its segment, and a tile called full is full (kernels rely on it)."""
    bm, bn = tiles
    if lay.custom_block and (lay.custom_block % bm or lay.custom_block % bn):
        pytest.skip("custom tiles must nest")
    union = torch.zeros(lay.num_heads, lay.n, lay.n, dtype=torch.int64)
    for seg in get_segments(lay):
        qi, qok = seg.query_positions()
        kj, kok = seg.key_positions()
        for h in range(seg.params.shape[0]):
            cls = classify_segment(seg, lay, h, bm, bn)
            on = None
            if lay.custom_tiles is not None:
                t = torch.as_tensor(lay.custom_tiles[h])
                b = lay.custom_block
                on = t[qi[:, None].clamp(max=lay.n - 1) // b, kj[h][None].clamp(max=lay.n - 1) // b]
            vis = segment_rule(seg.params[h], qi[:, None], kj[h][None], on) & qok[:, None] & kok[h][None]
            pad_q, pad_k = cls.shape[0] * bm - len(qi), cls.shape[1] * bn - kj.shape[1]
            vis_p = torch.nn.functional.pad(vis, (0, pad_k, 0, pad_q))
            ok_p = torch.nn.functional.pad(qok[:, None] & torch.ones_like(vis), (0, pad_k, 0, pad_q))
            tiles_vis = vis_p.reshape(cls.shape[0], bm, cls.shape[1], bn)
            tiles_ok = ok_p.reshape(cls.shape[0], bm, cls.shape[1], bn)
            any_vis = tiles_vis.any(3).any(1).numpy()
            assert not (any_vis & (cls == 0)).any(), "a visible pair lies in a tile marked empty"
            full_ok = (tiles_vis | ~tiles_ok).all(3).all(1).numpy()
            assert not ((cls == FULL) & ~full_ok).any(), "a tile marked full has an invisible pair"
            qv, kv = qi[qok], kj[h][kok[h]]
            union[h % lay.num_heads][qv[:, None], kv[None]] += vis[qok][:, kok[h]].long()
    m = lay.element_mask()
    m = m[None] if m.dim() == 2 else m
    assert torch.equal(union, m.long()), "segments must cover the layout exactly once"


def test_transposed_strided_tables_are_block_diagonal():
    # n=3072, l=96 (CIFAR-10 rows): in natural order A2 touches every causal tile of 64 (paper-spec 9.2);
    # transposed, each of the 96 residues is one chunk of 3072/96 = 32 positions: one diagonal tile of 32 each
    lay = layouts.strided(3072, 96, "strided")
    assert torch.equal(lay.blocks(64) != 0, layouts.dense(3072).blocks(64) != 0)
    seg = get_segments(lay)[0]
    tab = build_tables(seg, lay, 32, 32)
    assert len(tab.q_idx) == 96


def test_validation_errors_name_the_argument():
    lay = layouts.fixed(32, 8, 2)
    q, k, v = make_qkv(1, 2, 32, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="q must be 4-D"):
        sparse_attention(q[0], k, v, lay)
    with pytest.raises(ValueError, match="same shape"):
        sparse_attention(q, k[:, :1], v, lay)
    with pytest.raises(TypeError, match="share a dtype"):
        sparse_attention(q, k.double(), v, lay)
    with pytest.raises(ValueError, match="n=32 of q does not match layout.n=33"):
        sparse_attention(q, k, v, layouts.fixed(33, 8, 2))
    with pytest.raises(ValueError, match="4 head patterns but q has heads=2"):
        sparse_attention(q, k, v, layouts.fixed(32, 8, 2, heads=4, num_verts=4))
    with pytest.raises(ValueError, match="backend='cuda'"):
        sparse_attention(q, k, v, lay, backend="cuda")
    with pytest.raises(TypeError, match="layout must be"):
        sparse_attention(q, k, v, "fixed")
    with pytest.raises(TypeError, match="floating"):
        sparse_attention(q.long(), k.long(), v.long(), lay)


def test_auto_is_torch_on_cpu():
    lay = layouts.strided(40, 5)
    q, k, v = make_qkv(1, 1, 40, 8, torch.float32, requires_grad=False)
    assert torch.equal(sparse_attention(q, k, v, lay), sparse_attention(q, k, v, lay, backend="torch"))


def test_plan_caches_are_bounded():
    from sparse_transformer.attention.plan import LRUCache

    c = LRUCache(size=3)
    for n in range(10):
        c.get(n, lambda: n * n)
    assert list(c.data) == [7, 8, 9]
    assert c.get(8, lambda: -1) == 64  # a hit does not rebuild
