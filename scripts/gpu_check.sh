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
# cudarc looks for libnccl.so, PyPI ships libnccl.so.2 (torch's own NCCL):
# put a libnccl.so link to it first on the loader path.
nccl_so=$(python3 -c 'import glob, os, torch; d = os.path.dirname(os.path.dirname(torch.__file__)); print((glob.glob(d + "/nvidia/nccl/lib/libnccl.so*") + [""])[0])')
if [[ -n $nccl_so ]]; then
  mkdir -p /tmp/dalle-nccl && ln -sf "$nccl_so" /tmp/dalle-nccl/libnccl.so
  export LD_LIBRARY_PATH="/tmp/dalle-nccl:$LD_LIBRARY_PATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || [[ ${DALLE_CHECK_DEVICE:-cuda} == cpu ]]
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())'
"$bin/dalle" --version

# DALLE_CHECK_DEVICE=cpu DALLE_CHECK_STEPS=20 DALLE_CHECK_BENCH=0 rehearse the
# script on a machine without a GPU.
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

if [[ $device != cpu ]]; then
  step "distributed: dalle launch --nproc 1 on the GPU (NCCL through the coordinator)"
  dalle --set run.dir="$out/launch" --set synth.count=2048 --set dvae.train.steps=50 \
    --set gpt.train.steps=50 --set dvae.train.log_every=25 --set gpt.train.log_every=25 \
    launch --nproc 1 2>&1 | tee "$out/launch.log"
  grep -q 'backend nccl' "$out/launch.log" || { echo "FAILED: the launch did not use NCCL" >&2; exit 1; }
  on_cuda "$out/launch.log"
fi

if [[ ${DALLE_CHECK_BENCH:-1} == 0 ]]; then
  cp "$out/samples/"*grid.png "$run/"*-metrics.jsonl "$results/"
  echo "GPU check passed (benchmarks skipped)"
  exit 0
fi
step "benchmarks"
ref="$(dirname "$0")/bench"
# The two models of the GPU-speed targets first, bf16 on both sides (the
# references: torch.autocast, fused AdamW, channels-last for the dVAE).
# A transformer of about 350 M parameters, dense causal attention:
big=(--set gpt.model.dim=1024 --set gpt.model.depth=24 --set gpt.model.heads=16
  --set gpt.model.attention=dense --set text.text_len=256 --set run.precision=bf16)
dalle "${big[@]}" bench gpt --batch 8 --text-vocab 16384 --image-vocab 8192 --image-grid 32 --steps 10
python3 "$ref/gpt_reference.py" --device "$device" --dim 1024 --depth 24 --heads 16 \
  --text-len 256 --text-vocab 16384 --image-vocab 8192 --image-grid 32 --batch-size 8 \
  --grad-clip 4 --warmup 3 --steps 10 --precision bf16
# The dVAE at the paper's width: 256 px, n_hid 256, 2 blocks per group.
wide=(--set dvae.model.image_size=256 --set dvae.model.n_hid=256 --set dvae.model.n_blk_per_group=2
  --set dvae.model.n_init=128 --set dvae.model.vocab_size=8192 --set dvae.train.batch_size=8
  --set dvae.train.relaxation=soft --set dvae.train.recon=logit_laplace --set run.precision=bf16)
dalle "${wide[@]}" bench dvae --steps 20
python3 "$ref/dvae_reference.py" --device "$device" --image-size 256 --n-hid 256 \
  --n-blk-per-group 2 --n-init 128 --vocab-size 8192 --batch-size 8 --steps 20 --precision bf16
dalle --set dvae.train.batch_size=64 bench dvae --steps 50
# A mid-sized transformer (1088 positions, paper vocabularies), 50.5 M
# parameters. Sampling first, at batch 1 and 8: the cache runs the
# decoding step captured in a CUDA graph; the line also has the cache
# without the graph, no cache, and the graph against its own step run op
# by op, which must agree token for token.
shape=(--set gpt.model.dim=512 --set gpt.model.depth=8 --set gpt.model.heads=8
  --set gpt.model.attention=dense --set text.text_len=64)
for precision in fp32 bf16; do
  for batch in 1 8; do
    dalle "${shape[@]}" --set run.precision="$precision" --set gpt.sample.guidance_scale=1 \
      bench sample --batch "$batch" --text-vocab 16384 --image-vocab 8192 --image-grid 32 \
      | tee "$out/sample-bench.json"
    python3 - "$out/sample-bench.json" <<'PY'
import json, sys
line = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
same = line.get("graph_matches_its_step")
if same is not None and same != 1.0:
    sys.exit(f"FAILED: the decoding graph drew otherwise than its step run op by op ({same:.4f} agree)")
PY
  done
done
# Its training, ours then PyTorch eager on the same GPU.
# In each precision (run.precision; the reference with the same switch:
# bf16 is torch.autocast with fused AdamW, as PyTorch users train).
for precision in fp32 tf32 bf16; do
  dalle "${shape[@]}" --set run.precision="$precision" \
    bench gpt --batch 16 --text-vocab 16384 --image-vocab 8192 --image-grid 32 --steps 20
  python3 "$ref/gpt_reference.py" --device "$device" --dim 512 --depth 8 --heads 8 \
    --text-len 64 --text-vocab 16384 --image-vocab 8192 --image-grid 32 --batch-size 16 \
    --grad-clip 4 --warmup 3 --steps 20 --precision "$precision"
done
dalle --set run.precision=bf16 --set dvae.train.batch_size=64 bench dvae --steps 50
dalle bench sample --image-grid 32
dalle --set run.precision=bf16 bench sample --image-grid 32
cp "$out/samples/"*grid.png "$run/"*-metrics.jsonl "$results/"
echo "GPU check passed"
