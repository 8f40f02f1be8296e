#!/usr/bin/env bash
# Image-token sampling with the KV cache against full recomputation of the
# prefix for every token (`dalle bench sample`): the demo's transformer
# (configs/demo.toml: dim 128, depth 4, heads 4, text_len 16, its [gpt.sample]
# settings) on a 32×32 image grid (1024 image tokens), image vocabulary 512,
# random-init weights (timing only). Extra arguments go to `dalle` before
# the subcommand (e.g. --set gpt.sample.guidance_scale=1).
#
#   scripts/bench/sample.sh [BATCH] [THREADS] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
batch=${1:-1}
threads=${2:-$(nproc)}
shift $(( $# > 2 ? 2 : $# ))

scripts/setup.sh
cargo build --release --bin dalle >&2
dalle=target/release/dalle

line=$("$dalle" --set run.device=cpu --set run.threads="$threads" "$@" \
  bench sample --text-vocab 512 --image-vocab 512 --image-grid 32 --batch "$batch")
echo "$line"
python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"config: dim {r['dim']}, depth {r['depth']}, heads {r['heads']}, text_len {r['text_len']}, "
      f"grid {r['image_grid']} ({r['image_len']} image tokens), image vocab {r['image_vocab']}, "
      f"{r['parameters']:,} parameters, {r['batch']} image(s) ({r['rows_decoded']} rows with guidance "
      f"{r['guidance_scale']}), top_p {r['top_p']}, threads {r['threads']}")
for key, label in (("cache", "KV cache"), ("no_cache", "no cache")):
    s = r[key]
    if s:
        print(f"{label:9}: {s['seconds']:7.2f} s, {s['image_tokens_per_s']:8.1f} image tokens/s, "
              f"{s['images_per_s']:.4f} images/s")
if r["speedup"]:
    print(f"speed-up: {r['speedup']:.1f}× (sampled tokens agreeing: {100 * r['tokens_agree']:.1f} %)")
PY
