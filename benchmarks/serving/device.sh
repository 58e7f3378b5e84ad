#!/usr/bin/env bash
# Issue 13's GPU runs on a bare machine (one H200), each step within one 10-minute device call:
#   bash benchmarks/serving/device.sh generate   # GPU tests + eager q/k/v host cost + generate at 64 adapters, base and JD
#                                                # side by side (eager, fused or not; compiled; eager again after compiled)
#   bash benchmarks/serving/device.sh generate1024   # compiled and eager generate at 1,024 adapters
#   bash benchmarks/serving/device.sh anatomy    # generate at 64 adapters with JD's kernels and without (kernels_off):
#                                                # what the kernels cost and what the rest does, eager and compiled
#   bash benchmarks/serving/device.sh study      # the serving study with graph-captured decode (benchmarks/serving/run.py);
#                                                # MAX_BATCH=256 or 64 runs one batch size (the whole grid does not fit one call)
#   bash benchmarks/serving/device.sh study1024  # the study's 1,024-adapter cells alone, both batch limits and memories (~3 min)
#   bash benchmarks/serving/device.sh prefill    # the kernel tests (each file under a timeout), then one study prefill per
#                                                # path, profiled by kernel (benchmarks/serving/prefill.py): after a kernel change
#   bash benchmarks/serving/device.sh check      # every GPU test of the kernels and the tuner (~5 min), after a change
#   MAIN_SRC=gpu_assets/main/src bash benchmarks/serving/device.sh ab   # a branch against main (its src from
#                                                # `git archive main src`, carried): q/k/v's JD in a CUDA graph (9, 5 or 3
#                                                # launches), then the eager q/k/v host cost and eager generate at 64
#                                                # adapters, main's code and this tree's (each step under a timeout)
#   bash benchmarks/serving/device.sh replays    # eager generate at 64 adapters, launch replays off then on (this tree)
#   bash benchmarks/serving/device.sh idle       # where the GPU idles in JD's prefill and compiled generate (profiles
#                                                # with the host's activity: benchmarks.serving.graph.device_idle)
#   bash benchmarks/serving/device.sh two        # on nvidia-h200-x2: the GPU tests of the tuner with two GPUs (a model
#                                                # split across them)
#   bash benchmarks/serving/device.sh tgi        # TGI's JD path on one layer (integrations/tgi/scripts/tp_check.py, TP 1):
#                                                # checks, CUDA-graph replays, base vs JD each vs JD together per layer
# Results and logs go to $OUT (the device tool's output folder) or ./device-out.
set -euo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
case "$1" in
  generate)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    python -m pytest -q -x -p no:cacheprovider tests/test_tuner_gpu.py tests/test_siblings.py tests/test_fast_launch.py \
      tests/test_compile.py 2>&1 | tail -15 | tee "$OUT/tests.log" || echo "TESTS FAILED" | tee -a "$OUT/tests.log"
    python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
      -k "sibling or decode_batches or prefill_runs or clusterings or cuda_graph or rows_equals" 2>&1 | tail -5 \
      | tee -a "$OUT/tests.log" || echo "KERNEL TESTS FAILED" | tee -a "$OUT/tests.log"
    python -m benchmarks.kernels --qkv --json "$OUT/qkv.json" 2>&1 | tee "$OUT/qkv.log"
    python -m benchmarks.serving.compiled --out "$OUT/generate" --sizes 64 --warmup 2 --reps 5 \
      --paths eager,eager_unfused,compiled_one_cache,prefill,eager 2>&1 | tee "$OUT/generate.log" ;;
  generate1024)
    python -m benchmarks.serving.compiled --out "$OUT/generate1024" --sizes 1024 --warmup 2 --reps 3 \
      --paths compiled_one_cache,prefill,eager 2>&1 | tee "$OUT/generate1024.log" ;;
  anatomy)
    python -m benchmarks.serving.compiled --out "$OUT/anatomy" --sizes 64 --warmup 2 --reps 5 --null-kernels \
      --paths eager,compiled_one_cache,prefill 2>&1 | tee "$OUT/anatomy.log" ;;
  study)
    mkdir -p "$OUT/serving_graph"
    python -m benchmarks.serving.run --out "$OUT/serving_graph" --max-batch "${MAX_BATCH:-256,64}" --sizes 1024,4,64,256,16 \
      --eager-sizes 1024 --grid-sizes "" --requests 512 --run-limit 10 --time-budget "${TIME_BUDGET:-230}" \
      --step-kernels 2>&1 | tee "$OUT/serving_graph/log.txt" ;;
  study1024)
    mkdir -p "$OUT/serving_graph"
    python -m benchmarks.serving.run --out "$OUT/serving_graph" --max-batch 256,64 --sizes 1024 --decode graph \
      --grid-sizes "" --requests 512 --run-limit 10 --time-budget "${TIME_BUDGET:-300}" --step-kernels 2>&1 \
      | tee "$OUT/serving_graph/log.txt" ;;
  prefill)
    # a kernel that hangs must not hold the machine: every test file and the profile under its own timeout
    timeout 150 python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
      -k "many_clusters or sibling or decode_batches or prefill_runs or clusterings or cuda_graph or rows_equals" 2>&1 \
      | tail -4 | tee "$OUT/tests.log" \
      || { echo "KERNEL TESTS FAILED OR TIMED OUT" | tee -a "$OUT/tests.log"; exit 1; }
    timeout 120 python -m pytest -q -x -p no:cacheprovider tests/test_siblings.py tests/test_fast_launch.py 2>&1 | tail -4 \
      | tee -a "$OUT/tests.log" || { echo "SIBLING TESTS FAILED OR TIMED OUT" | tee -a "$OUT/tests.log"; exit 1; }
    mkdir -p "$OUT/prefill"
    timeout 240 python -m benchmarks.serving.prefill --out "$OUT/prefill" --reps 3 2>&1 | tee "$OUT/prefill/log.txt" ;;
  check)
    # every GPU test of the kernels and the tuner, each file under its own timeout (a hung kernel must not hold the machine)
    timeout 150 python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
      -k "many_clusters or sibling or decode_batches or prefill_runs or clusterings or cuda_graph or rows_equals" 2>&1 \
      | tail -4 | tee "$OUT/tests.log" || echo "KERNEL TESTS FAILED OR TIMED OUT" | tee -a "$OUT/tests.log"
    timeout 120 python -m pytest -q -x -p no:cacheprovider tests/test_siblings.py tests/test_fast_launch.py 2>&1 \
      | tail -4 | tee -a "$OUT/tests.log" || echo "SIBLING TESTS FAILED OR TIMED OUT" | tee -a "$OUT/tests.log"
    timeout 280 python -m pytest -q -x -p no:cacheprovider tests/test_tuner_gpu.py tests/test_compile.py 2>&1 \
      | tail -4 | tee -a "$OUT/tests.log" || echo "TUNER TESTS FAILED OR TIMED OUT" | tee -a "$OUT/tests.log"
    # every graph break of the compiled generate on this torch (the test above stops at the first)
    timeout 120 python -m benchmarks.serving.breaks --dtype bfloat16 2>&1 | grep -v -i warn | tail -8 \
      | tee -a "$OUT/tests.log" || echo "GRAPH BREAKS OR WRONG ROWS" | tee -a "$OUT/tests.log" ;;
  idle)
    # where compiled generate's JD time goes beyond the kernels: a prefill of generate's batch (64 x 128, 64 adapters)
    # profiled with the host's activity (device idle time, host-bound gaps), then generate's prefill and compiled
    # paths profiled (torch.profiler tables, cProfile, device idle)
    timeout 200 python -m benchmarks.serving.prefill --out "$OUT/prefill64" --adapters 64 --shapes 64x128 \
      --paths base,jd --reps 3 2>&1 | grep -v -i warn | tee "$OUT/prefill64.log" || true
    timeout 300 python -m benchmarks.serving.compiled --out "$OUT/generate-profile" --sizes 64 --warmup 1 --reps 3 \
      --paths prefill,compiled_one_cache --profile > "$OUT/generate-profile.log" 2>&1 || true
    grep -E "device idle|compiled_one_cache:|prefill:" "$OUT/generate-profile.log" ;;
  ab)
    [ -d "${MAIN_SRC:-}" ] || { echo "set MAIN_SRC to main's src folder (git archive main src)" >&2; exit 2; }
    timeout 120 python -m benchmarks.kernels --siblings --json "$OUT/siblings.json" 2>&1 | tee "$OUT/siblings.log" || true
    for side in main branch; do
      src=src; [ "$side" = main ] && src=$MAIN_SRC
      PYTHONPATH=$src:. timeout 90 python -m benchmarks.kernels --qkv --json "$OUT/qkv-$side.json" 2>&1 \
        | tee "$OUT/qkv-$side.log" || true
    done
    for side in branch main; do
      src=src; [ "$side" = main ] && src=$MAIN_SRC
      PYTHONPATH=$src:. timeout 170 python -m benchmarks.serving.compiled --out "$OUT/generate-$side" --sizes 64 \
        --warmup 1 --reps 5 --paths eager 2>&1 | tee "$OUT/generate-$side.log" || true
    done ;;
  replays)
    # eager generate at 64 adapters with the launch replays of jdlora.kernels.replay off, then on (this tree)
    for replays in 0 1; do
      JDLORA_REPLAY_LAUNCHES=$replays timeout 200 python -m benchmarks.serving.compiled --out "$OUT/generate-replays$replays" \
        --sizes 64 --warmup 1 --reps 5 --paths eager 2>&1 | tee "$OUT/generate-replays$replays.log" || true
    done ;;
  two)
    # run with the device tool's kind nvidia-h200-x2: a model split across two GPUs (kernels and replays on each
    # layer's own GPU)
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
    timeout 300 python -m pytest -q -p no:cacheprovider tests/test_tuner_gpu.py tests/test_siblings.py \
      tests/test_fast_launch.py 2>&1 | tail -6 | tee "$OUT/tests.log" ;;
  tgi)
    PYTHONPATH=src:integrations/tgi/src:integrations/tgi/scripts timeout 400 python integrations/tgi/scripts/tp_check.py \
      --json "$OUT/tp_check.json" 2>&1 | tee "$OUT/tp_check.log" ;;
  *) echo "usage: $0 generate|generate1024|anatomy|study|study1024|prefill|check|ab|replays|idle|two|tgi" >&2; exit 2 ;;
esac
