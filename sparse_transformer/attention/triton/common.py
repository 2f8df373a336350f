"""Device helpers shared by the forward and backward kernels: program order, index maps and the element rule.

Legend: p a slot in a segment's order, i / j sequence positions of queries / keys, L stride, C chunk or group size.
KIND 0 natural (p = i), 1 transposed (i = (p % C) * L + p // C, the paper's column-major view of a [C, L] matrix),
2 gather (keys only: j = (p // C) * L + lo + p % C, the summary cells of every block packed together).
"""
import os

import triton
import triton.language as tl

# Column indices of the per-head rule table (see layouts.P_* and plan.P_STR_MIN / P_SUM_EXCL); constexpr globals so
# that jit functions can read them.
P_ALL, P_WIN, P_BLK, P_STR, P_SUM_L, P_SUM_LO, P_SUM_HI, P_CUSTOM, P_STR_MIN, P_SUM_EXCL = (tl.constexpr(c) for c in
                                                                                          range(10))
NUM_SEG_PARAMS = tl.constexpr(10)

# forward.ONE_LOOP / backward.ONE_LOOP: walk a row's full and partial tiles in one loop, the element rule behind a
# runtime branch, instead of an unmasked loop then a masked one. With two loops in a row on 2+ stages, ptxas
# serializes the kernel's asynchronous wgmma (warning C7515 under Triton 3.6, sm_90; bench/compile_probe.py); on 1
# stage it does not. None (the default): each pass as function.Pass.one_loop says (one loop on 2+ stages, unless
# TUNING's "split" keeps it apart); SPARSE_TRANSFORMER_ONE_LOOP=0 / =1 forces split / one loop everywhere. H200,
# python bench/dev_probe.py oneloop (2026-12-01, dev-oneloop-20261201.json), per kernel, us, split -> one loop: band
# forward 56.4 -> 55.5 (strided-12k), 34.1 -> 32.9 (strided-3k, d=128), 46.5 -> 43.9 (fixed-12k); transposed forward
# 30.4 -> 28.0 (3k), 70.6 -> 70.4 (12k), 186.3 -> 192.2 (64k); band dQ 64.9 -> 63.5, 41.4 -> 38.2, 206.2 -> 203.2; the
# band's dK/dV 46.1 -> 43.5 on 2 stages (3k), but 82.0 -> 87.9 (12k) and 286.0 -> 312.6 (64k) on its 1 stage.
_ENV = os.environ.get("SPARSE_TRANSFORMER_ONE_LOOP", "")
if _ENV not in ("", "0", "1"):
    raise ValueError(f"SPARSE_TRANSFORMER_ONE_LOOP must be 0, 1 or unset, got {_ENV!r}")
ONE_LOOP_ENV = None if _ENV == "" else _ENV == "1"


def one_loop_default(setting, name: str, split) -> bool:
    """A pass's default: one loop where it pipelines its loads (setting (BM, BN, warps, stages) on 2+ stages), unless
    its name (fwd, dq, dkdv, fused) is in TUNING's "split"."""
    return setting[3] >= 2 and name not in split


def one_loop(setting, default: bool) -> bool:
    """Whether a pass runs its tiles in one loop: `setting` (forward.ONE_LOOP or backward.ONE_LOOP) when True /
    False, else the pass's default (function.Pass.one_loop)."""
    return default if setting is None else bool(setting)


@triton.jit
def _program_tile(GROUP, T_ON_X: tl.constexpr):
    """(tile order, batch x head index) of this program in a grid.program_grid."""
    if T_ON_X:
        return tl.program_id(0), tl.program_id(2)
    return tl.program_id(1), tl.program_id(2) * GROUP + tl.program_id(0)


