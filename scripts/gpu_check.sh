#!/usr/bin/env bash
# The GPU check: the release binaries on a CUDA machine, against the
# libtorch of that machine's PyTorch 2.11 (the same version we link). Runs
# the whole main job on the GPU at small scale — synthetic data, a few
# hundred dVAE steps, tokenizer, pre-tokenization, a few hundred GPT steps,
# export, `dalle-sample` — then the throughput benchmarks on the GPU.
# Fails when a stage does not run on CUDA.
#
#   scripts/gpu_check.sh [BIN_DIR] [OUT_DIR]
#
# BIN_DIR holds `dalle` and `dalle-sample` (default target/release). The
# log, the metrics and one sample grid per prompt (8 files at most) go to
# OUT_DIR (default $OUT, else /tmp/gpu-check); the run itself to a scratch
# directory.
set -euo pipefail
bin=$(realpath "${1:-target/release}")
results=${2:-${OUT:-/tmp/gpu-check}}
out=$(mktemp -d)
mkdir -p "$results"
exec > >(tee "$results/gpu-check.log") 2>&1

torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())'
"$bin/dalle" --version

# DALLE_CHECK_DEVICE=cpu and DALLE_CHECK_STEPS=20 rehearse the script on a
# machine without a GPU.
device=${DALLE_CHECK_DEVICE:-cuda}
steps=${DALLE_CHECK_STEPS:-300}
run="$out/run"
dalle() { "$bin/dalle" --set run.dir="$run" --set run.device="$device" "$@"; }
# Every training stage must say it runs on the GPU.
on_cuda() {
  [[ $device == cpu ]] || grep -q 'Cuda(' "$1" || { echo "FAILED: $1 did not run on CUDA" >&2; exit 1; }
}

step() { echo; echo "== $*"; }
t0=$(date +%s)
step "synthetic data"
dalle --set synth.count=4096 data synth
step "dVAE: $steps steps at batch 64"
dalle --set dvae.train.steps="$steps" --set dvae.train.batch_size=64 --set dvae.train.log_every=100 \
  --set dvae.train.lr.steps="$steps" --set dvae.train.tau.steps="$steps" dvae train 2>&1 | tee "$out/dvae.log"
on_cuda "$out/dvae.log"
step "caption tokenizer, pre-tokenization"
dalle text train-tokenizer
dalle data tokenize
step "GPT: $steps steps at batch 64"
dalle --set gpt.train.steps="$steps" --set gpt.train.batch_size=64 --set gpt.train.log_every=100 \
  --set gpt.train.lr.steps="$steps" --set gpt.train.lr.warmup=20 gpt train 2>&1 | tee "$out/gpt.log"
on_cuda "$out/gpt.log"
step "dalle-sample"
"$bin/dalle-sample" "$run/bundle" --device "$device" -n 8 --batch-size 32 --out "$out/samples" \
  -p "a large red circle on a blue background" -p "a large yellow square on a black background" \
  -p "a medium green star on a white background" -p "a large purple ring on a gray background"
echo "pipeline: $(( $(date +%s) - t0 )) s"

step "benchmarks"
dalle bench dvae --steps 50
dalle bench gpt
dalle bench sample
cp "$out/samples/"*grid.png "$run/"*-metrics.jsonl "$results/"
echo "GPU check passed"
