"""From a layout to the work a kernel does: segments, index maps and tile tables.

Legend: n sequence length, H heads (TH: heads in a table, 1 when all heads share it), BM/BN query/key tile, L stride,
C chunk (transposed) or group (gathered summary) size, p a position in a segment's own ("virtual") order.

A layout's attention is split into at most three disjoint *segments*; the output is their union, merged through the
log-sum-exp (each segment is a partial softmax over a disjoint key set):

    natural     dense / local band / fixed block / custom tiles, in the sequence's own order.
    transposed  the strided part (i - j) % L == 0. Viewing the sequence as a [C, L] matrix (C = ceil(n / L)) and reading
                it column by column (p = (i % L) * C + i // L) turns every column into a contiguous chunk of C, and the
                strided part into causal attention inside each chunk: block-diagonal, hence block-sparse. This is the
                paper's transpose (section 5.5); kernels do it with an index map, never with a copy.
    gather      fixed summary cells. Keys are read in the order p -> (p // C) * L + lo + p % C, which packs the summary
                cells of all blocks next to each other, so a tile of BN keys is BN summary cells and the summary part is
                a few dense tiles instead of many thin ones.

Where two parts of one head overlap, the later segment excludes the overlap: the strided chunk drops its diagonal
(i - j >= L: the band has it) and the gathered summary drops the query's own block (the block part has it).

Tiles are classified EMPTY / PARTIAL / FULL by interval arithmetic on tile ranges (conservative: a tile may be called
partial when it is full, never the reverse; a full tile also has every query and key slot valid, so kernels load it
without bounds masks); `Layout.blocks()` uses the exact count-based classification below.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..layouts import (EMPTY, FULL, NUM_PARAMS, P_ALL, P_BLK, P_CUSTOM, P_STR, P_SUM_HI, P_SUM_L, P_SUM_LO, P_WIN,
                       PARTIAL, Layout, element_rule)

# Extra per-head columns of a segment's rule, after the layout's NUM_PARAMS.
P_STR_MIN = NUM_PARAMS  # stride part only counts i - j >= P_STR_MIN (drops what the band already holds)
P_SUM_EXCL = NUM_PARAMS + 1  # summary part skips the query's own block
NUM_SEG_PARAMS = NUM_PARAMS + 2

NATURAL, TRANSPOSED, GATHER = "natural", "transposed", "gather"


@dataclass(frozen=True, eq=False)
class Segment:
    kind: str  # NATURAL | TRANSPOSED | GATHER
    params: torch.Tensor  # int64 [TH, NUM_SEG_PARAMS]: the per-head element rule restricted to this segment
    n: int
    L: int = 0  # transposed: the stride; gather: the block length
    C: int = 0  # transposed: chunk length ceil(n / L); gather: summary cells per block

    @property
    def nq(self) -> int:  # length of the query order
        return self.L * self.C if self.kind == TRANSPOSED else self.n

    @property
    def nk(self) -> int:  # length of the key order
        if self.kind == TRANSPOSED:
            return self.L * self.C
        if self.kind == GATHER:
            return -(-self.n // self.L) * self.C
        return self.n

    def query_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(orig [nq], valid [nq]): the sequence position of each query slot of this segment."""
        p = torch.arange(self.nq)
        orig = (p % self.C) * self.L + p // self.C if self.kind == TRANSPOSED else p
        return orig, orig < self.n

    def key_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(orig [TH, nk], valid [TH, nk]): the sequence position of each key slot, per table head."""
        p = torch.arange(self.nk)[None]
        if self.kind == TRANSPOSED:
            orig = (p % self.C) * self.L + p // self.C
        elif self.kind == GATHER:
            orig = (p // self.C) * self.L + self.params[:, P_SUM_LO, None] + p % self.C
        else:
            orig = p
        orig = orig.expand(self.params.shape[0], -1)
        return orig, orig < self.n


def segment_rule(p, i, j, tile_on=None):
    """A segment's element rule on sequence positions: the layout rule plus the segment's exclusions (p: P_* columns
    on its first axis, as `element_rule`)."""
    vis = element_rule(p, i, j, tile_on)
    vis = vis & (i - j >= p[P_STR_MIN])
    L = torch.clamp(p[P_SUM_L], min=1)
    return vis & ~((p[P_SUM_EXCL] > 0) & (i // L == j // L))


def make_segments(layout: Layout) -> list[Segment]:
    """Split a layout into its natural / transposed / gather segments (only the non-empty ones)."""
    P = layout.params()
    n = layout.n
    # a window or stride of n or more acts as n does (every earlier key; only the diagonal): clamped, they fit the
    # kernels' int32 parameters, and the transposed part's slots (L x C) stay O(n); so does a block of n or more (one
    # block), clamped only where it would not fit (a block of n or more keeps the block kernel it has). A negative
    # window sees nothing, as none (the element rule's win > 0).
    P[:, P_WIN] = P[:, P_WIN].clamp(0, n)
    P[:, P_STR] = P[:, P_STR].clamp(max=n)
    P[:, P_BLK] = torch.where(P[:, P_BLK] > 2**31 - 1, n, P[:, P_BLK])
    if (P.abs() > 2**31 - 1).any():
        raise ValueError(f"layout {layout.name}: a part's length does not fit the kernels' int32 parameters "
                         f"({P.abs().max().item()} > 2^31 - 1)")
    TH = P.shape[0]
    nat = torch.zeros(TH, NUM_SEG_PARAMS, dtype=torch.int64)
    tra, gat = nat.clone(), nat.clone()
    for col in (P_ALL, P_WIN, P_BLK, P_CUSTOM):
        nat[:, col] = P[:, col]
    tra[:, P_STR] = P[:, P_STR]
    tra[:, P_STR_MIN] = P[:, P_WIN]
    for col in (P_SUM_L, P_SUM_LO, P_SUM_HI):
        gat[:, col] = P[:, col]
    gat[:, P_SUM_EXCL] = (P[:, P_BLK] > 0).long()
    segs = []
    if (nat[:, [P_ALL, P_WIN, P_BLK, P_CUSTOM]] > 0).any():
        segs.append(Segment(NATURAL, nat, n))
    if (tra[:, P_STR] > 0).any():
        strides = set(P[P[:, P_STR] > 0, P_STR].tolist())
        if len(strides) > 1:
            raise ValueError(f"all strided heads of one layout must share the stride, got {sorted(strides)}")
        L = strides.pop()
        segs.append(Segment(TRANSPOSED, tra, n, L=L, C=-(-n // L)))
    if (gat[:, P_SUM_L] > 0).any():
        on = P[:, P_SUM_L] > 0
        Ls = set(P[on, P_SUM_L].tolist())
        cs = set((P[on, P_SUM_HI] - P[on, P_SUM_LO]).tolist())
        if len(Ls) > 1 or len(cs) > 1:
            raise ValueError(f"all fixed heads of one layout must share stride and summary, got strides {sorted(Ls)}"
                             f" and summaries {sorted(cs)}")
        segs.append(Segment(GATHER, gat, n, L=Ls.pop(), C=cs.pop()))
    return segs


# ---- tile classification ----------------------------------------------------------------------------------------------
def _tile_ranges(limit: int, size: int):
    """First and last slot of each tile (the last tile may run past `limit`: those slots are invalid)."""
    start = np.arange(-(-limit // size), dtype=np.int64) * size
    return start, start + size - 1


def _key_band(seg: Segment, p: np.ndarray, q0: np.ndarray, q1: np.ndarray, bn: int):
    """First candidate key tile of each query tile and the band width W, or None when a row may reach any key tile.

    Window, block and transposed-chunk parts only reach back a bounded distance, so their tiles lie in a band of a few
    key tiles per row: classifying only the band keeps table building O(active tiles), not O((n / tile)^2) (at
    n = 2^20 with 64-wide tiles the full grid is 2^28 tiles: tens of seconds and >10 GB of temporaries)."""
    if seg.kind == NATURAL and not (p[P_ALL] or p[P_CUSTOM]):
        first = q0.copy()  # a head with no natural part: an empty row, any band will do
        if p[P_WIN]:
            first = np.minimum(first, q0 - p[P_WIN] + 1)
        if p[P_BLK]:
            first = np.minimum(first, (q0 // p[P_BLK]) * p[P_BLK])
    elif seg.kind == TRANSPOSED:
        first = (q0 // seg.C) * seg.C  # the chunk of the tile's first query
    else:
        return None
    lo = np.maximum(first, 0) // bn
    hi = np.minimum(q1, seg.nk - 1) // bn
    return lo, (int(max(1, (hi - lo).max() + 1)) if len(lo) else 1)


def classify_segment_sparse(seg: Segment, layout: Layout, h: int, bm: int, bn: int):
    """(rows, cols, classes) of the non-empty tiles of table head h of a segment (interval arithmetic,
    conservative), in row-major order; `classify_segment` is the same as a dense grid."""
    p = seg.params[h].numpy()
    q0, q1 = _tile_ranges(seg.nq, bm)
    nkb = -(-seg.nk // bn)
    band = _key_band(seg, p, q0, q1, bn)
    if band is None or band[1] >= nkb:
        kt = np.arange(nkb, dtype=np.int64)[None]  # (1, nkb): every key tile
    else:
        kt = band[0][:, None] + np.arange(band[1], dtype=np.int64)[None]  # (nqb, W): the band of each row
    k0 = kt * bn
    k1 = k0 + bn - 1
    q0, q1 = q0[:, None], q1[:, None]
    shape = np.broadcast_shapes(q0.shape, k0.shape)
    active, full = np.zeros(shape, bool), np.zeros(shape, bool)
    n = seg.n
    if seg.kind == NATURAL:
        q1c, k1c = np.minimum(q1, n - 1), np.minimum(k1, n - 1)
        if p[P_ALL]:
            active |= k0 <= q1c
            full |= k1 <= q0
        if p[P_WIN]:
            w = p[P_WIN]
            active |= (q1c - k0 >= 0) & (q0 - k1c <= w - 1)
            full |= (q0 - k1 >= 0) & (q1 - k0 <= w - 1)
        if p[P_BLK]:
            L = p[P_BLK]
            active |= (k0 <= q1c) & (np.maximum(q0 // L, k0 // L) <= np.minimum(q1c // L, k1c // L))
            full |= (q0 // L == q1 // L) & (q1 // L == k0 // L) & (k0 // L == k1 // L) & (k1 <= q0)
        if p[P_CUSTOM]:  # only on the full grid (no band): k0 is one row
            b = layout.custom_block
            if b % bm or b % bn:
                raise ValueError(f"custom block size {b} must be a multiple of the kernel tiles ({bm}, {bn})")
            t = layout.custom_tiles[h][(q0 // b)[:, 0]][:, (k0 // b)[0]]
            active |= t & (k0 <= q1c)
            full |= t & (k1 <= q0)
        full &= (k1 < n) & (q1 < n)
    elif seg.kind == TRANSPOSED:
        C, s = seg.C, int(p[P_STR_MIN] > 0)
        b_lo, b_hi = np.maximum(q0 // C, k0 // C), np.minimum(q1 // C, k1 // C)
        for b in (b_lo, b_hi, np.minimum(b_lo + 1, b_hi)):
            active |= (b_lo <= b_hi) & (np.maximum(k0, b * C) + s <= np.minimum(q1, b * C + C - 1))
        full |= (q0 // C == q1 // C) & (q1 // C == k0 // C) & (k0 // C == k1 // C) & (k1 + s <= q0)
        orig = (np.arange(seg.nk) % C) * seg.L + np.arange(seg.nk) // C
        k_valid, q_valid = np.ones(nkb, bool), np.ones(len(q0), bool)
        np.logical_and.at(k_valid, np.arange(seg.nk) // bn, orig < n)
        np.logical_and.at(q_valid, np.arange(seg.nq) // bm, orig < n)
        full &= k_valid[np.minimum(kt, nkb - 1)] & (k1 < seg.nk) & q_valid[:, None] & (q1 < seg.nq)
        active &= p[P_STR] > 0
    else:  # GATHER
        L, c, lo = seg.L, seg.C, p[P_SUM_LO]
        j0 = (k0 // c) * L + lo + k0 % c
        j1 = (k1 // c) * L + lo + k1 % c
        if p[P_SUM_EXCL]:
            active |= (j0 // L) < (q1 // L)
            full |= (j1 // L) < (q0 // L)
        else:
            active |= j0 <= np.minimum(q1, n - 1)
            full |= j1 <= q0
        active &= j0 < n
        full &= (j1 < n) & (q1 < n)
        active &= p[P_SUM_L] > 0
    active &= kt < nkb  # the band of the last rows may run past the last key tile
    full &= active
    rows, w = np.nonzero(active)
    cols = np.broadcast_to(kt, shape)[rows, w]
    return rows, cols, np.where(full[rows, w], FULL, PARTIAL).astype(np.int8)


def classify_segment(seg: Segment, layout: Layout, h: int, bm: int, bn: int) -> np.ndarray:
    """int8 [ceil(nq/BM), ceil(nk/BN)] tile classes of table head h of a segment (interval arithmetic, conservative)."""
    rows, cols, cls = classify_segment_sparse(seg, layout, h, bm, bn)
    out = np.zeros((-(-seg.nq // bm), -(-seg.nk // bn)), np.int8)
    out[rows, cols] = cls
    return out


def classify_natural(layout: Layout, h: int, bm: int, bn: int) -> np.ndarray:
    """Exact tile classes of head h of the whole layout in natural order, by counting visible pairs per tile."""
    n = layout.n
    nqb, nkb = -(-n // bm), -(-n // bn)
    if layout.heads[h].custom:
        m = layout.head(h).element_mask().numpy()
        counts = np.add.reduceat(np.add.reduceat(m, np.arange(0, n, bm), 0), np.arange(0, n, bn), 1)
    else:
        if n * (nkb + 1) > 4e8:
            raise ValueError(f"blocks() at n={n} with key block {bn} is too large to count exactly")
        x = np.minimum(np.arange(nkb + 1) * bn, n)[None]  # key boundaries
        i = np.arange(n)[:, None]
        R = _visible_before(layout.params()[h].numpy(), i, x)  # [n, nkb + 1]
        per_row = np.diff(R, axis=1)
        counts = np.add.reduceat(per_row, np.arange(0, n, bm), 0)
    rows = np.diff(np.minimum(np.arange(nqb + 1) * bm, n))[:, None]
    cols = np.diff(np.minimum(np.arange(nkb + 1) * bn, n))[None]
    return np.where(counts == 0, EMPTY, np.where(counts == rows * cols, FULL, PARTIAL)).astype(np.int8)


def _visible_before(p, i, x):
    """Number of keys j < x that query i sees (j <= i), for one head's parameter row (no custom part)."""
    m = np.minimum(x, i + 1)
    if p[P_ALL]:
        return m
    R = np.zeros(np.broadcast_shapes(i.shape, x.shape), dtype=np.int64)
    if p[P_WIN]:
        R += np.clip(m - np.maximum(0, i - p[P_WIN] + 1), 0, None)
    if p[P_STR]:
        L = p[P_STR]
        R += i // L - (i - m) // L
        if p[P_WIN]:
            R -= (x > i)  # the diagonal is in both parts
    if p[P_BLK]:
        R += np.clip(m - (i // p[P_BLK]) * p[P_BLK], 0, None)
    if p[P_SUM_L]:
        L, lo, hi = p[P_SUM_L], p[P_SUM_LO], p[P_SUM_HI]
        mm = np.minimum(m, (i // L) * L) if p[P_BLK] else m
        R += (mm // L) * (hi - lo) + np.clip(mm % L - lo, 0, hi - lo)
    return R


# ---- tables ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Tables:
    """Tile lists of one segment for tiles (BM, BN), per table head. Each row lists its full tiles first, then its
    partial ones (from q_mid on), so kernels run an unmasked loop and a masked loop."""

    bm: int
    bn: int
    nqb: int
    nkb: int
    q_ptr: torch.Tensor  # int32 [TH * nqb + 1]: row h * nqb + qb lists key tiles q_idx[q_ptr[r]:q_ptr[r + 1]]
    q_mid: torch.Tensor  # int32 [TH * nqb]: first partial entry of each row
    q_idx: torch.Tensor  # int32 [nnz]: key tile numbers
    k_ptr: torch.Tensor  # int32 [TH * nkb + 1]: column h * nkb + kb lists query tiles k_idx[k_ptr[c]:k_ptr[c + 1]]
    k_mid: torch.Tensor  # int32 [TH * nkb]
    k_idx: torch.Tensor  # int32 [nnz]: query tile numbers

    def to(self, device) -> "Tables":
        t = [getattr(self, f).to(device) for f in ("q_ptr", "q_mid", "q_idx", "k_ptr", "k_mid", "k_idx")]
        return Tables(self.bm, self.bn, self.nqb, self.nkb, *t)


def _csr(major, minor, part, n_major):
    """Entries grouped by `major` (full before partial, then by `minor`): (ptr, mid, idx)."""
    order = np.lexsort((minor, part, major))
    ptr = np.zeros(n_major + 1, np.int64)
    np.add.at(ptr, major + 1, 1)
    ptr = np.cumsum(ptr)
    n_full = np.zeros(n_major, np.int64)
    np.add.at(n_full, major[part == 0], 1)
    return ptr, ptr[:-1] + n_full, minor[order]


MAX_TABLE_ENTRIES = 2**31 - 1  # int32 tables (what the kernels index with)


def build_tables(seg: Segment, layout: Layout, bm: int, bn: int) -> Tables:
    TH = seg.params.shape[0]
    nqb, nkb = -(-seg.nq // bm), -(-seg.nk // bn)
    per_head = [classify_segment_sparse(seg, layout, h, bm, bn) for h in range(TH)]  # non-empty tiles only
    h = np.concatenate([np.full(len(r), k, np.int64) for k, (r, _, _) in enumerate(per_head)])
    r = np.concatenate([r for r, _, _ in per_head]).astype(np.int64)
    c = np.concatenate([c for _, c, _ in per_head]).astype(np.int64)
    part = (np.concatenate([x for _, _, x in per_head]) == PARTIAL).astype(np.int64)
    if len(r) > MAX_TABLE_ENTRIES:  # the int32 row pointers would wrap (the fixed pattern's summary part near n = 2^23)
        raise ValueError(f"{len(r)} active tiles of ({bm}, {bn}) in one {seg.kind} segment at n={seg.n}: the int32 "
                         f"tile tables hold at most {MAX_TABLE_ENTRIES}; use larger tiles or a sparser layout")
    q_ptr, q_mid, q_idx = _csr(h * nqb + r, c, part, TH * nqb)
    k_ptr, k_mid, k_idx = _csr(h * nkb + c, r, part, TH * nkb)
    i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a).astype(np.int32))  # noqa: E731
    return Tables(bm, bn, nqb, nkb, i32(q_ptr), i32(q_mid), i32(q_idx), i32(k_ptr), i32(k_mid), i32(k_idx))


class LRUCache:
    """A small least-recently-used cache: layouts for many lengths (e.g. decoding by growing prefixes) must not grow
    memory without bound."""

    def __init__(self, size: int = 256):
        self.size, self.data = size, OrderedDict()

    def get(self, key, build):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        value = self.data[key] = build()
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return value

    def clear(self):
        self.data.clear()


_SEGMENTS = LRUCache()
_TABLES = LRUCache()


def get_segments(layout: Layout) -> list[Segment]:
    """The layout's segments, built once per layout."""
    return _SEGMENTS.get(layout.key, lambda: make_segments(layout))


def get_tables(layout: Layout, index: int, bm: int, bn: int, device) -> Tables:
    """Tables of segment `index` for tiles (BM, BN) on a device; built once per (layout, segment, tiles, device)."""
    return _TABLES.get((layout.key, index, bm, bn, str(device)),
                       lambda: build_tables(get_segments(layout)[index], layout, bm, bn).to(device))


def get_plan(layout: Layout, bm: int, bn: int, device) -> list[tuple[Segment, Tables]]:
    """Every segment with its tables for one tile shape."""
    return [(s, get_tables(layout, k, bm, bn, device)) for k, s in enumerate(get_segments(layout))]
