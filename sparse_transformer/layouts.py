"""Attention layouts: which key j each query i may see, exactly as the Sparse Transformer paper defines them (section 4.3).

Legend: n sequence length, H heads, i query position, j key position (0-indexed, j <= i always), L stride (the paper's l),
C summary size (the paper's c), W window.

A `Layout` is a tuple of per-head `HeadPattern`s (one pattern shared by every head, or one per head). A head pattern is a
union of parts, each with the paper's formula, always intersected with causality (j <= i):

    all       j <= i                                   dense causal
    window W  i - j < W                                local band (strided A1 with W = L)
    block L   i // L == j // L                         fixed A1: the query's own block of L
    stride L  (i - j) % L == 0                         strided A2: every L-th earlier position
    summary   lo <= j % L < hi                         fixed A2: the last C positions of every block (hi - lo = C)
    custom    tile (i // b, j // b) is on in a user's block mask

Factories: `dense`, `local`, `strided`, `fixed`, `image`, `from_blocks`, and `stack` (different heads, different patterns).
Every layout gives `element_mask()`, `blocks(block_size)` (empty / partial / full tiles), `density()`, `mask_mod()` and
`to_block_mask()` for FlexAttention, and `draw()` (in `sparse_transformer.pictures`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes returned by Layout.blocks()

# Column order of the per-head integer parameter table used by every backend's element rule.
P_ALL, P_WIN, P_BLK, P_STR, P_SUM_L, P_SUM_LO, P_SUM_HI, P_CUSTOM = range(8)
NUM_PARAMS = 8


@dataclass(frozen=True)
class HeadPattern:
    """The parts one head attends to; 0 / None means the part is absent."""

    all: bool = False  # dense causal
    window: int = 0  # local band: i - j < window
    block: int = 0  # fixed A1: same block of `block`
    stride: int = 0  # strided A2: (i - j) % stride == 0
    summary: tuple[int, int, int] | None = None  # fixed A2: (L, lo, hi): lo <= j % L < hi
    custom: bool = False  # visible iff the head's tile is on in Layout.custom_tiles

    def params(self) -> list[int]:
        s = self.summary or (0, 0, 0)
        return [int(self.all), self.window, self.block, self.stride, s[0], s[1], s[2], int(self.custom)]

    def describe(self) -> str:
        parts = []
        if self.all:
            parts.append("dense")
        if self.window:
            parts.append(f"local(w={self.window})")
        if self.block:
            parts.append(f"block(l={self.block})")
        if self.stride:
            parts.append(f"strided(l={self.stride})")
        if self.summary:
            L, lo, hi = self.summary
            parts.append(f"summary(l={L}, cols {lo}..{hi - 1})")
        if self.custom:
            parts.append("custom")
        return " + ".join(parts) or "empty"


@dataclass(frozen=True, eq=False)
class Layout:
    """An exact causal attention layout over n positions, shared by all heads (one pattern) or one pattern per head.

    Build one with the factories of this module (`fixed`, `strided`, ...); use it with `sparse_attention`.
    """

    n: int
    heads: tuple[HeadPattern, ...]
    name: str = "custom"
    custom_tiles: np.ndarray | None = None  # bool [H, ceil(n/b), ceil(n/b)] for `from_blocks` layouts
    custom_block: int = 0

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if len(self.heads) < 1:
            raise ValueError("a layout needs at least one head pattern")
        for h in self.heads:
            _check_supported(h, self.n)

    # ---- identity -------------------------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        """Number of distinct head patterns: 1 means every head of the input uses the same pattern."""
        return len(self.heads)

    @cached_property
    def key(self) -> str:
        """A stable hash of everything that defines the layout (used to cache kernel tables)."""
        h = hashlib.sha1(repr((self.n, self.heads, self.custom_block)).encode())
        if self.custom_tiles is not None:
            h.update(np.ascontiguousarray(self.custom_tiles).tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        heads = self.heads[0].describe() if self.num_heads == 1 else f"{self.num_heads} per-head patterns"
        return f"Layout({self.name}, n={self.n}, {heads})"

    def head(self, h: int) -> "Layout":
        """The single-head layout of head h."""
        tiles = None if self.custom_tiles is None else self.custom_tiles[h % len(self.custom_tiles)][None]
        return dataclasses.replace(self, heads=(self.heads[h],), custom_tiles=tiles, name=f"{self.name}[head {h}]")

    def params(self) -> torch.Tensor:
        """int64 [num_heads, NUM_PARAMS]: each head's parts as numbers (columns P_*), for the element rule."""
        return torch.tensor([h.params() for h in self.heads], dtype=torch.int64)

    # ---- element level --------------------------------------------------------------------------------------------
    def mask_mod(self, device=None):
        """`mask_mod(b, h, q_idx, kv_idx) -> bool` for FlexAttention (works under vmap and on plain broadcast tensors).

        One shared pattern gives a closure over Python ints (what a user would write, and what compiles best);
        per-head and custom layouts look their parameters up in small tensors indexed by h.
        """
        if self.num_heads == 1 and self.custom_tiles is None:
            return _constant_mask_mod(self.heads[0])
        params = self.params().to(device)
        tiles = None if self.custom_tiles is None else torch.as_tensor(self.custom_tiles, device=device)
        nh = self.num_heads
        b_ = max(self.custom_block, 1)

        def mod(b, h, q_idx, kv_idx):
            on = None if tiles is None else tiles[h % nh, q_idx // b_, kv_idx // b_]
            return element_rule(params[h % nh], q_idx, kv_idx, on)

        return mod

    def element_mask(self, device=None) -> torch.Tensor:
        """bool [n, n] (one shared pattern) or [H, n, n]: entry (i, j) is True iff query i sees key j. O(n^2): small n only."""
        if self.n > 16384:
            raise ValueError(f"element_mask() is O(n^2); n={self.n} is too large (at most 16384)")
        i = torch.arange(self.n, device=device)
        masks = []
        for h in range(self.num_heads):
            p = self.params()[h].to(device)
            on = None
            if self.custom_tiles is not None:
                t = torch.as_tensor(self.custom_tiles[h], device=device)
                on = t[i[:, None] // self.custom_block, i[None, :] // self.custom_block]
            masks.append(element_rule(p, i[:, None], i[None, :], on))
        return masks[0] if self.num_heads == 1 else torch.stack(masks)

    def row_counts(self) -> np.ndarray:
        """int64 [num_heads, n]: the number of keys each query sees, computed per row in O(n) (no n^2 mask)."""
        i = np.arange(self.n, dtype=np.int64)
        out = np.zeros((self.num_heads, self.n), dtype=np.int64)
        for h, hp in enumerate(self.heads):
            if hp.custom:
                out[h] = _custom_row_counts(self.custom_tiles[h], self.custom_block, self.n)
                continue
            if hp.all:
                out[h] = i + 1
                continue
            cnt = np.zeros(self.n, dtype=np.int64)
            if hp.window:
                cnt += np.minimum(hp.window, i + 1)
            if hp.stride:  # differences 0, L, 2L, ... <= i, minus those already inside the window
                cnt += i // hp.stride + 1
                if hp.window:
                    cnt -= np.minimum(i, hp.window - 1) // hp.stride + 1
            if hp.block:
                cnt += i % hp.block + 1
            if hp.summary:
                L, lo, hi = hp.summary
                upto = (i + 1) if not hp.block else (i // L) * L  # with a block part: only earlier blocks are new
                cnt += (upto // L) * (hi - lo) + np.clip(upto % L - lo, 0, hi - lo)
            out[h] = cnt
        return out

    def density(self) -> float:
        """Fraction of the full n x n matrix that is visible (averaged over heads). Dense causal is about 0.5."""
        return float(self.row_counts().sum() / (self.num_heads * self.n * self.n))

    # ---- block level ----------------------------------------------------------------------------------------------
    def blocks(self, block_size: int | tuple[int, int] = 64) -> torch.Tensor:
        """int8 [num_heads, ceil(n/BM), ceil(n/BN)]: EMPTY (0), PARTIAL (1) or FULL (2) per (query tile, key tile).

        Exact in the natural order (no transposition): full means every pair in the tile is visible.
        """
        from .attention.plan import classify_natural

        bm, bn = _pair(block_size)
        out = [classify_natural(self, h, bm, bn) for h in range(self.num_heads)]
        return torch.from_numpy(np.stack(out).astype(np.int8))

    def to_block_mask(self, batch=None, heads=None, block_size=128, device="cuda"):
        """A FlexAttention `BlockMask` for this layout (needs torch.nn.attention.flex_attention)."""
        from torch.nn.attention.flex_attention import create_block_mask

        if heads is None and self.num_heads > 1:
            heads = self.num_heads
        return create_block_mask(self.mask_mod(device), batch, heads, self.n, self.n, device=device,
                                 BLOCK_SIZE=block_size)


def element_rule(p, i, j, tile_on=None):
    """The one element rule shared by the reference, the torch backend and FlexAttention: may query i see key j?

    p: int64 parameters with the P_* columns on its first axis ([NUM_PARAMS], or [NUM_PARAMS, ...] broadcasting with
    i and j for several heads at once); i, j: int64 positions that broadcast together; tile_on: for custom parts, whether
    the user's tile holding (i, j) is on (bool, same broadcast shape), else None. Returns a bool tensor.
    """
    one = torch.ones((), dtype=p.dtype, device=p.device)
    win, blk, strd, sl = p[P_WIN], p[P_BLK], p[P_STR], p[P_SUM_L]
    d = i - j
    vis = p[P_ALL] > 0
    vis = vis | ((win > 0) & (d < win))
    vis = vis | ((blk > 0) & (i // torch.maximum(blk, one) == j // torch.maximum(blk, one)))
    vis = vis | ((strd > 0) & (d % torch.maximum(strd, one) == 0))
    r = j % torch.maximum(sl, one)
    vis = vis | ((sl > 0) & (r >= p[P_SUM_LO]) & (r < p[P_SUM_HI]))
    if tile_on is not None:
        vis = vis | ((p[P_CUSTOM] > 0) & tile_on)
    return vis & (d >= 0)


def _constant_mask_mod(hp: HeadPattern):
    def mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        if hp.all:
            return d >= 0
        vis = d < 0  # all False
        if hp.window:
            vis = vis | (d < hp.window)
        if hp.block:
            vis = vis | (q_idx // hp.block == kv_idx // hp.block)
        if hp.stride:
            vis = vis | (d % hp.stride == 0)
        if hp.summary:
            L, lo, hi = hp.summary
            r = kv_idx % L
            vis = vis | ((r >= lo) & (r < hi))
        return vis & (d >= 0)

    return mod


# ---- factories --------------------------------------------------------------------------------------------------------
def dense(n: int) -> Layout:
    """Dense causal attention: every j <= i."""
    return Layout(n, (HeadPattern(all=True),), name="dense")


def local(n: int, window: int) -> Layout:
    """A causal band: i - j < window (the paper's A1 of the strided pattern when window = stride)."""
    _check_positive(window=window)
    return Layout(n, (HeadPattern(window=window),), name=f"local(w={window})")


def strided(n: int, stride: int, part: str = "both") -> Layout:
    """The strided pattern (section 4.3). part="local": A1 (i - j < stride); "strided": A2 ((i - j) % stride == 0);
    "both": their union in one head (the paper's merged head)."""
    _check_positive(stride=stride)
    pats = {"local": HeadPattern(window=stride), "strided": HeadPattern(stride=stride),
            "both": HeadPattern(window=stride, stride=stride)}
    return Layout(n, (_choose(pats, part),), name=f"strided(l={stride}, {part})")


def fixed(n: int, stride: int, summary: int, part: str = "both", heads: int = 1, num_verts: int = 1) -> Layout:
    """The fixed pattern (section 4.3). part="local": A1 (i // stride == j // stride); "summary": A2 (the last `summary`
    positions of every block of `stride`); "both": their union in one head (merged, as the paper's enwik8 model).

    With heads > 1 and num_verts > 1, head h uses the (h % num_verts)-th length-`summary` sub-block counted back from the
    end of each block as its summary cells (the paper: different heads, different summary cells; OpenAI's num_verts).
    """
    _check_positive(stride=stride, summary=summary, heads=heads, num_verts=num_verts)
    if summary > stride:
        raise ValueError(f"summary={summary} must be <= stride={stride}")
    if num_verts * summary > stride:
        raise ValueError(f"num_verts * summary = {num_verts}*{summary} must be <= stride={stride}")
    if num_verts > 1 and heads % num_verts:
        raise ValueError(f"heads={heads} must be a multiple of num_verts={num_verts}")
    pats = []
    for h in range(heads if num_verts > 1 else 1):
        v = h % num_verts
        summ = (stride, stride - (v + 1) * summary, stride - v * summary)
        pats.append(_choose({"local": HeadPattern(block=stride), "summary": HeadPattern(summary=summ),
                             "both": HeadPattern(block=stride, summary=summ)}, part))
    name = f"fixed(l={stride}, c={summary}, {part}" + (f", verts={num_verts})" if num_verts > 1 else ")")
    return Layout(n, tuple(pats), name=name)


def image(height: int, width: int, channels: int = 3, part: str = "both") -> Layout:
    """Row / column attention on a raster of height x width x channels, channels interleaved (HWC, as CIFAR-10 and
    ImageNet-64 in the paper): the strided pattern with stride = width * channels. part="row" is the previous row
    (A1), "column" the same column in every earlier row (A2), "both" their union."""
    _check_positive(height=height, width=width, channels=channels)
    p = {"row": "local", "column": "strided", "both": "both"}
    lay = strided(height * width * channels, width * channels, _choose(p, part))
    return dataclasses.replace(lay, name=f"image({height}x{width}x{channels}, {part})")


def from_blocks(block_mask, block_size: int, n: int | None = None, causal: bool = True) -> Layout:
    """A layout from a user's block mask: bool [nb, nb] or [H, nb, nb]; tile (r, c) on means queries of block r see keys
    of block c (intersected with causality). Rows whose tiles are all off see nothing and get a zero output."""
    if not causal:
        raise ValueError("causal=False is not supported: every layout here is autoregressive (j <= i)")
    m = np.asarray(torch.as_tensor(block_mask).cpu(), dtype=bool)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"block_mask must be [nb, nb] or [H, nb, nb], got shape {tuple(m.shape)}")
    _check_positive(block_size=block_size)
    nb = m.shape[1]
    n = nb * block_size if n is None else n
    if -(-n // block_size) != nb:
        raise ValueError(f"block_mask has {nb} blocks per side but n={n} with block_size={block_size} needs "
                         f"{-(-n // block_size)}")
    return Layout(n, tuple(HeadPattern(custom=True) for _ in range(m.shape[0])), name=f"blocks(b={block_size})",
                  custom_tiles=m, custom_block=block_size)


def stack(layouts: list[Layout]) -> Layout:
    """One layout per head (e.g. heads split between the strided pattern's A1 and A2: stack([a1, a1, a2, a2]))."""
    if not layouts:
        raise ValueError("stack() needs at least one layout")
    n = layouts[0].n
    for k, lay in enumerate(layouts):
        if lay.n != n:
            raise ValueError(f"all layouts must share n: layouts[0].n={n}, layouts[{k}].n={lay.n}")
    heads = tuple(h for lay in layouts for h in lay.heads)
    custom = [lay for lay in layouts if lay.custom_tiles is not None]
    tiles, blk = None, 0
    if custom:
        blk = custom[0].custom_block
        if any(lay.custom_block != blk for lay in custom):
            raise ValueError("stacked custom layouts must share their block size")
        nb = -(-n // blk)
        tiles = np.concatenate([lay.custom_tiles if lay.custom_tiles is not None else
                                np.zeros((lay.num_heads, nb, nb), bool) for lay in layouts])
    return Layout(n, heads, name="stack(" + ", ".join(lay.name for lay in layouts) + ")", custom_tiles=tiles,
                  custom_block=blk)


# ---- helpers --------------------------------------------------------------------------------------------------------
def _pair(b):
    bm, bn = (b, b) if isinstance(b, int) else tuple(b)
    for name, v in (("block size (query)", bm), ("block size (key)", bn)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return bm, bn


def _choose(options: dict, part: str):
    if part not in options:
        raise ValueError(f"part={part!r} is not one of {sorted(options)}")
    return options[part]


def _check_positive(**values):
    for k, v in values.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


def _check_supported(h: HeadPattern, n: int):
    """Only the paper's combinations (and dense/custom) are fused by the kernels; say so clearly otherwise."""
    parts = frozenset(k for k, v in (("all", h.all), ("window", h.window), ("block", h.block), ("stride", h.stride),
                                     ("summary", h.summary), ("custom", h.custom)) if v)
    allowed = [{"all"}, {"window"}, {"block"}, {"stride"}, {"summary"}, {"custom"}, {"window", "stride"},
               {"block", "summary"}]
    if parts not in [frozenset(a) for a in allowed]:
        raise ValueError(f"unsupported head pattern {h.describe()}: supported are one part alone, local+strided "
                         f"(window, stride) or block+summary (fixed)")
    if h.window and h.stride and h.window != h.stride:
        raise ValueError(f"a merged strided head needs window == stride, got window={h.window}, stride={h.stride}")
    if h.summary:
        L, lo, hi = h.summary
        if not (0 <= lo < hi <= L):
            raise ValueError(f"summary columns [{lo}, {hi}) must lie in [0, {L})")
        if h.block and h.block != L:
            raise ValueError(f"a merged fixed head needs block == summary stride, got {h.block} and {L}")


def _custom_row_counts(tiles: np.ndarray, b: int, n: int) -> np.ndarray:
    i = np.arange(n)
    qb = i // b
    cnt = np.zeros(n, dtype=np.int64)
    for kb in range(tiles.shape[1]):
        on = tiles[qb, kb]
        k0, k1 = kb * b, min(n, (kb + 1) * b)
        cnt += on * np.clip(np.minimum(i + 1, k1) - k0, 0, None)
    return cnt
