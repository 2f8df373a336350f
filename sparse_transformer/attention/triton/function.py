"""Autograd wrapper of the Triton kernels: tile choice per segment, launch order, merged segments.

Legend: B batch, H heads, N sequence, D head dim, BM/BN query/key tile.

Forward launches one kernel per segment of the layout's plan (natural, transposed strided, gathered summary); the
second and third fold their result into the first through the log-sum-exp inside the kernel. Backward computes
Delta = rowsum(dO * O) in the first dQ launch (or, for a block-causal band first, in its one-kernel backward,
block_backward.py) and launches dQ and dK/dV per segment, each adding to the rows the earlier ones wrote. A later
transposed strided segment whose chunks fit the block kernel runs it (one launch, no atomics); otherwise a later
segment whose kind has a `fused` tiling launches one dK/dV kernel that also adds its dQ share (fp32 atomics, then dQ is
cast back), unless torch's deterministic mode is on.
Tables are built once per (layout, tiles, device) and cached (plan.get_tables). Each direction's launches replay from a
CUDA graph once a call's tensors repeat (replay.py; SPARSE_TRANSFORMER_GRAPHS=0 turns it off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..plan import (GATHER, NATURAL, P_ALL, P_BLK, P_CUSTOM, P_STR, P_SUM_L, P_WIN, TRANSPOSED, LRUCache, Segment,
                    Tables, get_segments, get_tables)
from . import block_backward as _block
from . import replay
from .common import one_loop_default
from .backward import attn_backward
from .forward import attn_forward, gluon_for
from .launcher import capability, triton_version

# Launch settings per (segment kind, head-dim bucket) and kernel: (BM, BN, num_warps, num_stages); "fused" is the dK/dV
# kernel that also adds dQ (None: that kind keeps its dQ kernel). Measured on an H100 with bench/dev_kernels.py;
# experiments may edit TUNING and call clear_cache().
# "split": passes that keep two loops (full tiles, then partial ones) on 2+ stages, where the rest run one
# (common.one_loop). An optional "maxnreg" ({pass: (registers per thread, BM, BN)}) caps a pass's registers where it
# was measured, so that more programs fit on an SM (_register_caps).
TUNING = {
    (kind, d): dict(fwd=(64, 64, 4, 2), dq=(64, 64, 4, 2), dkdv=(64, 64, 4, 2), fused=None, split=())
    for kind in ("natural", "gather", "transposed") for d in (64, 128)
}
# gathered summary rows are long runs of full tiles: a 128x64 forward tile and 3 stages (sweep of 2026-11-23 on an
# H100, bench/dev_kernels.py: fixed-64k fwd+bwd 8.1 ms, against 8.8 ms with a 128x128 forward tile and 2-stage
# 64x64 backward tiles, and 10.0 ms with a 64x64 forward and 128x32 / 32x128 backward tiles)
TUNING[("gather", 64)] = dict(fwd=(128, 64, 4, 3), dq=(128, 64, 4, 2), dkdv=(64, 64, 4, 3), fused=None, split=())
# The gathered dK/dV (the Triton kernel: off Hopper, or SPARSE_TRANSFORMER_GLUON=0) is slower in one loop: H200, python
# bench/dev_probe.py oneloop with SPARSE_TRANSFORMER_GLUON=0 (2026-12-01, oneloop-triton-gather-20261201.log), 2665.3
# -> 3046.2 us (fixed-64k), 424.9 -> 482.3 (fixed-12k), while its forward and dQ gain (dQ 2054.7 -> 1915.1, 329.3 ->
# 303.0); at d=128, one loop spills 96 bytes there against 12 split (bench/compile_probe.py).
for _d in (64, 128):
    TUNING[("gather", _d)]["split"] = ("dkdv",)
# dK/dV of the short-row parts (band, transposed chunks) over 32-query slabs: per-kernel sweep of 2026-11-30 on an H200
# (python bench/dev_probe.py sweep): natural dK/dV 116.8 -> 98.9 us (strided-12k), 383.9 -> 338.1 us (strided-64k),
# 86.6 -> 71.8 us (fixed-12k); transposed dK/dV 152.6 -> 131.7 us and 448.8 -> 436.1 us. The gathered dQ with 128x64
# tiles, 2 stages: 395.0 -> 368.4 us (fixed-12k). Every other pass was fastest (or within noise) at 64x64, 4 warps, 2
# stages among 64x64 / 3 stages, 128x64 / 4 or 8 warps, 64x128, 128x128 / 8 warps and 32x64.
for _kind in ("natural", "transposed"):
    TUNING[(_kind, 64)]["dkdv"] = (32, 64, 4, 2)
# The band's dK/dV on 1 stage: Nsight Compute (ncu, strided-12k) showed every kernel of the strided setups at 12-25%
# occupancy, limited by registers and shared memory, with DRAM at 29-46% of peak and most stalls waiting on global
# loads; 1 stage frees shared memory. H200, python bench/dev_probe.py sweep (CONFIGS="32x64/4/1 ...", 2026-11-30,
# dev-sweep-20261130-stages1-*.json): natural dK/dV 98.6 -> 80.7 us (strided-12k), 342.1 -> 287.1 us (strided-64k).
# 1 stage on the other passes was slower or even (64x64: band fwd 56.8 -> 59.0, dQ 65.5 -> 73.0 us); a 64x32 transposed
# forward was faster at strided-12k (70.0 -> 62.7 us) but not at strided-64k (186.1 -> 186.9); it is the default
# since 2026-12-01 (below).
TUNING[("natural", 64)]["dkdv"] = (32, 64, 4, 1)
# Since the 2-stage passes run one loop (common.one_loop), the 64x64 transposed forward takes 192.4 us at strided-64k
# (186.3 split), and the 64x32 tiles on 1 stage are the faster there too: H200, CONFIGS="64x32/4/2 64x32/4/1" python
# bench/dev_probe.py sweep strided-12k strided-64k (2026-12-01, dev-sweep-20261201-64x32.json), transposed forward
# 70.8 -> 65.2 (2 stages) -> 63.5 us (1 stage) at strided-12k, 192.4 -> 195.3 -> 187.8 at strided-64k.
# On 3 stages (one loop) since 2026-12-01 (late): strided-64k 188.1 -> 171.8 us (below).
TUNING[("transposed", 64)]["fwd"] = (64, 32, 4, 3)
# Register caps on the forwards, with the tile they hold for: compiled for sm_90 (Triton 3.6, MAXNREG=96 python
# bench/compile_probe.py), the window band's 64x64 forward fits 96 registers without spills (121 uncapped: 5 programs
# per SM instead of 4) and the transposed 64x32 one 88 (95 uncapped; at 96 it spills 8 bytes). H200, python
# bench/dev_probe.py maxnreg (2026-12-01, dev-maxnreg-20261201.json), bf16, us, none -> capped: band forward 53.2 /
# 52.9 -> 50.4 (strided-12k), 179.8 / 181.4 -> 174.5 (strided-64k); transposed forward 63.0 / 63.4 -> 62.1, 186.2 /
# 186.9 -> 184.2; graph fwd 0.120 -> 0.116 ms (strided-12k). The band's dQ and dK/dV spill at 96 (136 and 452 bytes)
# and ran slower capped (61.9 -> 76.8 and 80.4 -> 145.9 us at strided-12k, MAXNREG_BWD=1 python bench/dev_probe.py
# maxnreg, dev-maxnreg-bwd-20261201.json), so they stay uncapped.
TUNING[("natural", 64)]["maxnreg"] = {"fwd": (96, 64, 64)}
TUNING[("transposed", 64)]["maxnreg"] = {"fwd": (88, 64, 32)}
# Both caps cost the asynchronous wgmma (ptxas C7512: serialized for want of registers) and still win. Rechecked after
# RULE_KEYS (below) took instructions off both: H200, bench/ab_rev.py (2026-12-01, ab-rev-20261201-153112-caps.json),
# us per kernel, in turn: the band forward uncapped 50.9-51.0 against 48.5-49.0 capped (strided-12k), 176.7-182.1
# against 168.4-176.6 (strided-64k); the transposed forward at 80 registers (6 programs per SM instead of 5) 55.7-55.8
# against 54.9-55.5 at 88 (strided-12k), even at strided-64k.
# Per-pass settings at d = 128 and the transposed forward on 3 stages: H200, PASSES=... python bench/dev_probe.py passes
# (2026-12-01, dev-passes-20261201-d128.json, dev-passes-20261201-transposed.json; graph-replayed fwd+bwd, us per
# kernel): the band's forward on 64x32 tiles, 3 stages 32.5 -> 26.8 us, its dQ on 64x32, 2 stages 36.8 -> 30.6, its
# dK/dV on 32x64, 2 stages 43.1 -> 39.8: strided-3k 0.223 -> 0.207 ms; the fixed pattern's block band at d = 128
# (fixed-12k-d128) 44.0 -> 39.2 us, 1.020 -> 1.017 ms. The 64x32 transposed forward on 3 stages, still under its cap of
# 88: strided-64k 188.1 -> 171.8 us, 1.322 -> 1.305 ms; strided-12k even (63.4 -> 61.8 us, 0.427 ms). On 3 stages the
# capped forward spilled 8 bytes (compiled for sm_90 under Triton 3.6, bench/compile_probe.py; none since RULE_KEYS);
# it measured faster than uncapped there all the same (176.3 us at strided-64k). Sweeps: dev-sweep-20261201-d128.json,
# -64x32-stages.json.
TUNING[("natural", 128)].update(fwd=(64, 32, 4, 3), dq=(64, 32, 4, 2), dkdv=(32, 64, 4, 2))
# The transposed strided part adds its dQ from the dK/dV kernel (fp32 atomics, no dQ kernel; backward.py), on 64x64
# tiles. On an H200 (python bench/dev_probe.py fuse, 2026-11-30, bench/results/dev-fuse-20261130-atomics.json;
# graph-replayed fwd+bwd, the fp32 dQ's final cast included): strided-64k 1.689 -> 1.631 ms, strided-12k 0.553 ->
# 0.547, strided-3k (d=128) 0.266 -> 0.259. Fusing the band or the gathered summary part was slower (gathered dK/dV with
# dQ at fixed-64k: 5793 us at best against 2157 + 3087 us apart, with per-element atomics or TMA bulk reductions), so
# they keep their dQ kernels.
# With d=128 on 4 warps that kernel spills 444 bytes per thread and 8 warps do not spill (python bench/compile_probe.py,
# Triton 3.6, sm_90); the strided-3k timing above ran on 32x32 / 4 warps, the shrunken tile of its 32-row chunks.
# Since 2026-11-30 (late) the block kernel (block_backward.py) takes the transposed part instead wherever its chunks
# fit (C up to 4 tiles: 256 at d <= 64, 128 at d = 128), with no fp32 dQ: H200, bench/block_bwd.py
# (block-bwd-20261130-174905.json), graph fwd+bwd strided-12k 0.511 -> 0.477 ms, strided-3k 0.256 -> 0.235,
# strided-64k 1.628 -> 1.404. The fused kernel remains for longer chunks and SPARSE_TRANSFORMER_BLOCK_BWD=0.
TUNING[("transposed", 64)]["fused"] = (64, 64, 4, 2)
TUNING[("transposed", 128)]["fused"] = (64, 64, 8, 2)
# Chunks (n / stride slots) that are not a multiple of the fused tile straddle tiles; there the fused kernel runs the
# "fused_ragged" tiling instead. H200, python bench/dev_probe.py fuse (bench/results/dev-fuse-20261130-ragged.json):
# strided-12k (chunks of 96) fused kernel 173 -> 138 us, graph fwd+bwd 0.548 -> 0.513 ms; strided-64k (chunks of 256,
# aligned) keeps 64x64: 523 us there against 549 at 32x32. The forward stays at 64x64 either way (71.7 us against 83.0
# at 32x32 on strided-12k, python bench/dev_probe.py sweep).
for _d in (64, 128):
    TUNING[("transposed", _d)]["fused_ragged"] = (32, 32, 4, 2)
# The d=128 fused tiling needs 129 KiB of shared memory (python bench/compile_probe.py, Triton 3.6, sm_90), more than
# sm_86 / sm_89 / sm_120 GPUs give a block (99-101 KiB): there the fused kernel runs the ragged tiling (40 KiB).
TUNING[("transposed", 128)]["fused_smem"] = 129 << 10
# The band's forward with d=128 measured faster on 3 stages with 64x64 tiles (strided-3k 35.5 -> 31.9 us, the same
# sweep), but that needs 112 KiB of shared memory, more than sm_86 / sm_89 GPUs have (99 KiB); its 64x32 tiles on 3
# stages (above) need 64 KiB and ran faster still.


@dataclass(frozen=True, eq=False)
class Pass:
    """One kernel's tiling: tile tables for (BM, BN) and its launch settings."""

    tab: Tables
    warps: int
    stages: int
    one_loop: bool = False  # full and partial tiles in one loop by default (common.one_loop_default)
    maxnreg: int | None = None  # a register cap per thread (Triton's maxnreg) for 16-bit inputs; None: none


