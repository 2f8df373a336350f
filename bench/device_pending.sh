#!/usr/bin/env bash
# The GPU measurements still owed to issues 6 and 8 (BENCHMARKS.md says which), in two device calls of < 10 minutes:
#   bash bench/device_pending.sh decode OUT    # GPU tests of decoding + decode-step and sampling benchmarks (~5 min)
#   bash bench/device_pending.sh long OUT      # audio-262k / audio-1m lengths, the n sweep, the enwik8 profile (~9 min)
#   bash bench/device_pending.sh step OUT      # the enwik8 training step, eager and with compiled blocks (~5 min)
#   bash bench/device_pending.sh compile OUT   # compiled decode step (tests, kernel sweep, bench) + compiled enwik8 step
#   bash bench/device_pending.sh decode2 OUT   # decode GPU tests, decode bench with --compile, sampling, enwik8 profile
# Run from the repository root on the device machine; JSON and logs land in OUT (pass $OUT there).
set -uo pipefail
WHAT=${1:?decode, long or step}; OUT=${2:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
ST="python -m sparse_transformer.cli"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "$WHAT" in
  decode)
    timeout 240 python -m pytest -m gpu tests/test_decode.py tests/test_generate.py tests/test_sample.py -q -n 8 \
      -p no:cacheprovider -rf 2>&1 | tail -n 15 | tee "$OUT/gpu-tests-decode.log"
    timeout 180 $ST bench decode --preset audio-65k --contexts 4096 16384 65536 --batch 1 4 --out "$OUT" \
      2>&1 | tee "$OUT/decode.log"
    timeout 120 $ST bench decode --preset cifar10 --images 64 --out "$OUT" 2>&1 | tail -n 3 | tee "$OUT/sampling.log"
    ;;
  long)
    timeout 120 $ST bench max-length --preset audio-262k --n 262144 --dense-scale --out "$OUT" 2>&1 \
      | tee "$OUT/262k.log"
    timeout 150 $ST bench model --preset audio-1m --n 16384 65536 262144 1048576 --recompute on --steps 3 \
      --out "$OUT" 2>&1 | tee "$OUT/sweep.log"
    timeout 200 $ST bench max-length --preset audio-1m --steps 2 --tolerance 0.05 --time-budget 170 --out "$OUT" \
      2>&1 | tee "$OUT/max-length.log"
    if [ -n "${PROFILE:-}" ]; then timeout 90 python bench/profile_model.py enwik8 2>&1 | tee "$OUT/profile-enwik8.log"; fi
    ;;
  step)
    timeout 200 $ST bench model --preset enwik8 --steps 3 --out "$OUT" 2>&1 | tee "$OUT/enwik8.log"
    timeout 300 $ST bench model --preset enwik8 --steps 3 --compile --out "$OUT" 2>&1 | tee "$OUT/enwik8-compile.log"
    ;;
  compile)
    timeout 100 python -m pytest -m gpu tests/test_generate.py -k compiled -q -p no:cacheprovider -rf 2>&1 \
      | tail -n 5 | tee "$OUT/gpu-tests-compiled.log"
    timeout 80 python bench/dev_decode_kernel.py 2>&1 | tee "$OUT/dev-decode-kernel.log"
    timeout 170 $ST bench decode --preset audio-65k --contexts 16384 65536 --batch 1 4 --compile --out "$OUT" \
      2>&1 | tee "$OUT/decode-compile.log"
    timeout 230 $ST bench model --preset enwik8 --steps 3 --compile --out "$OUT" 2>&1 | tee "$OUT/enwik8-compile.log"
    ;;
  decode2)
    timeout 150 python -m pytest -m gpu tests/test_decode.py tests/test_generate.py -q -n 8 -p no:cacheprovider \
      -rf 2>&1 | tail -n 4 | tee "$OUT/gpu-tests-decode.log"
    timeout 200 $ST bench decode --preset audio-65k --contexts 4096 16384 65536 --batch 1 4 --compile --out "$OUT" \
      2>&1 | tee "$OUT/decode.log"
    timeout 90 $ST bench decode --preset cifar10 --images 64 --compile --out "$OUT" 2>&1 | tail -n 3 \
      | tee "$OUT/sampling.log"
    timeout 100 python bench/profile_model.py enwik8 2>&1 | tee "$OUT/profile-enwik8.log"
    ;;
  *) echo "unknown: $WHAT (decode | long | step | compile | decode2)"; exit 2 ;;
esac
