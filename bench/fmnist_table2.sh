#!/usr/bin/env bash
# The paper's Table 2 at small scale: the fashion-mnist preset with its strided pattern and the same run with dense
# attention (SDPA), the same steps, batch and seed, then test bits/dim of both, and samples from the strided model.
#   bash bench/fmnist_table2.sh DATA_DIR STEPS SECONDS OUT
# Both runs share one GPU at the same time (one device call); time per step alone is measured by `bench model`.
# SECONDS caps each run (SIGTERM: the run checkpoints and stops); eval and sampling use the last checkpoint.
set -uo pipefail
DATA=${1:?fashion-mnist idx folder}; STEPS=${2:-6000}; SECONDS_MAX=${3:-470}; OUT=${4:-runs/table2}
export PYTHONUNBUFFERED=1
ST="python -m sparse_transformer.cli"
mkdir -p "$OUT"
for attn in strided dense; do
  extra=(); [ "$attn" = dense ] && extra=(--set backend=dense)
  timeout -s TERM -k 90 "$SECONDS_MAX" $ST train --preset fashion-mnist --data "fashion-mnist:$DATA" \
    --max-steps "$STEPS" --out "$OUT/$attn" --device "${DEVICE:-cuda}" --set train.eval_every=1000 "${extra[@]}" \
    > "$OUT/$attn.log" 2>&1 &
done
wait
for attn in strided dense; do
  tail -3 "$OUT/$attn.log"
  $ST eval --checkpoint "$OUT/$attn" --split test --batch-size 64 ${MAXWIN:+--max-windows $MAXWIN} \
    --out "$OUT/eval-$attn.json" > /dev/null || echo "eval $attn failed"
  python - "$OUT/$attn/metrics.jsonl" "$OUT/eval-$attn.json" "$attn" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
ev = json.load(open(sys.argv[2]))
print(f"{sys.argv[3]}: steps {rows[-1]['step']}, median tokens/s {statistics.median(rates):,.0f} (shared GPU), "
      f"test {ev['bits_per_dim']:.4f} bits/dim over {ev['tokens_scored']:,} bytes")
EOF
done
# a slim copy of each run's last checkpoint (weights, config; no optimizer state) for sampling elsewhere
for attn in strided dense; do
  python - "$OUT/$attn" "$OUT/slim-$attn" <<'EOF2'
import shutil, sys
from pathlib import Path
from sparse_transformer.checkpoint import load_checkpoint, save_checkpoint
ck = load_checkpoint(sys.argv[1])
tmp = Path(sys.argv[2] + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
folder = save_checkpoint(tmp, ck.step, ck.model, {"note": "weights only"}, ck.config)
shutil.rmtree(sys.argv[2], ignore_errors=True)
shutil.move(str(folder), sys.argv[2])
shutil.rmtree(tmp)
print("slim checkpoint", sys.argv[2], "step", ck.step)
EOF2
done
