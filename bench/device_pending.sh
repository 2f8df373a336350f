#!/usr/bin/env bash
# The device runs behind BENCHMARKS.md's decoding, long-sequence and model-step tables, each one call of < 10 minutes:
#   bash bench/device_pending.sh decode OUT    # decode GPU tests, decode-kernel sweep, decode step (--compile), sampling
#   bash bench/device_pending.sh long OUT      # audio-262k, the audio-1m sweep 16k..1M, the longest-n search
#   bash bench/device_pending.sh step OUT      # the enwik8 training step (eager, compiled blocks) and its profile
#   bash bench/device_pending.sh kernels OUT   # the training kernels' GPU tests
#   bash bench/device_pending.sh table OUT     # bench attention: ours, cuDNN, flash, FlexAttention (BENCHMARKS' table)
#   bash bench/device_pending.sh tiles OUT     # 32x32 tiles for the strided setups (sweep, fused sweep)
#   bash bench/device_pending.sh gather OUT    # the fixed setups on tiles that compile without spills (compile_probe)
#   bash bench/device_pending.sh order OUT     # program order: heads one after another, in groups, all interleaved
#   bash bench/device_pending.sh gluon OUT     # the Gluon kernels (bench/gluon_gather.py): correctness, timing, eager host
#   bash bench/device_pending.sh summary OUT   # the Gluon path's GPU tests, its check and kernel times, and the fixed
#                                              # setups beside cuDNN (the summary rows read in place)
#   bash bench/device_pending.sh block OUT     # the block-causal band's one-kernel backward: its GPU tests, every
#                                              # fixed-pattern kernel test, its timing against the generic pair
#   bash bench/device_pending.sh heads OUT     # per-head summary offsets in the Gluon kernels and the block kernel
#                                              # on 2 stages: check, GPU tests (run 2026-11-30 late: its tests need
#                                              # more than their 150 s, see strided-block), the enwik8 step with and
#                                              # without per-head offsets
#   bash bench/device_pending.sh strided-block OUT  # the block kernel on the transposed strided chunks: GPU tests
#                                              # (with the 2-stage and per-head ones), timing, bench/floor.py
#   bash bench/device_pending.sh stages OUT    # block kernel: 1 or 2 stages, cut 64-row tiles, on every setup; the
#                                              # GPU tests besides the Gluon and natural block ones
#   bash bench/device_pending.sh final-tests OUT  # the transposed chunks of 96 on cut tiles (the default since), and
#                                              # test_model's GPU tests
#   bash bench/device_pending.sh first OUT     # the block kernel on a first transposed segment (FIRST_CHUNKS, the
#                                              # strided-only layers): GPU tests, timing (run 2026-11-30 as "window",
#                                              # with the causal-window kernel since removed)
#   bash bench/device_pending.sh oneloop OUT   # (run 2026-12-01) every generic kernel in one loop
#                                              # (forward / backward.ONE_LOOP, wgmma kept asynchronous): GPU tests, timing
#   bash bench/device_pending.sh rule OUT      # one loop by stage count (common.one_loop) against split / forced, also
#                                              # on the Triton gathered kernels; 64x32 tiles; then the attention table
#   bash bench/device_pending.sh band OUT     # the band as a persistent Gluon forward (bench/gluon_band.py): check, time
#                                              # against the library's; then every kernel GPU test and test_model's
#   bash bench/device_pending.sh maxnreg OUT  # (run 2026-12-01 as dev_probe.py maxnreg) register caps per pass
#                                              # (more programs per SM), timing; GPU tests with caps, forced one loop
#   bash bench/device_pending.sh ncu OUT       # Nsight Compute: occupancy, throughput, stalls of one strided-12k
#                                              # fwd+bwd's kernels (bench/ncu_probe.py)
#   bash bench/device_pending.sh host OUT      # where an eager fwd+bwd's host time goes (bench/host_trace.py)
#   bash bench/device_pending.sh verify OUT    # every kernel GPU test (GATHER_RULE=1: first the Triton gathered
#                                              # kernels' one-loop timing, as in "rule")
#   bash bench/device_pending.sh verify-model OUT  # test_model's GPU tests, then the table
#   bash bench/device_pending.sh pending OUT   # the graph-replay test as rewritten after the sixth session's last run,
#                                              # every kernel GPU test, and how many of the enwik8
#                                              # step's attention calls replay, step by step
#   bash bench/device_pending.sh replay OUT    # the graph-replay tests with their durations
#   bash bench/device_pending.sh ab OUT        # bench/ab_rev.py: the working tree against an exported revision, in
#                                              # turn (ORDER, AB_SETUPS), and the Gluon kernels' check
#   bash bench/device_pending.sh final26 OUT   # every kernel GPU test, the table, test_model's GPU tests (final27:
#                                              # the same, ninth session)
#   bash bench/device_pending.sh gluon27 OUT   # the Gluon kernels' check and kernel times, then bench/ab_rev.py on
#                                              # the fixed setups
#   bash bench/device_pending.sh model-tests OUT  # test_model's GPU tests alone, with their slowest durations
#   bash bench/device_pending.sh ncu-gluon OUT # Nsight Compute on the Gluon kernels (fixed-12k): throughput, stalls
#   bash bench/device_pending.sh ncu-stalls OUT  # the Gluon kernels' stall reasons per issued instruction (fixed-12k)
#   (tenth session, `chunks`: the transposed chunks' backward as a Gluon kernel, bench/gluon_chunks.py: timing
#   against the block kernel, GPU tests; removed with that code, which gained 3-4%: BENCHMARKS.md)
#   bash bench/device_pending.sh floor-probe OUT  # (tenth session) bench/floor.py: the floors computed at this GPU's
#                                              # copy rate, and measured with byte movers beside our fwd+bwd
#   (ninth session, `staged27` / `cap27`: the Gluon dK/dV with LSE / Delta through shared memory and unrolled, the
#   Gluon forward under a register cap; removed with that code, which did not win: BENCHMARKS.md)
#   (eighth session, `edges`: the Gluon forward's and dQ's rule on a row's last tile only, gluon_gather.MASK_EDGES:
#   check, A/B, fixed GPU tests and rows; removed with that code, which lost)
#   (seventh session, `rcp`: the forward's output through per-row reciprocals, forward.RCP on / off with
#   bench/dev_probe.py rcp, then every kernel test; the switch and that mode were removed once it won)
#   bash bench/device_pending.sh final OUT     # every kernel GPU test, the table, the cifar10 step's replays per step
#                                              # (the seventh session ran `replay-pdl`, and the sixth `pdl`: the
#                                              # dependent-launch tests and bench/pdl_ab.py, removed with PDL, see
#                                              # BENCHMARKS.md, seventh session)
#   bash bench/device_pending.sh reverse OUT   # (sixth session) the Gluon dK/dV streaming query tiles from the last one
#                                              # back: check, kernel times; eager host with and without graph replay;
#                                              # the graph-replay, Gluon and launch GPU tests
#   bash bench/device_pending.sh graphs OUT    # (run 2026-12-01, fifth session) graph replay (SPARSE_TRANSFORMER_GRAPHS):
#                                              # eager host default against graphs, the table's triton rows with graphs,
#                                              # the enwik8 step alternating, the GPU clock per graph protocol, and
#                                              # every kernel GPU test with graphs on
# Run from the repository root on the device machine; JSON and logs land in OUT (pass $OUT there).
set -uo pipefail
WHAT=${1:?decode, long, step, kernels, table, tiles, gather, order, gluon, summary, block, heads, strided-block, stages, final-tests, first, oneloop, rule, band, maxnreg, ncu, host, verify, verify-model, graphs, reverse, pending, replay, ab, final or final26}; OUT=${2:?output folder}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
ST="python -m sparse_transformer.cli"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "$WHAT" in
  floor-probe)
    # (tenth session) the floors at this GPU's copy rate, then measured with byte movers beside our fwd+bwd
    timeout 120 python bench/floor.py 2>&1 | tee "$OUT/floor.log"
    timeout 300 python bench/floor.py --probe --out "$OUT" 2>&1 | tee "$OUT/floor-probe.log"
    ;;
  decode)
    timeout 150 python -m pytest -m gpu tests/test_decode.py tests/test_generate.py -q -n 12 -p no:cacheprovider \
      -rf 2>&1 | tail -n 4 | tee "$OUT/gpu-tests-decode.log"
    timeout 80 python bench/dev_decode_kernel.py 2>&1 | tee "$OUT/dev-decode-kernel.log"
    timeout 200 $ST bench decode --preset audio-65k --contexts 4096 16384 65536 --batch 1 4 --compile --out "$OUT" \
      2>&1 | tee "$OUT/decode.log"
    timeout 90 $ST bench decode --preset cifar10 --images 64 --compile --out "$OUT" 2>&1 | tail -n 3 \
      | tee "$OUT/sampling.log"
    ;;
  long)
    timeout 120 $ST bench max-length --preset audio-262k --n 262144 --dense-scale --out "$OUT" 2>&1 \
      | tee "$OUT/262k.log"
    timeout 150 $ST bench model --preset audio-1m --n 16384 65536 262144 1048576 --recompute on --steps 3 \
      --out "$OUT" 2>&1 | tee "$OUT/sweep.log"
    timeout 200 $ST bench max-length --preset audio-1m --steps 2 --tolerance 0.05 --time-budget 170 --out "$OUT" \
      2>&1 | tee "$OUT/max-length.log"
    ;;
  step)
    timeout 150 $ST bench model --preset enwik8 --steps 10 --recompute off --out "$OUT" 2>&1 | tee "$OUT/enwik8.log"
    timeout 230 $ST bench model --preset enwik8 --steps 3 --compile --out "$OUT" 2>&1 | tee "$OUT/enwik8-compile.log"
    timeout 100 python bench/profile_model.py enwik8 2>&1 | tee "$OUT/profile-enwik8.log"
    ;;
  kernels)
    timeout 560 python -m pytest -m gpu tests/test_triton_attention.py -q -n 14 -p no:cacheprovider -rf 2>&1 \
      | tail -n 6 | tee "$OUT/gpu-tests-kernels.log"
    ;;
  table)
    timeout 560 $ST bench attention --methods triton sdpa-cudnn sdpa-flash flex --out "$OUT" 2>&1 \
      | tee "$OUT/attention.log"
    ;;
  tiles)
    OUT="$OUT" timeout 330 python bench/dev_probe.py sweep strided-12k strided-3k strided-64k 2>&1 | tee "$OUT/sweep.log"
    OUT="$OUT" timeout 230 python bench/dev_probe.py fuse strided-12k strided-64k 2>&1 | tee "$OUT/fuse.log"
    ;;
  gather)
    OUT="$OUT" CONFIGS="32x128/8/3 64x128/8/2 64x128/8/3 128x32/4/3 128x32/4/4 64x64/8/3" timeout 320 \
      python bench/dev_probe.py sweep fixed-12k fixed-64k 2>&1 | tee "$OUT/sweep-gather.log"
    ;;
  gluon)
    timeout 200 python bench/gluon_gather.py check 2>&1 | tee "$OUT/gluon-check.log"
    timeout 200 python bench/gluon_gather.py time 2>&1 | tee "$OUT/gluon-time.log"
    timeout 60 python bench/eager_host.py fixed-12k 2>&1 | tee "$OUT/eager-host.log"
    ;;
  block)
    timeout 150 python -m pytest -m gpu tests/test_triton_attention.py -k "block" -q -n 14 -p no:cacheprovider -rf \
      2>&1 | grep -E "passed|failed|FAILED|Error" | head -n 30 | tee "$OUT/gpu-tests-block.log"
    timeout 200 python -m pytest -m gpu tests/test_triton_attention.py -k "(fixed or gluon) and not block" -q -n 14 \
      -p no:cacheprovider -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | head -n 30 \
      | tee "$OUT/gpu-tests-fixed.log"
    OUT="$OUT" timeout 120 python bench/block_bwd.py fixed-12k fixed-64k 2>&1 | tee "$OUT/block-bwd.log"
    ;;
  heads)
    timeout 120 python bench/gluon_gather.py check 2>&1 | tee "$OUT/gluon-check.log" | grep -i "offsets\|within"
    timeout 150 python -m pytest -m gpu tests/test_triton_attention.py -k "per_head or block_backward" -q -n 14 \
      -p no:cacheprovider -rf 2>&1 | grep -E "passed|failed|FAILED|Error" | head -n 30 | tee "$OUT/gpu-tests-heads.log"
    for on in 0 1; do
      SPARSE_TRANSFORMER_GLUON_HEADS=$on timeout 80 $ST bench model --preset enwik8 --steps 10 --recompute off \
        --out "$OUT" 2>&1 | tail -n 4 | tee "$OUT/enwik8-heads-$on.log"
    done
    ;;
  strided-block)
    timeout 250 python -m pytest -m gpu tests/test_triton_attention.py -k "block_backward_transposed or 2-stages or per_head" \
      -q -n 14 -p no:cacheprovider -rf 2>&1 | tee "$OUT/gpu-tests-strided-block.log" | tail -n 12
    OUT="$OUT" ONLY="generic;2 stages" timeout 200 python bench/block_bwd.py strided-12k strided-3k strided-64k 2>&1 \
      | tee "$OUT/block-bwd-strided.log"
    timeout 60 python bench/floor.py 2>&1 | tee "$OUT/floor.log"
    ;;
  stages)
    OUT="$OUT" ONLY="generic;64-row tiles, 2 stages;cut" timeout 200 python bench/block_bwd.py strided-12k strided-3k \
      strided-64k fixed-12k fixed-64k 2>&1 | tee "$OUT/block-bwd-stages.log"
    timeout 330 python -m pytest -m gpu tests/test_triton_attention.py -q -n 14 -p no:cacheprovider -rf \
      -k "not gluon and not per_head and not (block_backward and not 5000)" 2>&1 \
      | tee "$OUT/gpu-tests-generic.log" | tail -n 8
    ;;
  final-tests)
    timeout 120 python -m pytest -m gpu tests/test_triton_attention.py -q -n 14 -p no:cacheprovider -rf \
      -k "block_backward_transposed and (6100 or 6144)" 2>&1 | tee "$OUT/gpu-tests-c96.log" | tail -n 4
    timeout 300 python -m pytest -m gpu tests/test_model.py -q -n 8 -p no:cacheprovider -rf 2>&1 | tail -n 8 \
      | tee "$OUT/gpu-tests-model.log"
    ;;
  first)
    timeout 330 python -m pytest -m gpu tests/test_triton_attention.py -k "first_chunks" -q -n 14 \
      -p no:cacheprovider -rf 2>&1 | tee "$OUT/gpu-tests-first.log" | tail -n 8
    OUT="$OUT" ONLY="cut 64-row tiles, 2 stages;first chunks" timeout 60 python bench/block_bwd.py strided-only-12k \
      strided-only-3k 2>&1 | tee "$OUT/block-bwd-first.log"
    ;;
  oneloop)
    timeout 200 python -m pytest -m gpu tests/test_triton_attention.py -k "one_loop" -q -n 14 -p no:cacheprovider -rf \
      --tb=line 2>&1 | grep -E "^FAILED|^E |passed|failed" | tail -n 20 | tee "$OUT/gpu-tests-oneloop.log"
    OUT="$OUT" timeout 300 python bench/dev_probe.py oneloop strided-12k strided-3k strided-64k fixed-12k 2>&1 \
      | grep -v Warn | tee "$OUT/oneloop.log"
    ;;
  rule)
    OUT="$OUT" timeout 150 python bench/dev_probe.py oneloop strided-12k strided-3k strided-64k fixed-12k 2>&1 \
      | grep -v Warn | tee "$OUT/oneloop.log"
    SPARSE_TRANSFORMER_GLUON=0 OUT="$OUT" timeout 100 python bench/dev_probe.py oneloop fixed-12k fixed-64k 2>&1 \
      | grep -v Warn | tee "$OUT/oneloop-triton-gather.log"
    OUT="$OUT" CONFIGS="64x32/4/2 64x32/4/1" timeout 80 python bench/dev_probe.py sweep strided-12k strided-64k 2>&1 \
      | grep -v Warn | tee "$OUT/sweep-64x32.log"
    timeout 240 $ST bench attention --methods triton sdpa-cudnn sdpa-flash flex --out "$OUT" 2>&1 \
      | tee "$OUT/attention.log"
    ;;
  maxnreg)
    OUT="$OUT" timeout 200 python bench/dev_probe.py maxnreg strided-12k strided-64k fixed-12k 2>&1 | grep -v Warn \
      | tee "$OUT/maxnreg.log"
    timeout 200 python -m pytest -m gpu tests/test_triton_attention.py -k "maxnreg or gpu_one_loop and one-loop" -q \
      -n 14 -p no:cacheprovider -rf --tb=line 2>&1 | grep -E "^FAILED|^E |passed|failed" | tail -n 20 \
      | tee "$OUT/gpu-tests-maxnreg.log"
    ;;
  band)
    timeout 90 python bench/gluon_band.py check 2>&1 | tee "$OUT/gluon-band-check.log" | tail -n 4
    OUT="$OUT" timeout 120 python bench/gluon_band.py time 2>&1 | tee "$OUT/gluon-band-time.log"
    timeout 300 python -m pytest -m gpu tests/test_triton_attention.py -q -n 14 -p no:cacheprovider -rf --tb=line \
      2>&1 | grep -E "^FAILED|^E |passed|failed" | tail -n 20 | tee "$OUT/gpu-tests-kernels.log"
    timeout 160 python -m pytest -m gpu tests/test_model.py -q -n 8 -p no:cacheprovider -rf 2>&1 | tail -n 4 \
      | tee "$OUT/gpu-tests-model.log"
    ;;
  ncu)
    timeout 200 ncu --profile-from-start off --clock-control none --target-processes all -k regex:_attn \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats \
      python bench/ncu_probe.py strided-12k > "$OUT/ncu-strided-12k.txt" 2>&1
    grep -E "^  _attn|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots|Executed Ipc A|SM Busy" \
      "$OUT/ncu-strided-12k.txt"
    ;;
  ncu-gluon)
    # (ninth session) Nsight Compute on the Gluon kernels of one warm fixed-12k fwd+bwd: throughput, pipes, stalls
    timeout 300 ncu --profile-from-start off --clock-control none --target-processes all -k regex:_gather \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
      --section InstructionStats python bench/ncu_probe.py fixed-12k > "$OUT/ncu-gluon-fixed-12k.txt" 2>&1
    grep -E "^  _gather|Duration|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Cache Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Executed Ipc A|SM Busy|No Eligible|Warp Cycles Per Issued|Stall" \
      "$OUT/ncu-gluon-fixed-12k.txt" | head -n 80
    ;;
  ncu-stalls)
    # (ninth session) why the Gluon kernels' warps wait: each stall reason per issued instruction (fixed-12k)
    timeout 300 ncu --profile-from-start off --clock-control none --target-processes all -k regex:_gather \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python bench/ncu_probe.py fixed-12k > "$OUT/ncu-stalls-fixed-12k.txt" 2>&1
    grep -E "^  _gather|stalled" "$OUT/ncu-stalls-fixed-12k.txt" | awk '$NF+0 >= 0.05 || /_gather/' | head -n 80
    ;;
  host)
    OUT="$OUT" timeout 150 python bench/host_trace.py fixed-12k strided-12k strided-3k 2>&1 | tee "$OUT/host-trace.log" \
      | grep "==="
    ;;
  verify)
    [ -n "${GATHER_RULE:-}" ] && SPARSE_TRANSFORMER_GLUON=0 OUT="$OUT" timeout 60 python bench/dev_probe.py oneloop \
      fixed-12k fixed-64k 2>&1 | grep -v Warn | tee "$OUT/oneloop-triton-gather.log"
    timeout 520 python -m pytest -m gpu tests/test_triton_attention.py -q -n 14 -p no:cacheprovider -rf --tb=line \
      2>&1 | grep -E "^FAILED|^E |passed|failed" | tail -n 40 | tee "$OUT/gpu-tests-kernels.log"
    ;;
  verify-model)
    timeout 330 python -m pytest -m gpu tests/test_model.py -q -n 8 -p no:cacheprovider -rf 2>&1 | tail -n 8 \
      | tee "$OUT/gpu-tests-model.log"
    timeout 220 $ST bench attention --methods triton sdpa-cudnn sdpa-flash flex --out "$OUT" 2>&1 \
      | tee "$OUT/attention.log"
    ;;
  graphs)
    (cd bench && OUT="$OUT" VARIANTS="no-graphs default" ROUNDS=3 timeout 200 python eager_host.py fixed-12k \
      strided-12k strided-3k 2>&1 | grep -v "^ \|^-\|Name\|^$" | tee "$OUT/eager-host.log")
    SPARSE_TRANSFORMER_GRAPHS=0 timeout 80 $ST bench attention --methods triton --out "$OUT" 2>&1 \
      | tee "$OUT/attention-no-graphs.log"
    for r in 1 2; do for g in 0 1; do echo "GRAPHS=$g"; SPARSE_TRANSFORMER_GRAPHS=$g timeout 60 $ST bench model \
      --preset enwik8 --steps 30 --recompute both --attention ours --no-plot --out "$OUT" 2>&1 | tail -n 4; done; done \
      | tee "$OUT/enwik8-graphs.log"
    (cd bench && OUT="$OUT" timeout 100 python graph_protocol.py fixed-64k strided-64k fixed-12k 2>&1 \
      | tee "$OUT/graph-protocol.log")
    SPARSE_TRANSFORMER_GRAPHS=1 timeout 420 python -m pytest -m gpu tests/test_triton_attention.py \
      tests/test_launcher.py -q -n 16 -p no:cacheprovider -rf 2>&1 | tail -n 20 | tee "$OUT/gpu-tests-kernels-graphs.log"
    ;;
  pending)
    # (for the seventh session's first call) what the sixth left unrun on a GPU: the rewritten graph-replay test,
    # then every kernel test
    timeout 100 python -m pytest -m gpu tests/test_triton_attention.py -q -n 8 -p no:cacheprovider -rf \
      -k "graph_replay" 2>&1 | tail -n 6 | tee "$OUT/gpu-tests-replay.log"
    timeout 340 python -m pytest -m gpu tests/test_triton_attention.py tests/test_launcher.py -q -n 16 \
      -p no:cacheprovider -rf 2>&1 | tail -n 15 | tee "$OUT/gpu-tests-kernels.log"
    timeout 70 $ST bench model --preset enwik8 --steps 10 --recompute on --attention ours --no-plot --out "$OUT" \
      2>&1 | tail -n 5 | cut -c1-400 | tee "$OUT/model-replays.log"
    python -c "import json,glob; r=[x for f in sorted(glob.glob('$OUT/model-*.json'))[-1:] for x in json.load(open(f))]; \
      print([(x.get('step_ms'), x.get('graph_replays'), x.get('graph_replays_per_step')) for x in r])"
    ;;
  final)
    # (seventh session's last call) every kernel GPU test on the code without PDL, the table, and how many of the
    # cifar10 step's attention calls replay, step by step
    timeout 380 python -m pytest -m gpu tests/test_triton_attention.py tests/test_launcher.py -q -n 16 \
      -p no:cacheprovider -rf 2>&1 | tail -n 8 | tee "$OUT/gpu-tests-kernels.log"
    timeout 150 $ST bench attention --methods triton sdpa-cudnn sdpa-flash flex --out "$OUT" 2>&1 \
      | tee "$OUT/attention.log"
    timeout 50 $ST bench model --preset cifar10 --steps 4 --recompute on --attention ours --no-plot --out "$OUT" \
      2>&1 | tail -n 3 | cut -c1-300 | tee "$OUT/model-replays.log"
    python -c "import json,glob; r=[x for f in sorted(glob.glob('$OUT/model-*.json'))[-1:] for x in json.load(open(f))]; \
      print([(x.get('step_ms'), x.get('graph_replays'), x.get('graph_replays_per_step')) for x in r])"
    ;;
  ab)
    # (eighth session) the working tree against the revision exported to bench/.ab_old (python bench/ab_rev.py export
    # REV; carried), in turn in one process; then the Gluon kernels' check against a float32 reference
    OUT="$OUT" timeout 330 python bench/ab_rev.py time ${AB_SETUPS:-} 2>&1 | tee "$OUT/ab-rev.log"
    timeout 150 python bench/gluon_gather.py check 2>&1 | tail -n 12 | tee "$OUT/gluon-check.log"
    ;;
  gluon27)
    # (ninth session) the Gluon kernels' check against a float32 reference (its log in OUT), their kernel times, then
    # the library against the revision in bench/.ab_old on the fixed setups (it first timed the unrolled and
    # no-early-products variants of that session, since removed)
    timeout 200 python bench/gluon_gather.py check > "$OUT/gluon-check.log" 2>&1; echo "check rc $?"
    grep -i "within bounds\|false\|error" "$OUT/gluon-check.log" | tail -n 20
    timeout 170 python bench/gluon_gather.py time 2>&1 | tee "$OUT/gluon-time.log"
    OUT="$OUT" timeout 170 python bench/ab_rev.py time ${AB_SETUPS:-fixed-12k fixed-64k} 2>&1 | tee "$OUT/ab-rev.log" \
      | tail -n 30
    ;;
  final26|final27)
    # (eighth and ninth sessions' last calls) every kernel GPU test, the table, test_model's GPU tests
    timeout 380 python -m pytest -m gpu tests/test_triton_attention.py tests/test_launcher.py -q -n 16 \
      -p no:cacheprovider -rf 2>&1 | tail -n 8 | tee "$OUT/gpu-tests-kernels.log"
    timeout 150 $ST bench attention --methods triton sdpa-cudnn sdpa-flash flex --out "$OUT" 2>&1 \
      | tee "$OUT/attention.log"
    timeout 50 python -m pytest -m gpu tests/test_model.py -q -n 8 -p no:cacheprovider -rf 2>&1 | tail -n 4 \
      | tee "$OUT/gpu-tests-model.log"
    ;;
  model-tests)
    # (ninth session) test_model's GPU tests alone (about 60 s with the workers' start; final26 / final27 give them 50)
    timeout 150 python -m pytest -m gpu tests/test_model.py -q -n 8 -p no:cacheprovider -rf --durations=5 2>&1 \
      | tail -n 14 | tee "$OUT/gpu-tests-model.log"
    ;;
  replay)
    # (seventh session) the replay tests one per worker with their durations
    timeout 200 python -m pytest -m gpu tests/test_triton_attention.py -v -n 4 -p no:cacheprovider --durations=5 \
      -k "graph_replay" 2>&1 | grep -E "PASSED|FAILED|SKIPPED|passed|failed|s call|^E " | tee "$OUT/gpu-tests-replay.log"
    ;;
  reverse)
    timeout 100 python bench/gluon_gather.py check 2>&1 | tee "$OUT/gluon-check.log" | tail -n 3
    timeout 130 python bench/gluon_gather.py time 2>&1 | tee "$OUT/gluon-time.log" | grep "dkdv\|fwd+bwd"
    (cd bench && OUT="$OUT" VARIANTS="no-graphs default" ROUNDS=2 timeout 170 python eager_host.py fixed-12k \
      strided-12k strided-3k 2>&1 | grep -v "^ \|^-\|Name\|^$" | tee "$OUT/eager-host.log")
    timeout 150 python -m pytest -m gpu tests/test_triton_attention.py tests/test_launcher.py -q -n 16 \
      -p no:cacheprovider -rf -k "graph_replay or gluon or launch" 2>&1 | tail -n 12 | tee "$OUT/gpu-tests-graphs.log"
    ;;
  order)
    OUT="$OUT" timeout 400 python bench/dev_probe.py order 2>&1 | tee "$OUT/order.log"
    ;;
  summary)
    timeout 90 python bench/gluon_gather.py check 2>&1 | tee "$OUT/gluon-check.log" | tail -n 12
    timeout 200 python -m pytest -m gpu tests/test_triton_attention.py -k "gluon or gather" -q -n 14 \
      -p no:cacheprovider -rf 2>&1 | tail -n 8 | tee "$OUT/gpu-tests-gluon.log"
    timeout 90 python bench/gluon_gather.py time 2>&1 | tee "$OUT/gluon-time.log" | grep -v dkdv
    timeout 110 $ST bench attention --setups fixed-12k fixed-64k --methods triton sdpa-cudnn --out "$OUT" 2>&1 \
      | tee "$OUT/attention-fixed.log" | tail -n 6
    timeout 50 python bench/eager_host.py fixed-12k 2>&1 | tee "$OUT/eager-host.log" | head -n 12
    ;;
  *) echo "unknown: $WHAT (decode | long | step | kernels | table | tiles | gather | order | gluon | summary | block |"\
       "heads | strided-block | stages | final-tests | first | oneloop | rule | band | maxnreg | ncu | host | verify |"\
       "verify-model | graphs | reverse | pending | replay | ab | final | final26 | final27 | gluon27 | model-tests |"\
       "ncu-gluon | ncu-stalls | floor-probe)"
     exit 2 ;;
esac
