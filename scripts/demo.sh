#!/usr/bin/env bash
# The main job on embedded defaults (configs/demo.toml), on CPU in a few
# minutes: generate the synthetic shapes dataset, train a small dVAE, and
# write originals next to reconstructions as a PNG with their PSNR.
# Extra arguments go to every `dalle` call (e.g. --set run.dir=/tmp/x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --bin dalle
dalle=target/release/dalle

"$dalle" "$@" data synth
"$dalle" "$@" dvae train
"$dalle" "$@" dvae reconstruct --count 32
