#!/usr/bin/env bash
# A small real-photo dataset from the photographs in PyPI's scikit-image
# wheel (nothing is downloaded from a hub): installs scikit-image and pyarrow
# into the project's Python environment (scripts/setup.sh's venv) once, then
# runs scripts/real_photos.py with the given arguments, e.g.
#   scripts/real_photos.sh --out runs/photos
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python=.torch-venv/bin/python
if ! "$python" -c 'import skimage, pyarrow' 2>/dev/null; then
  echo "[real_photos] installing scikit-image and pyarrow into $(readlink -f .torch-venv)" >&2
  "$python" -m pip install --quiet --progress-bar off scikit-image pyarrow
fi
exec "$python" scripts/real_photos.py "$@"