@dataclass(frozen=True, eq=False)
class Launch:
    """Everything one segment's kernels need besides the tensors, computed once per (layout, head dim, device)."""

    seg: Segment
    prm: torch.Tensor  # int32 [TH, NUM_SEG_PARAMS] on the device
    flags: dict  # constexpr switches: segment kind and which rule parts exist
    fwd: Pass
    dq: Pass
    dkdv: Pass
    fused: Pass | None  # dK/dV that also adds dQ with fp32 atomics (no dQ kernel); None: this kind never fuses
    block: int | None = None  # block_backward runs this segment (block-causal band first, or transposed chunks)
    _cex: dict = field(default_factory=dict, repr=False)

    def constexprs(self, q, p: Pass, **extra) -> dict:
        """The kernel's constexprs and launch options for q's dtype and head dim (cached: do not modify)."""
        key = (id(p), q.dtype == torch.float32, q.shape[-1], *extra.items())
        cex = self._cex.get(key)
        if cex is None:
            cex = self._cex[key] = dict(extra, **self.flags, IEEE=key[1], BLOCK_M=p.tab.bm, BLOCK_N=p.tab.bn,
                                        HEAD_DIM=key[2], num_warps=p.warps, num_stages=p.stages)
            if p.maxnreg is not None and not key[1]:  # measured on bf16; fp32 spills under them (824 and 2536
                # bytes, against 16 and 732 uncapped: sm_90, Triton 3.6, bench/compile_probe.py with fp32 inputs)
                cex["maxnreg"] = p.maxnreg
        return cex


