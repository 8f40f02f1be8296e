#!/usr/bin/env bash
# Training time lost to checkpoints: the demo's dVAE (configs/demo.toml) for
# STEPS steps with a checkpoint every EVERY steps, saved in the background
# (the default) and blocking, one after the other in one session. Each run
# logs how long its checkpoints paused training and that time's share of
# the stage; this prints both.
#
#   scripts/bench/checkpoint_cost.sh [STEPS] [EVERY] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-200}
every=${2:-50}
shift $(( $# > 2 ? 2 : $# ))

scripts/setup.sh >&2
cargo build --release --bin dalle >&2
dalle=target/release/dalle
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$dalle" --set run.dir="$work/shared" "$@" data synth >&2

for mode in true false; do
  log="$work/$mode.log"
  NO_COLOR=1 "$dalle" --set run.dir="$work/run-$mode" --set data.url="$work/shared/data" \
    --set dvae.train.steps="$steps" --set checkpoint.every="$every" \
    --set checkpoint.asynchronous="$mode" "$@" dvae train >"$log" 2>&1
  line=$(grep 'checkpoints paused training' "$log" | sed 's/.*checkpoints paused/paused/')
  echo "asynchronous=$mode: $line"
done
