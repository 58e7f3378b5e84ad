#!/usr/bin/env bash
# Checks integrations/tgi/Dockerfile without Docker: runs its COPY and RUN lines, as written, against a venv
# made like the TGI 3.3.7 image's /usr/src/.venv, then checks that only jdlora and jdlora-tgi were added.
#
#   integrations/tgi/scripts/check_dockerfile.sh <TGI v3.3.7 server/ folder> [work dir, default /work/venvs/tgi-image]
#
# The image's venv: Python 3.11 with the versions of TGI's server/uv.lock for the extras TGI's Dockerfile
# syncs (gen bnb accelerate compressed-tensors quantize peft outlines torch): transformers 4.51.0, peft 0.14.0,
# huggingface-hub 0.30.1, torch 2.7.0 (the PyPI build, with its own CUDA wheels and triton, instead of the
# image's +cu128 one), ... TGI's server
# itself and its compiled kernels are not needed by these lines. `uv` plays the image's /bin/uv; the Dockerfile's
# ARG SRC is set to a folder under the work dir, as `docker build --build-arg SRC=...` would.
set -euo pipefail
SERVER=$(cd "${1:?usage: check_dockerfile.sh <TGI v3.3.7 server/ folder> [work dir]}" && pwd)
WORK=${2:-/work/venvs/tgi-image}
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
DOCKERFILE=$REPO/integrations/tgi/Dockerfile
VENV=$WORK/usr/src/.venv
SRC=$WORK/tmp/jdlora
EXTRAS=(gen bnb accelerate compressed-tensors quantize peft outlines torch)
step() { printf '\n[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
start=$(date +%s)

step "uv (the image's /bin/uv) and the image's venv $VENV"
mkdir -p "$WORK/bin"
[ -x "$WORK/uv-venv/bin/uv" ] || { python3.11 -m venv "$WORK/uv-venv" && "$WORK/uv-venv/bin/pip" install -q uv; }
ln -sf "$WORK/uv-venv/bin/uv" "$WORK/bin/uv"
export PATH="$WORK/bin:$PATH"
[ -x "$VENV/bin/python" ] || uv venv -q --python python3.11 "$VENV"
locked=$WORK/uv-lock-requirements.txt
(cd "$SERVER" && uv export -q --frozen --no-hashes --no-emit-project "${EXTRAS[@]/#/--extra=}") \
  | sed -e 's/+cu128//' | grep -v -E '^\s*(#|-)|^(nvidia-|triton==)' > "$locked"
VIRTUAL_ENV=$VENV uv pip install -q -r "$locked"
VIRTUAL_ENV=$VENV uv pip freeze | sort > "$WORK/freeze-before.txt"

step "the Dockerfile's COPY and RUN lines (SRC=$SRC)"
rm -rf "$SRC"
python3 - "$DOCKERFILE" > "$WORK/dockerfile-plan.sh" <<'PY'
import re, shlex, sys
text = re.sub(r"\\\n", " ", open(sys.argv[1]).read())  # continuation lines
for line in text.splitlines():
    word, _, rest = line.strip().partition(" ")
    if word == "COPY":  # sources are relative to the build context (the repository root)
        *sources, dest = shlex.split(rest)
        paths = " ".join('"$REPO/%s"' % s for s in sources)
        if len(sources) > 1 or dest.endswith("/"):  # into the folder dest
            print(f'mkdir -p "{dest}" && cp -a {paths} "{dest}"')
        else:  # a folder's contents become dest, a file is copied to dest
            print(f'mkdir -p "$(dirname "{dest}")" && cp -a {paths} "{dest}"')
    elif word == "RUN":
        print(rest)
    elif word not in ("", "FROM", "ARG", "ENV") and not word.startswith("#"):
        sys.exit(f"check_dockerfile.sh: unhandled instruction {word}")
PY
cat "$WORK/dockerfile-plan.sh"
(cd "$REPO" && REPO=$REPO SRC=$SRC VIRTUAL_ENV=$VENV/ bash -euo pipefail "$WORK/dockerfile-plan.sh")

step "what the install changed in the image's venv"
VIRTUAL_ENV=$VENV uv pip freeze | sort > "$WORK/freeze-after.txt"
added=$(comm -13 "$WORK/freeze-before.txt" "$WORK/freeze-after.txt")
removed=$(comm -23 "$WORK/freeze-before.txt" "$WORK/freeze-after.txt")
echo "added: ${added//$'\n'/, }"; echo "removed or changed: ${removed:-nothing}"
[ -z "$removed" ] && [ "$(echo "$added" | sed 's/[= @].*//' | sort | tr '\n' ' ')" = "jdlora jdlora-tgi " ] \
  || { echo "FAIL: the install must add jdlora and jdlora-tgi only" >&2; exit 1; }
grep -E '^(torch|transformers|peft|huggingface-hub)==' "$WORK/freeze-after.txt"
echo "PASS in $(( $(date +%s) - start )) s"
