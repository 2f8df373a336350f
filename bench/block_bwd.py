"""The block-causal band's one-kernel backward (sparse_transformer/attention/triton/block_backward.py) against the
generic dQ + dK/dV pair, side by side in one process on a GPU: graph-replayed fwd+bwd of the fixed setups (the same
protocol as `bench attention`: do_bench medians, q / k / v accumulating their gradients) and the kernels' profiler
times, with the block kernel off, on 64-row tiles and on 128-row tiles (which spill; see MAX_TILE), and with other
warps / pipeline stages (VARIANTS).
On the strided setups the block kernel takes the transposed chunks (a later segment, adding to the band's gradients)
in place of the fused dK/dV kernel with atomic dQ.
Usage: [ONLY="generic;2 stages"] python bench/block_bwd.py [fixed-12k fixed-64k strided-12k ...] (ONLY: the variants
whose label holds one of those strings, or equals "block kernel, 64-row tiles"); writes block-bwd-<date>.json to $OUT
(default bench/results). python bench/block_bwd.py plot JSON OUT.png draws the kernel times of the generic variant and of the
default settings (cut 64-row tiles, 2 stages), stacked, per setup."""
import json
import os
import sys
import time

import torch

from sparse_transformer import layouts, sparse_attention
from sparse_transformer.attention.triton import block_backward, function
from sparse_transformer.bench import SETUPS, _time_graph, _versions, kernel_times

# label: block_backward settings; the rest as in DEFAULTS, the bench's baseline (not the
# modules' defaults: those are 2 stages and cut tiles, the "cut 64-row tiles, 2 stages" variant)
_NOW = dict(RAGGED=True, STAGES=2, FIRST_CHUNKS=True)  # the modules' defaults before QUERY_TILES
VARIANTS = {"generic dQ + dK/dV": dict(BLOCK_BWD=False), "block kernel, 64-row tiles": {},
            "block kernel, 128-row tiles": dict(MAX_TILE=128),
            "block kernel, 64-row tiles, 2 stages": dict(STAGES=2),
            "block kernel, 64-row tiles, 8 warps": dict(WARPS=8),
            "block kernel, 64-row tiles, 8 warps, 2 stages": dict(STAGES=2, WARPS=8),
            "block kernel, cut 64-row tiles": dict(RAGGED=True),
            "block kernel, cut 64-row tiles, 2 stages": dict(RAGGED=True, STAGES=2),
            # the first-segment chunks (FIRST_CHUNKS, the default since 2026-11-30) on the strided-only setups below
            "block kernel on first chunks": dict(RAGGED=True, STAGES=2, FIRST_CHUNKS=True),
            # query tiles shorter than the key tiles (QUERY_TILE), and register caps that fit 3 programs per SM
            # where 2 fit before (MAXNREG; compiled for sm_90 with Triton 3.6, d=64 on 64-row key tiles: 237
            # registers with 64-row query tiles, 204 with 32 and 174 with 16; at 168 none spills, at 144 the 16-row
            # ones spill 56 bytes on the transposed chunks and none on the natural band)
            "defaults (cut 64-row tiles, 2 stages)": _NOW,
            "query tile 32 on short blocks, 168 registers (default)": dict(
                _NOW, QUERY_TILES={(64, 64): 32}, MAXNREG={(64, 64, 32): 168}),
            "query tile 32": dict(_NOW, QUERY_TILE=32),
            "query tile 32, 168 registers": dict(_NOW, QUERY_TILE=32, MAXNREG={(64, 64, 32): 168}),
            "query tile 16": dict(_NOW, QUERY_TILE=16),
            "query tile 16, 168 registers": dict(_NOW, QUERY_TILE=16, MAXNREG={(64, 64, 16): 168}),
            "query tile 16, 144 registers": dict(_NOW, QUERY_TILE=16, MAXNREG={(64, 64, 16): 144}),
            "query tile 32, 168 registers, 1 stage": dict(_NOW, QUERY_TILE=32, STAGES=1, MAXNREG={(64, 64, 32): 168})}
DEFAULTS = dict(BLOCK_BWD=True, MAX_TILE=64, STAGES=1, WARPS=None, RAGGED=False, FIRST_CHUNKS=False, QUERY_TILE=None,
                QUERY_TILES={}, MAXNREG={})
# the presets' interleaved strided layers alone (A2: the transposed segment first), beside `bench attention`'s setups
STRIDED_ONLY = {
    "strided-only-12k": (2, 8, 12288, 64, lambda: layouts.strided(12288, 128, "strided"), "strided-l128-a2"),
    "strided-only-3k": (8, 2, 3072, 128, lambda: layouts.strided(3072, 96, "strided"), "strided-l96-a2"),
}