# A segment whose only rule is the window (the strided pattern's band) tests 0 <= i - j < W on partial tiles as one
# unsigned compare (common._tile_mask, HAS_WIN=2) instead of two signed ones and their logic: the band forward's PTX
# has 1339 instructions instead of 1402 (sm_90, Triton 3.6). False: the general rule, and no register cap on the band
# (_register_caps; experiments; clear_cache()).
WIN_ALONE = True
# Partial tiles without the key-validity mask where the rule already hides keys past the sequence from stored
# queries: the window band on natural keys (HAS_WIN=3), and the transposed part, whose rule also compares each key
# slot with its query's chunk start instead of dividing every key slot by C (HAS_STR=2) (common._tile_mask). Same
# bits either way. SASS per tile (sm_90, Triton 3.6, with the unsigned slot maps, common._divmod): transposed forward
# 564 -> 397 instructions, band forward 552 -> 516, band dQ 455 -> 419. H200, python bench/ab_rev.py against commit
# f924de7 (2026-12-01, ab-rev-20261201-151420-rulekeys-fold.json; graph fwd+bwd ms, us per kernel): strided-12k
# 0.4195 -> 0.4078 (transposed forward 59.3 -> 53.9, band dK/dV 80.8 -> 75.7), strided-3k 0.2042 -> 0.2020,
# strided-64k transposed forward 169.0 -> 157.4.
RULE_KEYS = True
MAXNREG_TRITON = (3, 6)  # the Triton version TUNING's register caps were measured with (not checked on others)
_LAUNCHES = LRUCache()
_KINDS = {"natural": 0, "transposed": 1, "gather": 2}