@triton.jit
def _program_head(bh, H, TH, prm_ptr):
    """Batch and head of a program (64-bit: B * H * N * D may pass 2^31), its table head, rule row and summary offset."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    th = h % TH
    prm = prm_ptr + th * NUM_SEG_PARAMS
    return b, h, th, prm, tl.load(prm + P_SUM_LO)


@triton.jit
def _divmod(p, c):
    """(p // c, p % c) for slots p >= 0 and c > 0, in unsigned arithmetic: a signed division by a runtime value costs
    ptxas sign fix-ups on every element besides the unsigned one."""
    pu = p.to(tl.uint32)
    cu = tl.cast(c, tl.uint32)
    q = pu // cu
    return q.to(tl.int32), (pu - q * cu).to(tl.int32)


@triton.jit
def _query_positions(p, N, NQ, SEG_L, SEG_C, KIND: tl.constexpr):
    if KIND == 1:
        col, r = _divmod(p, SEG_C)
        i = r * SEG_L + col
    else:
        i = p
    return i, (p < NQ) & (i < N)


@triton.jit
def _key_positions(p, N, NK, SEG_L, SEG_C, lo, KIND: tl.constexpr):
    if KIND == 1:
        col, r = _divmod(p, SEG_C)
        j = r * SEG_L + col
    elif KIND == 2:
        blk, r = _divmod(p, SEG_C)
        j = blk * SEG_L + lo + r
    else:
        j = p
    return j, (p < NK) & (j < N)


@triton.jit
def _tile_mask(i, j, pq, pk, k_ok, prm, SEG_C, KIND: tl.constexpr, HAS_DENSE: tl.constexpr,
               HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr, HAS_SUM: tl.constexpr,
               KEY_ROWS: tl.constexpr = False):
    """The segment's element rule on a partial tile. i, pq: query positions / slots as a column [BM, 1]; j, pk, k_ok:
    key positions / slots / validity as a row [1, BN]. Per-element work is compares only: divisions act on vectors.
    HAS_WIN: 0 no head has a window, 1 a window beside other rules, 2 a window and no other rule (a causal band), 3
    that on natural keys (KIND 0), where it needs no key-validity mask: a key past the sequence (j >= N) is later than
    every query that is stored (i < N), so i - j wraps in the unsigned compare. HAS_STR: 2 the transposed part's
    rule as two compares per element against each query's chunk start (KEY_ROWS: each key's chunk end, where the
    keys are the program's own rows and the queries change per tile), and no key-validity mask either (a key slot at
    or before a stored query in its chunk is in the sequence: j = r' L + c <= r L + c = i < N)."""
    if KIND == 1:  # transposed strided part: causal inside a chunk, in slot order (the diagonal is dropped when the
        # band holds it: P_STR_MIN > 0)
        strict = (tl.load(prm + P_STR_MIN) > 0).to(tl.int32)
        if HAS_STR == 2 and KEY_ROWS:  # queries up to the key's chunk end: divisions on the program's keys only
            vis = (pq <= pk - _divmod(pk, SEG_C)[1] + (SEG_C - 1)) & (pk + strict <= pq) & (tl.load(prm + P_STR) > 0)
        elif HAS_STR == 2:  # keys from the query's chunk start on: divisions on the program's queries only
            vis = (pk >= pq - _divmod(pq, SEG_C)[1]) & (pk + strict <= pq) & (tl.load(prm + P_STR) > 0)
        else:
            vis = ((pq // SEG_C) == (pk // SEG_C)) & (pk + strict <= pq) & (tl.load(prm + P_STR) > 0)
    elif HAS_WIN >= 2:  # the window alone (function.WIN_ALONE): 0 <= i - j < win as one unsigned compare (win 0:
        # nothing; i - j < 0 wraps to >= 2^31)
        vis = (i - j).to(tl.uint32) < tl.load(prm + P_WIN).to(tl.uint32)
    else:
        d = i - j
        vis = d < 0  # all False, with the broadcast shape
        if HAS_DENSE:  # dense causal and custom tiles: inside a tile that is on, only causality remains
            vis = vis | ((tl.load(prm + P_ALL) + tl.load(prm + P_CUSTOM)) > 0)
        if HAS_WIN:
            win = tl.load(prm + P_WIN)
            vis = vis | ((win > 0) & (d < win))
        if HAS_BLK:
            blk = tl.load(prm + P_BLK)
            blk1 = tl.maximum(blk, 1)
            vis = vis | ((blk > 0) & (i // blk1 == j // blk1))
        if HAS_SUM:
            sl = tl.load(prm + P_SUM_L)
            sl1 = tl.maximum(sl, 1)
            r = j % sl1
            insum = (sl > 0) & (r >= tl.load(prm + P_SUM_LO)) & (r < tl.load(prm + P_SUM_HI))
            excl = (tl.load(prm + P_SUM_EXCL) > 0) & (i // sl1 == j // sl1)
            vis = vis | (insum & ~excl)
        vis = vis & (d >= 0)
    if HAS_WIN != 3 and HAS_STR != 2:  # (3, 2: keys past the sequence fail the rule for every stored query)
        vis = vis & k_ok
    return vis


@triton.jit
def _rule_on_partial(x, fill, i, j, pq, pk, k_ok, prm, SEG_C, partial, MASKED: tl.constexpr, ONE_LOOP: tl.constexpr,
                     KIND: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr,
                     HAS_STR: tl.constexpr, HAS_SUM: tl.constexpr, KEY_ROWS: tl.constexpr = False):
    """x where the element rule (_tile_mask, same arguments) holds, else fill, on a partial tile: with ONE_LOOP the
    runtime flag `partial` says so, else MASKED (constexpr); a full tile's x comes back as it is."""
    if ONE_LOOP:
        if partial:
            x = tl.where(_tile_mask(i, j, pq, pk, k_ok, prm, SEG_C, KIND, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR,
                                    HAS_SUM, KEY_ROWS), x, fill)
    elif MASKED:
        x = tl.where(_tile_mask(i, j, pq, pk, k_ok, prm, SEG_C, KIND, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM,
                                KEY_ROWS), x, fill)
    return x