def main(names):
    dev, tv, trv = _versions()
    rows = []
    out = os.path.join(os.environ.get("OUT", "bench/results"), f"block-bwd-{time.strftime('%Y%m%d-%H%M%S')}.json")
    was = {name: getattr(block_backward, name) for name in DEFAULTS}
    for name in names:
        B, H, n, D, make, pattern = {**SETUPS, **STRIDED_ONLY}[name]
        lay = make()
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn_like(q)
        ref = None
        only = [x for x in os.environ.get("ONLY", "").split(";") if x]
        for label, settings in VARIANTS.items():
            if only and label != "block kernel, 64-row tiles" and not any(x in label for x in only):
                continue
            for name_, value in dict(DEFAULTS, **settings).items():
                setattr(block_backward, name_, value)
            function.clear_cache()
            fn = lambda: sparse_attention(q, k, v, lay, backend="triton")  # noqa: E731
            q.grad = k.grad = v.grad = None
            fn().backward(go)
            grads = [t.grad.float().clone() for t in (q, k, v)]
            if ref is None:
                ref = grads
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref))
            fwd, fwdbwd = _time_graph(fn, go)
            kernels = kernel_times(lambda: fn().backward(go), width=26)
            row = dict(setup=name, variant=label, n=n, batch=B, heads=H, head_dim=D, pattern=pattern, fwd_graph_ms=fwd,
                       fwdbwd_graph_ms=fwdbwd, grad_rel_diff_to_generic=diff, kernels_us=kernels, device=dev, torch=tv,
                       triton=trv)
            rows.append(row)
            with open(out, "w") as f:  # after each row: a run stopped at a time limit keeps what it measured
                json.dump(rows, f, indent=1)
            print(f"{name:10s} {label:46s} graph fwd {fwd:.3f} ms, fwd+bwd {fwdbwd:.3f} ms, grads vs first variant "
                  f"{diff:.1e} | " + "  ".join(f"{a} {b:.0f}" for a, b in kernels), flush=True)
    for name_, value in was.items():
        setattr(block_backward, name_, value)
    function.clear_cache()
    print("wrote", out)


# kernel name -> labels of its first, second, ... launch in one fwd+bwd, per pattern family
LABELS = {
    "fixed": {"_attn_fwd_kernel": ["band fwd"], "_gather_fwd_kernel": ["summary fwd (Gluon)"],
              "_attn_bwd_dq_kernel": ["band dQ"], "_attn_bwd_dkdv_kernel": ["band dK/dV"],
              "_attn_bwd_block_kernel": ["band dQ+dK/dV (block kernel)"], "_gather_dq_kernel": ["summary dQ (Gluon)"],
              "_gather_dkdv_kernel": ["summary dK/dV (Gluon)"]},
    "strided": {"_attn_fwd_kernel": ["band fwd", "strided part fwd"], "_attn_bwd_dq_kernel": ["band dQ"],
                "_attn_bwd_dkdv_kernel": ["band dK/dV", "strided part dK/dV + atomic dQ (fused)"],
                "_attn_bwd_block_kernel": ["strided part dQ+dK/dV (block kernel)"]},
}
COLORS = {"band fwd": "#4c72b0", "summary fwd (Gluon)": "#8172b3", "strided part fwd": "#8172b3",
          "band dQ": "#dd8452", "band dK/dV": "#55a868", "band dQ+dK/dV (block kernel)": "#c44e52",
          "strided part dQ+dK/dV (block kernel)": "#c44e52", "summary dQ (Gluon)": "#ccb974",
          "strided part dK/dV + atomic dQ (fused)": "#64b5cd", "summary dK/dV (Gluon)": "#64b5cd"}
TORCH = "torch (gradient accumulation; dQ cast)"
TARGETS = {"fixed-12k": 1.0, "fixed-64k": 6.4, "strided-12k": 0.15, "strided-3k": 0.08, "strided-64k": 0.6}


def _labels(row):
    names, seen = LABELS["fixed" if row["pattern"].startswith("fixed") else "strided"], {}
    for kernel, us in row["kernels_us"]:
        k = seen[kernel] = seen.get(kernel, -1) + 1
        options = names.get(kernel)
        yield (options[min(k, len(options) - 1)] if options else TORCH), us


def plot(path, out, variants=("generic dQ + dK/dV", "block kernel, cut 64-row tiles, 2 stages")):
    """Per setup, one bar per variant: its kernels' profiler times stacked (ms), the graph fwd+bwd as a tick and the
    issue's target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.load(open(path)) if r["variant"] in variants]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    fig, axes = plt.subplots(1, len(setups), figsize=(3.3 * len(setups), 4.6))
    for ax, setup in zip(axes if len(setups) > 1 else [axes], setups):
        mine = sorted((r for r in rows if r["setup"] == setup), key=lambda r: variants.index(r["variant"]))
        for x, r in enumerate(mine):
            bottom = 0.0
            for label, us in _labels(r):
                ax.bar(x, us / 1e3, bottom=bottom, color=COLORS.get(label, "#b0b0b0"), edgecolor="white",
                       label=label)
                bottom += us / 1e3
            ax.plot([x - 0.4, x + 0.4], [r["fwdbwd_graph_ms"]] * 2, color="black")
            ax.text(x, r["fwdbwd_graph_ms"], f"{r['fwdbwd_graph_ms']:.3f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(TARGETS.get(setup, 0), color="red", linestyle="--", label="target")
        ax.set_xticks(range(len(mine)), [r["variant"].split(",")[0].replace(" dQ + dK/dV", "") for r in mine],
                      fontsize=8)
        ax.set_title(setup, fontsize=10)
    axes[0].set_ylabel("ms (black tick: graph-replayed fwd+bwd)") if len(setups) > 1 else None
    handles, labels = [], []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"fwd+bwd GPU time per kernel, {rows[0]['device']}, bf16 ({os.path.basename(path)})", fontsize=9)
    fig.tight_layout(rect=(0, 0.15, 1, 0.95))
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:
        plot(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1:] or ["fixed-12k", "fixed-64k"])
