"""Layouts: element masks against independent loops over the paper's formulas, block structure, density, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_transformer import layouts
from sparse_transformer.layouts import EMPTY, FULL, PARTIAL


def brute(n, rule):
    return torch.tensor([[j <= i and rule(i, j) for j in range(n)] for i in range(n)])


def strided_rule(l, part):
    a1 = lambda i, j: i - j < l  # noqa: E731
    a2 = lambda i, j: (i - j) % l == 0  # noqa: E731
    return {"local": a1, "strided": a2, "both": lambda i, j: a1(i, j) or a2(i, j)}[part]


def fixed_rule(l, c, part, vert=0):
    a1 = lambda i, j: i // l == j // l  # noqa: E731
    a2 = lambda i, j: l - (vert + 1) * c <= j % l < l - vert * c  # noqa: E731
    return {"local": a1, "summary": a2, "both": lambda i, j: a1(i, j) or a2(i, j)}[part]


@pytest.mark.parametrize("n,l", [(1, 1), (17, 4), (64, 8), (97, 10), (100, 7)])
@pytest.mark.parametrize("part", ["local", "strided", "both"])
def test_strided_matches_formula(n, l, part):
    assert torch.equal(layouts.strided(n, l, part).element_mask(), brute(n, strided_rule(l, part)))


@pytest.mark.parametrize("n,l,c", [(1, 4, 1), (17, 4, 1), (64, 16, 4), (97, 16, 4), (130, 32, 8)])
@pytest.mark.parametrize("part", ["local", "summary", "both"])
def test_fixed_matches_formula(n, l, c, part):
    assert torch.equal(layouts.fixed(n, l, c, part).element_mask(), brute(n, fixed_rule(l, c, part)))


def test_fixed_per_head_summary_offsets():
    lay = layouts.fixed(100, 16, 4, heads=8, num_verts=4)
    m = lay.element_mask()
    assert m.shape == (8, 100, 100)
    for h in range(8):
        assert torch.equal(m[h], brute(100, fixed_rule(16, 4, "both", vert=h % 4))), h


def test_dense_local_image():
    assert torch.equal(layouts.dense(33).element_mask(), brute(33, lambda i, j: True))
    assert torch.equal(layouts.local(33, 5).element_mask(), brute(33, lambda i, j: i - j < 5))
    img = layouts.image(4, 3, 2, part="both")  # rows of 6 bytes
    assert img.n == 24
    assert torch.equal(img.element_mask(), brute(24, strided_rule(6, "both")))
    col = layouts.image(4, 3, 2, part="column").element_mask()
    assert col[23].nonzero().flatten().tolist() == [5, 11, 17, 23]  # same column and channel in every earlier row


def test_heads_split_between_parts():
    lay = layouts.stack([layouts.strided(40, 6, "local")] * 2 + [layouts.strided(40, 6, "strided")] * 2)
    m = lay.element_mask()
    assert torch.equal(m[0], brute(40, strided_rule(6, "local")))
    assert torch.equal(m[3], brute(40, strided_rule(6, "strided")))


def test_from_blocks_with_an_empty_row():
    bm = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    lay = layouts.from_blocks(bm, 8, n=20)
    m = lay.element_mask()
    ref = brute(20, lambda i, j: bool(bm[i // 8, j // 8]))
    assert torch.equal(m, ref)
    assert not m[8:16].any()  # block row 1 sees nothing


LAYOUTS = [
    layouts.dense(97), layouts.local(97, 9), layouts.strided(97, 10), layouts.strided(100, 10, "strided"),
    layouts.fixed(97, 16, 4), layouts.fixed(130, 32, 8, "summary"), layouts.fixed(130, 32, 8, heads=4, num_verts=4),
    layouts.stack([layouts.strided(97, 10, "local"), layouts.strided(97, 10, "strided")]),
    layouts.from_blocks(torch.tril(torch.ones(4, 4, dtype=torch.bool)), 32, n=100),
]


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
def test_density_and_row_counts_match_mask(lay):
    m = lay.element_mask()
    m = m[None] if m.dim() == 2 else m
    assert np.array_equal(lay.row_counts(), m.sum(-1).numpy())
    assert lay.density() == pytest.approx(m.double().mean().item(), abs=1e-12)


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("bs", [16, 32, (32, 16)])
def test_block_structure_exact(lay, bs):
    bm, bn = (bs, bs) if isinstance(bs, int) else bs
    m = lay.element_mask()
    m = m[None] if m.dim() == 2 else m
    n = lay.n
    got = lay.blocks(bs)
    for h in range(m.shape[0]):
        for r in range(got.shape[1]):
            for c in range(got.shape[2]):
                tile = m[h, r * bm:(r + 1) * bm, c * bn:(c + 1) * bn]
                want = EMPTY if not tile.any() else (FULL if tile.all() else PARTIAL)
                assert got[h, r, c] == want, (h, r, c, n)


def test_blocks_show_why_transposition_matters():
    # natural order: the strided part touches every causal tile (the paper's point), the band only the diagonal
    a2 = layouts.strided(1024, 32, "strided").blocks(32)[0]
    causal = layouts.dense(1024).blocks(32)[0]
    assert ((a2 != EMPTY) == (causal != EMPTY)).all()
    assert (layouts.strided(1024, 32, "local").blocks(32)[0] != EMPTY).sum() == 32 + 31


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 90), l=st.integers(1, 20), c=st.integers(1, 20), part=st.sampled_from(["local", "summary", "both"]))
def test_fixed_fuzz(n, l, c, part):
    if c > l:
        with pytest.raises(ValueError, match="summary"):
            layouts.fixed(n, l, c, part)
        return
    lay = layouts.fixed(n, l, c, part)
    m = lay.element_mask()
    assert torch.equal(m, brute(n, fixed_rule(l, c, part)))
    assert np.array_equal(lay.row_counts()[0], m.sum(-1).numpy())


def test_errors_name_the_values():
    with pytest.raises(ValueError, match="stride must be a positive int, got 0"):
        layouts.strided(10, 0)
    with pytest.raises(ValueError, match="part='rows'"):
        layouts.strided(10, 2, part="rows")
    with pytest.raises(ValueError, match="summary=5 must be <= stride=4"):
        layouts.fixed(10, 4, 5)
    with pytest.raises(ValueError, match="heads=6 must be a multiple of num_verts=4"):
        layouts.fixed(64, 16, 4, heads=6, num_verts=4)
    with pytest.raises(ValueError, match="share n"):
        layouts.stack([layouts.dense(4), layouts.dense(5)])
    with pytest.raises(ValueError, match="needs 3"):
        layouts.from_blocks(torch.ones(2, 2, dtype=torch.bool), 8, n=20)
    with pytest.raises(ValueError, match="O\\(n\\^2\\)"):
        layouts.dense(20000).element_mask()


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
def test_mask_mod_matches_element_mask(lay):
    m = lay.element_mask()
    m = m[None] if m.dim() == 2 else m
    i = torch.arange(lay.n)
    mod = lay.mask_mod()
    for h in range(m.shape[0]):
        assert torch.equal(mod(0, torch.tensor(h), i[:, None], i[None, :]), m[h])


def test_kernel_constants_match_python_ones():
    pytest.importorskip("triton")
    from sparse_transformer.attention import plan
    from sparse_transformer.attention.triton import common

    names = ["P_ALL", "P_WIN", "P_BLK", "P_STR", "P_SUM_L", "P_SUM_LO", "P_SUM_HI", "P_CUSTOM", "P_STR_MIN",
             "P_SUM_EXCL", "NUM_SEG_PARAMS"]
    for name in names:
        assert getattr(common, name).value == getattr(plan, name), name
