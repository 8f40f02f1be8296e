#!/usr/bin/env bash
# The main job on embedded defaults (configs/demo.toml), on CPU in about ten
# minutes: generate the synthetic shapes dataset, train a small dVAE (and
# write originals next to reconstructions with their PSNR), train the
# caption tokenizer, pre-tokenize the dataset, train a small transformer,
# export the sampler bundle and draw images for a few prompts with
# `dalle-sample`.
# Extra arguments go to every `dalle` call (e.g. --set run.dir=/tmp/x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --bin dalle --bin dalle-sample
dalle=target/release/dalle

"$dalle" "$@" data synth
"$dalle" "$@" dvae train
"$dalle" "$@" dvae reconstruct --count 32
"$dalle" "$@" text train-tokenizer
"$dalle" "$@" data tokenize
"$dalle" "$@" gpt train   # ends by exporting the bundle to <run.dir>/bundle

run_dir=$("$dalle" "$@" config | awk '$0=="[run]"{f=1;next} /^\[/{f=0} f && $1=="dir"{gsub(/"/,"",$3); print $3}')
target/release/dalle-sample "$run_dir/bundle" --out "$run_dir/samples" -n 4 \
  -p "a large red circle on a blue background" \
  -p "a large yellow square on a black background" \
  -p "a medium green triangle on a white background" \
  -p "a large purple star on a gray background"
echo "samples (one grid per prompt): $run_dir/samples"
