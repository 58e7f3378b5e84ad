#!/usr/bin/env bash
# Builds a venv in which TGI 3.3.7's own Python server (`text-generation-server serve`) runs on the CPU
# through TGI's Intel path (IPEX: FlashCausalLM / FlashLlama with ATTENTION=flashdecoding-ipex), with jdlora
# and jdlora-tgi installed the way the Dockerfile installs them (--no-deps). tests/test_tgi_e2e.py uses it.
#
#   integrations/tgi/scripts/build_tgi_cpu_env.sh <TGI v3.3.7 server/ folder> [venv, default /work/venvs/tgi]
#
# Pins (why): torch 2.8.0 + intel-extension-for-pytorch 2.8.0 (the IPEX CPU build on PyPI; TGI's Intel image
# uses 2.7.0 from Intel's own index); kernels 0.2.1 and compressed-tensors 0.9.1 as in TGI's uv.lock (the
# versions of requirements_intel.txt, 0.5.0 and 0.9.4, fail on import with this stack); everything else from
# TGI's requirements_intel.txt (transformers 4.51.3, huggingface-hub 0.31.1, peft 0.15.2, grpcio 1.71.0, ...).
# The gRPC stubs are generated as TGI's Makefile does (gen-server-raw), inside the given server/ folder.
set -euo pipefail
SERVER=$(cd "${1:?usage: build_tgi_cpu_env.sh <TGI v3.3.7 server/ folder> [venv]}" && pwd)
VENV=${2:-/work/venvs/tgi}
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
PYTHON=${PYTHON:-python3.11}
[ -f "$SERVER/requirements_intel.txt" ] && [ -d "$SERVER/text_generation_server" ] \
  || { echo "error: $SERVER is not TGI's server/ folder (no requirements_intel.txt)" >&2; exit 2; }
grep -q '^version = "2.0.5-dev0"' "$SERVER/pyproject.toml" \
  || echo "warning: $SERVER does not look like TGI v3.3.7's server/ (the backend is pinned to 3.3.7)" >&2

step() { printf '\n[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
start=$(date +%s)

step "venv $VENV ($PYTHON)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q uv
UV=("$VENV/bin/python" -m uv pip install --python "$VENV/bin/python")

step "TGI's Intel requirements with the CPU/IPEX pins"
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
# torch 2.7.0 (and its CUDA wheels / triton) is replaced by torch 2.8.0 for IPEX 2.8.0.
grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|kernels|compressed-tensors)==' \
  "$SERVER/requirements_intel.txt" > "$reqs"
# grpcio-tools, mypy-protobuf: the stubs (TGI's gen extra); pytest (TGI's dev extra), pytest-timeout (jdlora's
# pytest options): to run tests/test_tgi_server.py with this Python.
"${UV[@]}" -r "$reqs" torch==2.8.0 intel-extension-for-pytorch==2.8.0 kernels==0.2.1 \
  compressed-tensors==0.9.1 grpcio-tools==1.71.0 mypy-protobuf==3.6.0 "pytest>=7.3,<8" pytest-timeout

step "gRPC stubs (TGI's Makefile: gen-server-raw)"
PATH="$VENV/bin:$PATH" make -C "$SERVER" gen-server-raw

step "TGI's server (text-generation-server), then jdlora and jdlora-tgi with --no-deps"
"${UV[@]}" --no-deps "$SERVER"
"${UV[@]}" --no-deps "$REPO" "$REPO/integrations/tgi"

step "check"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, intel_extension_for_pytorch as ipex, jdlora_tgi
from text_generation_server.pb import generate_pb2  # noqa: F401 (the stubs)
for name in ("torch", "intel-extension-for-pytorch", "transformers", "huggingface-hub", "peft", "kernels",
             "compressed-tensors", "text-generation-server", "jdlora", "jdlora-tgi"):
    print(f"{name} {md.version(name)}")
print("jdlora_tgi", jdlora_tgi.TGI_VERSION, "hooks:", jdlora_tgi.status())
PY
echo "built in $(( $(date +%s) - start )) s: JDLORA_TGI_PYTHON=$VENV/bin/python"
