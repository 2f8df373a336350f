#!/usr/bin/env bash
# One GPU vs two GPUs (torchrun, DDP and FSDP2) on the fashion-mnist preset, same global batch; prints tokens/s.
# Usage on a 2-GPU machine: bash bench/ddp_scaling.sh DATA_DIR STEPS
set -u
DATA=${1:-/usr/share/datasets/fashion-mnist}; STEPS=${2:-60}; OUT=${OUT:-/tmp}
common="--preset fashion-mnist --data fashion-mnist:$DATA --max-steps $STEPS --set train.eval_every=100000 --set train.log_every=10"
python3 -m sparse_transformer.cli train $common --out $OUT/run1 --device cuda > $OUT/run1.log 2>&1 || tail -5 $OUT/run1.log
torchrun --standalone --nproc-per-node 2 -m sparse_transformer.cli train $common --out $OUT/run2ddp --device cuda > $OUT/run2ddp.log 2>&1 || tail -5 $OUT/run2ddp.log
torchrun --standalone --nproc-per-node 2 -m sparse_transformer.cli train $common --out $OUT/run2fsdp --device cuda --set train.parallel=fsdp > $OUT/run2fsdp.log 2>&1 || tail -5 $OUT/run2fsdp.log
python3 - "$OUT" <<'PY'
import json, sys, statistics
out = sys.argv[1]
res = {}
for name in ("run1", "run2ddp", "run2fsdp"):
    try:
        rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl") if "tokens_per_s" in l]
    except OSError as e:
        print(name, "no metrics:", e); continue
    rates = [r["tokens_per_s"] for r in rows[2:]] or [r["tokens_per_s"] for r in rows]  # skip compile/warm-up steps
    res[name] = statistics.median(rates)
    print(f"{name:9s} median tokens/s {res[name]:12,.0f}  last loss {rows[-1]['loss']:.4f} bits/dim  steps {rows[-1]['step']}")
for name in ("run2ddp", "run2fsdp"):
    if name in res and "run1" in res:
        print(f"{name}: scaling efficiency on 2 GPUs = {res[name] / (2 * res['run1']):.1%}")
PY
