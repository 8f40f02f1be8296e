#!/usr/bin/env bash
# Runs scripts/bench/dvae_recipe_sweep.py in the project's Python environment
# (installing pyarrow there once, to read the Parquet datasets).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh
python=.torch-venv/bin/python
"$python" -c 'import pyarrow' 2>/dev/null || "$python" -m pip install --quiet --progress-bar off pyarrow
exec "$python" scripts/bench/dvae_recipe_sweep.py "$@"
