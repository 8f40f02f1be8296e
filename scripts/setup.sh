#!/usr/bin/env bash
# One-time (idempotent) toolchain set-up for dalle-rs.
#
# Installs PyPI's torch==2.11.0 (the libtorch that tch 0.24 is built against)
# into a virtual environment in a cache directory outside the checkout, so
# every clone and CI run on this machine shares it, then points the checkout
# at it through the git-ignored `.libtorch` link that `.cargo/config.toml`
# hands to the build. A second run only checks and takes seconds.
#
# Cache location: $DALLE_CACHE_DIR, else $XDG_CACHE_HOME/dalle-rs, else
# ~/.cache/dalle-rs.
set -euo pipefail

TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${DALLE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dalle-rs}
venv="$cache/torch-$TORCH_VERSION"
python=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*" >&2; }

torch_dir() {
  "$venv/bin/python" - <<'PY' 2>/dev/null
import os, torch
print(os.path.dirname(torch.__file__))
PY
}

installed_version() {
  "$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true
}

mkdir -p "$cache"
# Two set-ups racing on one cache (CI jobs, parallel shells) must not both
# install into the same venv.
exec 9>"$cache/.setup.lock"
flock 9

if [ "$(installed_version)" != "$TORCH_VERSION" ]; then
  log "installing torch==$TORCH_VERSION into $venv (about 4.6 GB, first time only)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet --progress-bar off "torch==$TORCH_VERSION" numpy pillow
  [ "$(installed_version)" = "$TORCH_VERSION" ] || { log "torch install failed"; exit 1; }
fi

# OpenAI's released dVAE code, which tests load our weights into
# (scripts/check_openai_compat.py). Importing it needs only attrs and
# requests, not the heavy dependencies it declares.
if ! "$venv/bin/python" -c 'import dall_e' 2>/dev/null; then
  log "installing OpenAI's dall_e package (compatibility checks)"
  "$venv/bin/python" -m pip install --quiet --progress-bar off attrs requests
  "$venv/bin/python" -m pip install --quiet --progress-bar off --no-deps "DALL-E==0.1"
fi

# The Kubernetes schemas, offline, for the manifest tests (tests/k8s.rs),
# and RFC 6902 patches for rendering the overlays (cluster/k8s/render.py).
if ! "$venv/bin/python" -c 'import kubernetes_validate, jsonpatch' 2>/dev/null; then
  log "installing kubernetes-validate and jsonpatch (manifest checks)"
  "$venv/bin/python" -m pip install --quiet --progress-bar off kubernetes-validate jsonpatch
fi

tdir=$(torch_dir)
[ -f "$tdir/lib/libtorch_cpu.so" ] || { log "libtorch_cpu.so missing under $tdir/lib"; exit 1; }
ln -sfn "$tdir" "$repo/.libtorch"
ln -sfn "$venv" "$repo/.torch-venv"
log "libtorch $TORCH_VERSION ready: $tdir"
