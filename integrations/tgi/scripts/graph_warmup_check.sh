#!/usr/bin/env bash
# Runs graph_warmup_check.py on a GPU machine without internet, from the repository root:
#   integrations/tgi/scripts/graph_warmup_check.sh [script options]
# Needs gpu_assets/tgi_wheels (wheels of the TGI dependencies the check imports, for Python 3.11 and 3.12)
# and gpu_assets/tgi_server (TGI v3.3.7's text_generation_server with its gRPC stubs); both git-ignored.
# The wheels this Python accepts are installed offline into a private folder, put on PYTHONPATH ahead of
# the environment's packages (which are not modified).
set -euo pipefail
cd "$(dirname "$0")/../../.."
DEPS=${JDLORA_TGI_DEPS:-/tmp/jdlora_tgi_deps}
WHEELS=$(python - <<'PY'
import glob, sys
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:  # pip's copy
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename
tags = set(sys_tags())
for w in sorted(glob.glob("gpu_assets/tgi_wheels/*.whl")):
    if parse_wheel_filename(w.rsplit("/", 1)[-1])[3] & tags:
        print(w)
    else:
        print(f"not for this Python: {w}", file=sys.stderr)
PY
)
PIP_ROOT_USER_ACTION=ignore python -m pip install -q --no-index --no-deps --upgrade --disable-pip-version-check --target "$DEPS" $WHEELS
export JDLORA_TGI_SERVER=$PWD/gpu_assets/tgi_server
export PYTHONPATH=src:integrations/tgi/src:gpu_assets/tgi_server:$DEPS${PYTHONPATH:+:$PYTHONPATH}
exec python integrations/tgi/scripts/graph_warmup_check.py "$@"