def clear_cache():
    """Drop the launch lists (tables, settings) and the CUDA graphs of them (replay.py): after changing a setting."""
    _LAUNCHES.clear()
    replay.clear()


def _pass(layout, idx, seg, cfg, head_dim, device, block_m, block_n, one_loop=False, cap=None) -> Pass:
    """The pass's tiles and launch settings; cap: TUNING's (registers, BM, BN) for it, applied on that tile only (a
    128x128 transposed forward under 88 registers crashed Triton 3.6's compiler)."""
    bm, bn, warps, stages = cfg
    if seg.kind == TRANSPOSED and seg.C < max(bm, bn):  # chunks shorter than a tile: shrink the tile to fit
        bm = bn = max(16, 1 << (seg.C.bit_length() - 1))
    bm, bn = block_m or bm, block_n or bn
    if layout.custom_block:  # kernel tiles nest inside the user's tiles
        bm, bn = math.gcd(bm, layout.custom_block), math.gcd(bn, layout.custom_block)
    if bm * bn < 64 * 64:
        warps = min(warps, 4)
    return Pass(get_tables(layout, idx, bm, bn, device), warps, stages, one_loop, cap_on_tile(cap, bm, bn))


def cap_on_tile(cap, bm: int, bn: int) -> int | None:
    """The registers of a TUNING cap (registers, BM, BN) on a BM x BN tile: its own tile only, else None."""
    return cap[0] if cap is not None and (bm, bn) == tuple(cap[1:]) else None


