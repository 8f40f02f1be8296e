#!/usr/bin/env bash
# Decode + resize + centre-crop throughput per core: dalle-rs (`dalle bench
# decode`) against Pillow (decode_reference.py), same images, same machine,
# alternating in one session. The images are photo-like JPEGs of 500×375
# (smooth colour fields, edges and sensor-like noise, quality 90), generated
# once with a fixed seed, since the test machines have no photo collection.
#
#   scripts/bench/decode.sh [ROUNDS] [COUNT]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
count=${2:-200}

scripts/setup.sh
cargo build --release --bin dalle >&2
py=.torch-venv/bin/python
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

"$py" - "$dir" "$count" <<'PY'
import sys
import numpy as np
from PIL import Image, ImageFilter
out, count = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for i in range(count):
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
    px = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (375, 500, 3))
    img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).filter(ImageFilter.DETAIL)
    img.save(f"{out}/{i:05d}.jpg", quality=90)
PY

results=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  target/release/dalle bench decode --images "$dir" --size 256 >>"$results"
  "$py" scripts/bench/decode_reference.py --images "$dir" --size 256 >>"$results"
done
python3 - "$results" "$count" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda impl: statistics.median(r["images_per_s_per_core"] for r in rows if r["impl"] == impl)
ours, ref = med("dalle-rs"), med("pillow")
print(f"{sys.argv[2]} JPEGs of 500x375 -> 256x256 crops, one core")
print(f"dalle-rs: {ours:.1f} images/s per core")
print(f"pillow:   {ref:.1f} images/s per core")
print(f"ratio (dalle-rs / pillow): {ours / ref:.2f}")
PY
rm -f "$results"
