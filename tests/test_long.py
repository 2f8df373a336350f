"""Long sequences (the audio presets, n up to 2^20): the chunked loss and recomputation against the plain model, and
index arithmetic at n >= 2^20 in the plan's tile tables and on the torch (CPU) attention path.

At n = 2^20 no n^2 mask can be built, so rows are checked against closed forms: the keys query i sees in each segment
(strided l: the band i - j < l and the column i - j = m l, m >= 1; fixed l, c: its own block and the summary cells of
earlier blocks), mapped to the segment's slots. `SPARSE_TRANSFORMER_SLOW=1` also runs a tiny model's training step at
n = 2^20 (30-50 s on a 2-core CPU).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparse_transformer import SparseTransformer, layouts, sparse_attention
from sparse_transformer.attention.plan import GATHER, NATURAL, TRANSPOSED, build_tables, get_segments
from sparse_transformer.layouts import P_SUM_LO
from sparse_transformer.presets import config_from_dict

N20 = 1 << 20
slow = pytest.mark.skipif(os.environ.get("SPARSE_TRANSFORMER_SLOW") != "1",
                          reason="slow (30-50 s on 2 CPU cores): set SPARSE_TRANSFORMER_SLOW=1")


# ---- the chunked loss and recomputation ------------------------------------------------------------------------------
def tiny_config(**overrides):
    base = dict(n_ctx=100, n_layer=2, n_head=2, d_model=16, d_ff=32, pattern="strided", arrangement="interleaved",
                stride=10, pos_emb="stride", backend="torch", dropout=0.0)
    return config_from_dict({**base, **overrides})


def tiny_model(**overrides):
    """A tiny fp32 model with every weight random (W_out is zero at init, which would make most gradients zero)."""
    torch.manual_seed(0)
    model = SparseTransformer(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def loss_and_grads(model, x, score_from=0):
    loss = model.loss(x, score_from)
    names, params = zip(*model.named_parameters())
    return loss, dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("chunk", [1, 7, 64, 150, 200, 1000])
@pytest.mark.parametrize("score_from", [0, 13])
def test_chunked_loss_equals_unchunked(chunk, score_from):
    """Chunks of 7 and 150 cross the boundary between the two sequences of the batch; 200 is exactly B * N."""
    whole = tiny_model(loss_chunk=0)
    chunked = tiny_model(loss_chunk=chunk)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randint(0, 256, (2, 100))
    loss_ref, grads_ref = loss_and_grads(whole, x, score_from)
    loss, grads = loss_and_grads(chunked, x, score_from)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_loss_is_cross_entropy_in_bits():
    model = tiny_model(loss_chunk=7)
    x = torch.randint(0, 256, (2, 100))
    with torch.no_grad():
        direct = F.cross_entropy(model(x)[:, 13:].reshape(-1, 256), x[:, 13:].reshape(-1)) / math.log(2)
        torch.testing.assert_close(model.loss(x, 13), direct, rtol=1e-6, atol=0)


def test_recompute_gives_the_same_loss_and_gradients():
    plain = tiny_model(recompute=False, loss_chunk=64)
    recomputed = tiny_model(recompute=True, loss_chunk=64)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 100))
    loss_ref, grads_ref = loss_and_grads(plain, x)
    loss, grads = loss_and_grads(recomputed, x)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ---- plan tables at n >= 2^20 ----------------------------------------------------------------------------------------
L, C_SUM = 1024, 32  # the audio-1m stride; enwik8's summary size


def visible_keys(kind, i, n):
    """Key positions query i sees in one segment of strided(n, L, "both") / fixed(n, L, C_SUM, "both") (closed form)."""
    if kind == ("strided", NATURAL):
        return np.arange(max(0, i - L + 1), i + 1)
    if kind == ("strided", TRANSPOSED):  # the column, without the diagonal (the band holds it)
        return np.arange(i - L, -1, -L)[::-1]
    if kind == ("fixed", NATURAL):
        return np.arange((i // L) * L, i + 1)
    blocks = np.arange(i // L)[:, None]  # ("fixed", GATHER): summary cells of earlier blocks only
    keys = (blocks * L + L - C_SUM + np.arange(C_SUM)[None]).ravel()
    return keys[keys < n]


def slot_of(seg, pos):
    """The slot of sequence positions in a segment's key order (and query order, except for GATHER's queries)."""
    if seg.kind == TRANSPOSED:
        return (pos % seg.L) * seg.C + pos // seg.L
    if seg.kind == GATHER:
        return (pos // seg.L) * seg.C + pos % seg.L - int(seg.params[0, P_SUM_LO])
    return pos


def query_position(seg, slot):
    return (slot % seg.C) * seg.L + slot // seg.C if seg.kind == TRANSPOSED else slot


def check_row(seg, tab, r, pattern, n):
    """Every visible pair of query tile r lies in a listed key tile; every tile listed as full is full."""
    lo, mid, hi = int(tab.q_ptr[r]), int(tab.q_mid[r]), int(tab.q_ptr[r + 1])
    listed, full = tab.q_idx[lo:hi].numpy(), tab.q_idx[lo:mid].numpy().astype(np.int64)
    full_slots = (full[:, None] * tab.bn + np.arange(tab.bn)[None]).ravel()
    for p in range(r * tab.bm, (r + 1) * tab.bm):
        i = query_position(seg, p)
        if p >= seg.nq or i >= n:
            assert len(full) == 0, f"row {r} lists full tiles but holds an invalid query slot {p}"
            continue
        slots = np.sort(slot_of(seg, visible_keys((pattern, seg.kind), i, n)))
        missing = np.setdiff1d(slots // tab.bn, listed)
        assert len(missing) == 0, f"query {i} (slot {p}) sees keys in tiles {missing[:5]} not listed in row {r}"
        if len(full_slots):
            at = np.minimum(np.searchsorted(slots, full_slots), len(slots) - 1)
            bad = full_slots[slots[at] != full_slots]
            assert len(bad) == 0, f"query {i}: key slots {bad[:5]} lie in tiles of row {r} listed as full"


def closed_form_rows(pattern, kind, nqb, bm, bn):
    """(listed tiles, full tiles) per query tile, at n = 2^20 (a multiple of L and of the tiles; C = n / L = L)."""
    q0 = np.arange(nqb) * bm
    q1 = q0 + bm - 1
    if (pattern, kind) == ("strided", NATURAL):  # the band: from the tile holding q0 - L + 1 to the diagonal
        first = np.maximum(0, q0 - L + 1) // bn
        full_first = np.maximum(0, -(-(q1 - L + 1) // bn))  # full: the whole tile within L of every query
        return q1 // bn - first + 1, q0 // bn - full_first  # ... and below the first query
    if kind in (TRANSPOSED, NATURAL):  # causal inside chunks / blocks of 1024: full below the diagonal tiles
        start = (q0 // L) * L // bn
        return q1 // bn - start + 1, q0 // bn - start
    b = q0 // L  # GATHER: the query's block; key tile c holds the summaries of blocks 2c and 2c + 1
    return (b + 1) // 2, b // 2


@pytest.mark.parametrize("n", [N20, N20 + 1], ids=["n1048576", "n1048577"])
@pytest.mark.parametrize("pattern,tiles", [("strided", (64, 64)), ("fixed", (128, 64))], ids=["strided", "fixed"])
def test_tables_at_2_20(pattern, tiles, n):
    lay = layouts.strided(n, L, "both") if pattern == "strided" else layouts.fixed(n, L, C_SUM, "both")
    bm, bn = tiles
    segs = get_segments(lay)
    assert [s.kind for s in segs] == ([NATURAL, TRANSPOSED] if pattern == "strided" else [NATURAL, GATHER])
    for seg in segs:
        tab = build_tables(seg, lay, bm, bn)
        assert tab.nqb == -(-seg.nq // bm) and tab.nkb == -(-seg.nk // bn)
        for t in (tab.q_ptr, tab.q_mid, tab.q_idx, tab.k_ptr, tab.k_mid, tab.k_idx):
            assert t.dtype == torch.int32 and (t >= 0).all()
        assert int(tab.q_ptr[-1]) == int(tab.k_ptr[-1]) == len(tab.q_idx) == len(tab.k_idx)
        assert int(tab.q_idx.max()) < tab.nkb and int(tab.k_idx.max()) < tab.nqb
        counts = (tab.q_ptr[1:] - tab.q_ptr[:-1]).numpy()
        fulls = (tab.q_mid - tab.q_ptr[:-1]).numpy()
        if n == N20:
            count, full = closed_form_rows(pattern, seg.kind, tab.nqb, bm, bn)
            np.testing.assert_array_equal(counts, count, err_msg=f"{seg.kind}: tiles per row")
            np.testing.assert_array_equal(fulls, full, err_msg=f"{seg.kind}: full tiles per row")
        last_query_tile = slot_of(seg, n - 1) // bm if seg.kind != GATHER else (n - 1) // bm
        rows = {0, 1, tab.nqb // 2 + 3, tab.nqb - 2, tab.nqb - 1, last_query_tile}
        for r in sorted(rows):
            check_row(seg, tab, r, pattern, n)


# ---- the torch attention path at n = 2^20 + 1 ------------------------------------------------------------------------
@pytest.mark.parametrize("part,stride", [("strided", 1 << 17), ("local", 16)], ids=["column-l131072", "band-l16"])
def test_torch_attention_rows_at_2_20(part, stride):
    """Rows cheap enough to compute at n = 2^20 + 1 (a 16-key band; a column of at most 8 keys in the transposed view,
    chunks of 9) match a direct softmax over their closed-form keys, near the end and elsewhere."""
    n = N20 + 1
    lay = layouts.strided(n, stride, part)
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    with torch.no_grad():
        out, lse = sparse_attention(q, k, v, lay, backend="torch", return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    rows = [0, 1, stride, n // 2 + 5, N20 - 1, N20] + torch.randint(0, n, (32,)).tolist()
    for i in rows:
        j = torch.arange(i, max(-1, i - stride), -1) if part == "local" else torch.arange(i, -1, -stride)
        s = q[0, 0, i] @ k[0, 0, j].T / 4.0  # scale 1 / sqrt(16)
        torch.testing.assert_close(out[0, 0, i], torch.softmax(s, 0) @ v[0, 0, j], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"row {i}: {m}")
        torch.testing.assert_close(lse[0, 0, i], torch.logsumexp(s, 0), rtol=1e-5, atol=1e-6)


@slow
@pytest.mark.slow
def test_tiny_model_trains_at_2_20():
    """A training step of a 1-layer, 1-head, d=16 model at n = 2^20 on the torch path: the loss of the zero W_out is
    exactly 8 bits, every gradient is finite, and W_out's is not zero."""
    cfg = config_from_dict(dict(n_ctx=N20, n_layer=1, n_head=1, d_model=16, d_ff=32, pattern="local", stride=16,
                                pos_emb="stride", backend="torch", recompute=True))
    model = SparseTransformer(cfg)
    x = torch.randint(0, 256, (1, N20))
    loss = model.loss(x)
    torch.testing.assert_close(loss, torch.tensor(8.0), rtol=1e-5, atol=0)
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert model.head.weight.grad.abs().sum() > 0


def test_tables_refuse_more_entries_than_int32_holds(monkeypatch):
    """The row pointers are int32: past 2^31 - 1 active tiles (the fixed pattern's summary part reaches that near
    n = 2^23 with l=128, c=32, 64-wide tiles) building the tables must fail loudly, not wrap."""
    from sparse_transformer.attention import plan

    lay = layouts.fixed(4096, 128, 32, "summary")
    (seg,) = get_segments(lay)
    entries = len(build_tables(seg, lay, 64, 64).q_idx)
    monkeypatch.setattr(plan, "MAX_TABLE_ENTRIES", entries - 1)
    with pytest.raises(ValueError, match="int32"):
        build_tables(seg, lay, 64, 64)