def get_launches(layout, head_dim, device, block_m=None, block_n=None) -> list[Launch]:
    """The layout's segments as launches, in order (cached: the hot path does no table or parameter work)."""
    key = (layout.key, head_dim, str(device), block_m, block_n)
    return _LAUNCHES.get(key, lambda: _build_launches(layout, head_dim, device, block_m, block_n))


def _smem_per_block(device) -> int | None:
    """Shared memory one block may use on `device`, in bytes (None: not a CUDA device, no limit known)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def _build_launches(layout, head_dim, device, block_m, block_n) -> list[Launch]:
    out = []
    for idx, seg in enumerate(get_segments(layout)):
        cfg = TUNING[(seg.kind, 64 if head_dim <= 64 else 128)]
        p = seg.params
        on = lambda *cols: bool((p[:, list(cols)] > 0).any())  # noqa: E731
        flags = dict(KIND=_KINDS[seg.kind], HAS_DENSE=on(P_ALL, P_CUSTOM), HAS_WIN=int(on(P_WIN)), HAS_BLK=on(P_BLK),
                     HAS_STR=on(P_STR), HAS_SUM=on(P_SUM_L))
        if WIN_ALONE and flags["HAS_WIN"] and not (flags["HAS_DENSE"] or flags["HAS_BLK"] or flags["HAS_SUM"]):
            flags["HAS_WIN"] = 2  # common._tile_mask: the window as one unsigned compare (windows are >= 0: plan)
            if RULE_KEYS and seg.kind == NATURAL:
                flags["HAS_WIN"] = 3
        if RULE_KEYS and seg.kind == TRANSPOSED and flags["HAS_STR"]:
            flags["HAS_STR"] = 2
        prm = p.to(device=device, dtype=torch.int32).contiguous()
        fused = cfg.get("fused") if idx > 0 else None  # the first segment never fuses
        if fused is not None and seg.kind == TRANSPOSED and cfg.get("fused_ragged"):
            smem = _smem_per_block(torch.device(device))
            if seg.C % fused[0] or seg.C % fused[1] or (smem is not None and smem < cfg.get("fused_smem", 0)):
                fused = cfg["fused_ragged"]
        settings = dict(cfg, fused=fused)
        split, caps = cfg.get("split", ()), _register_caps(cfg, device, flags["KIND"], flags["HAS_WIN"])
        passes = [None if settings[k] is None else _pass(layout, idx, seg, settings[k], head_dim, device, block_m,
                                                         block_n, one_loop_default(settings[k], k, split), caps.get(k))
                  for k in ("fwd", "dq", "dkdv", "fused")]
        block = _block_length(seg, head_dim, idx) if block_m is None and block_n is None else None
        out.append(Launch(seg, prm, flags, *passes, block=block))
    return out


def _register_caps(cfg, device, kind: int, has_win: int) -> dict:
    """TUNING's "maxnreg" where it was measured: on Hopper (sm_90: wgmma) with Triton MAXNREG_TRITON (caps_for says
    which segments); else none. Compiled for sm_80 the same caps
    spill (108 bytes on the band's forward at 96, 108 on the transposed one at 88; Triton 3.6). The fixed pattern's
    block band needs 153 registers uncapped and spills 52 bytes at 96; with the cap (before it was limited to the
    window band) its forward ran 43.9 -> 46.5 us (fixed-12k) and 133.2 -> 140.4 us (fixed-64k): H200, python
    bench/dev_probe.py maxnreg fixed-12k fixed-64k at commit 8bebc0a (dev-maxnreg-fixed-20261201.json)."""
    return caps_for(cfg, kind, has_win) if caps_measured_on(device) else {}


def caps_measured_on(device) -> bool:
    """Is `device` where the register caps were measured: Hopper (sm_90), with Triton MAXNREG_TRITON? (Also the
    block kernel's, block_backward._capped.)"""
    device = torch.device(device)
    return device.type == "cuda" and capability(device)[0] == 9 and triton_version() == MAXNREG_TRITON


def caps_for(cfg, kind: int, has_win: int) -> dict:
    """A segment's caps from its TUNING entry: the natural kind's hold for a band whose only rule is the window
    (HAS_WIN 2 or 3: the fixed pattern's block band spills under them)."""
    return {} if kind == _KINDS["natural"] and has_win < 2 else cfg.get("maxnreg", {})


def _block_length(seg, head_dim, idx) -> int | None:
    """The block length where block_backward takes the segment, else None: the first segment when it is exactly the
    block-causal band (every head: own L-row block, keys up to the query, and nothing else), or a transposed strided
    segment (its chunks of C are block-causal in its own order) that comes later or has every head (first: it must
    write every row; block_backward.FIRST_CHUNKS turns that case off), with a tile of the block kernel for L or
    C."""
    p = seg.params
    if seg.kind == TRANSPOSED and (idx > 0 or bool((p[:, P_STR] > 0).all())):  # first: every row in some chunk
        return seg.C if _block.block_tile(seg.C, head_dim, transposed=True) is not None else None
    if idx > 0 or seg.kind != NATURAL or bool(p[:, [P_ALL, P_WIN, P_CUSTOM]].any()):
        return None
    lengths = set(p[:, P_BLK].tolist())
    if len(lengths) != 1 or min(lengths) <= 0:
        return None
    L = lengths.pop()
    return L if _block.block_tile(L, head_dim) is not None else None


def _rows_q(q, launches):
    """q as the launches read it: a contiguous copy where a gathered segment may take the Gluon kernels (they read q
    through a row descriptor), else q itself. Copied here, the copy stays out of any CUDA graph of the launches
    (replay.py), which would otherwise keep it in the graph's private memory pool."""
    if not q.is_contiguous():
        for launch in launches[1:]:  # (the Gluon kernels merge into a band: never the first segment)
            gg = gluon_for(q, launch.seg)
            if gg is not None and gg.runs_on(q):
                return q.contiguous()
    return q


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, block_m, block_n):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        B, H, N, D = q.shape
        launches = get_launches(layout, D, q.device, block_m, block_n)
        o = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # contiguous: the backward gives dO its strides
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        qr = _rows_q(q, launches)  # (saved as q: the backward copies again, as the forward's copy is not kept)
        gluon = replay.run(("fwd", id(launches), scale), (qr, k, v, o, lse), launches, lambda: [
            attn_forward(qr, k, v, o, lse, launch, scale, merge=idx > 0) for idx, launch in enumerate(launches)])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.launches, ctx.scale, ctx.gluon = launches, scale, gluon
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for lse (one launch fewer); o's always arrives
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        launches = ctx.launches
        do = do.contiguous()
        q = q.contiguous() if any(ctx.gluon) else q  # as in the forward (_rows_q), outside any graph
        # The first segment keeps its dQ kernel (or the block kernel): it computes Delta = rowsum(dO * O) and stores
        # every row of dQ. Later segments may fuse dQ into dK/dV (fp32 atomics, in no fixed order: torch's
        # deterministic mode turns it off).
        deterministic = torch.are_deterministic_algorithms_enabled()
        fused = [launch.fused is not None and not deterministic and not (launch.block and _block.BLOCK_BWD)
                 for launch in launches]  # (the first segment never has a fused tiling)
        delta = torch.empty_like(lse)  # (B, H, N) fp32, written by the first segment's backward
        dq = torch.empty(do.shape, device=do.device, dtype=torch.float32 if any(fused) else do.dtype)
        # the gathered summary keys do not cover every key: when it runs alone, keys outside it get zero gradient
        gather_only = launches[0].seg.kind == GATHER
        alloc = torch.zeros if gather_only else torch.empty
        dk = alloc(k.shape, device=k.device, dtype=k.dtype)  # contiguous, whatever views k and v are
        dv = alloc(v.shape, device=v.device, dtype=v.dtype)

        def launch_all():
            for idx, launch in enumerate(launches):
                chunks = launch.seg.kind == TRANSPOSED
                if launch.block is not None and _block.BLOCK_BWD and (idx > 0 or not chunks or _block.FIRST_CHUNKS):
                    # one kernel: a block-causal band first (Delta too), or the transposed strided chunks (later:
                    # adding to the band's gradients; first, a strided-only layer: storing them and Delta)
                    _block.block_backward(q, k, v, o, do, dq, dk, dv, lse, delta, launch.block, ctx.scale,
                                          launch if chunks else None, first=idx == 0)
                    continue
                attn_backward(q, k, v, o, do, dq, dk, dv, lse, delta, launch, ctx.scale, fused[idx], first=idx == 0,
                              accum=idx > 0, accum_kv=idx > 0 or gather_only, gluon=ctx.gluon[idx])

        replay.run(("bwd", id(launches), ctx.scale, deterministic, *ctx.gluon),
                   (q, k, v, o, do, dq, dk, dv, lse, delta), launches, launch_all)
        return dq.to(q.dtype), dk, dv, None, None, None, None


def sparse_attention_triton(q, k, v, layout, scale=None, block_m=None, block_n=None):
    """Fused Triton block-sparse attention. q, k, v: [B, H, N, D] on CUDA (or CPU under TRITON_INTERPRET=1), D a power
    of two in 16..256. Returns (out [B, H, N, D], lse fp32 [B, H, N]). block_m / block_n override the tile shape."""
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"backend='triton' needs head_dim a power of two in 16..256, got head_dim={D}")
    if q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32, got float64 (use 'reference')")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return SparseAttentionFunction.apply(q, k, v, layout, scale, block_m, block_n)
