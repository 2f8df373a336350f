"""Overlay the train / validation loss curves of several run folders (metrics.jsonl) in one PNG, and summarize them.
Usage: python bench/plot_runs.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--json OUT.json] [--eval LABEL=EVAL.json]"""
import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]  # the first lines include start-up
    return train, val, rates


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("png")
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--json", default=None)
    ap.add_argument("--eval", action="append", default=[], metavar="LABEL=EVAL_JSON")
    args = ap.parse_args()
    evals = dict(item.split("=", 1) for item in args.eval)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    summary = []
    for item in args.runs:
        label, run = item.split("=", 1)
        train, val, rates = read(Path(run))
        cfg = json.loads((Path(run) / "config.json").read_text())
        tokens = cfg["train"]["batch_size"] * cfg["model"]["n_ctx"]
        line, = ax.plot(*zip(*train), lw=0.8, alpha=0.6, label=f"{label} train")
        ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{label} validation")
        row = dict(run=label, steps=train[-1][0], final_val_bits_per_dim=val[-1][1],
                   median_tokens_per_s=statistics.median(rates), ms_per_step=1e3 * tokens / statistics.median(rates))
        if label in evals:
            ev = json.loads(Path(evals[label]).read_text())
            row.update(test_bits_per_dim=ev["bits_per_dim"], test_tokens=ev["tokens_scored"])
        summary.append(row)
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    lo = min(min(v for _, v in read(Path(i.split("=", 1)[1]))[1]) for i in args.runs)
    ax.set_ylim(lo - 0.1, lo + 1.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
