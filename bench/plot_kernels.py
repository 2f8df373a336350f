"""Where the GPU time of one fwd+bwd goes, per setup: our kernels stacked (from a `dev_probe.py fuse` JSON, the rows
that match the current TUNING), against the issue's target. Usage: python bench/plot_kernels.py DEV_FUSE.json OUT.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparse_transformer.attention.plan import get_segments  # noqa: E402
from sparse_transformer.attention.triton import function as fn  # noqa: E402
from sparse_transformer.bench import SETUPS  # noqa: E402

TARGET_MS = {"fixed-12k": 1.0, "strided-12k": 0.15, "strided-3k": 0.08, "fixed-64k": 6.4, "strided-64k": 0.6}
PART = {"natural": "band", "transposed": "transposed", "gather": "summary"}
COLOR = {"fwd": "#4c72b0", "dQ": "#dd8452", "dK/dV": "#55a868", "dK/dV+dQ": "#8172b3", "torch": "#b0b0b0"}


def current_row(rows, name):
    """The row of `name` measured with the fused tilings TUNING has now (none: the unfused row)."""
    _, _, _, D, make, _ = SETUPS[name]
    kinds = [seg.kind for seg in get_segments(make())]
    want = [(k, fn.TUNING[(k, 64 if D <= 64 else 128)]["fused"]) for i, k in enumerate(kinds) if i > 0]
    want = [(k, list(c)) for k, c in want if c is not None]
    for r in rows:
        cfg = r.get("config", r.get("dkdv"))
        if r["setup"] == name and ((not want and r["fused"] in (None, "none")) or [(r["fused"], cfg)] == want):
            return r, kinds
    raise SystemExit(f"no row for {name} with fused={want}")


def labels(kinds, n_kernels, fused):
    """Kernel roles in launch order: forward per segment, then per segment dQ and dK/dV (or one fused kernel), then
    torch's element-wise kernels (the fp32 dQ's cast, autograd's gradient accumulation)."""
    out = [("fwd", PART[k]) for k in kinds]
    for i, k in enumerate(kinds):
        out += [("dK/dV+dQ", PART[k])] if i > 0 and fused == k else [("dQ", PART[k]), ("dK/dV", PART[k])]
    return out + [("torch", "cast / .grad adds")] * (n_kernels - len(out))


def main(dev_json, out_png):
    rows = json.load(open(dev_json))
    names = [n for n in SETUPS if any(r["setup"] == n for r in rows)]
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 1.25 * len(names) + 0.8))
    for ax, name in zip(axes, names):
        row, kinds = current_row(rows, name)
        total = sum(row["us"]) / 1e3
        x = 0.0
        for (role, part), us in zip(labels(kinds, len(row["us"]), row["fused"]), row["us"]):
            ax.barh(0, us / 1e3, left=x, color=COLOR[role], edgecolor="white", height=0.6)
            if us / 1e3 > 0.075 * total:
                ax.text(x + us / 2e3, 0, f"{role}\n{part}", ha="center", va="center", fontsize=6.5, color="white")
            x += us / 1e3
        ax.axvline(TARGET_MS[name], color="crimson", lw=1.5)
        ax.text(TARGET_MS[name], 0.4, " target", color="crimson", fontsize=7, va="center")
        ax.set_ylim(-0.4, 0.52)
        ax.set_xlim(0, max(x, TARGET_MS[name]) * 1.15)
        ax.set_yticks([])
        ax.set_title(f"{name}: {x:.3f} ms of kernels, {x / TARGET_MS[name]:.1f}x the target", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("GPU time of one fwd+bwd (ms, torch.profiler, H200)", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOR.values()]
    fig.legend(handles, list(COLOR), ncol=5, fontsize=7, loc="upper center", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out_png, dpi=150)
    print(f"wrote {out_png}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
