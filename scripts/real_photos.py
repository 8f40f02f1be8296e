#!/usr/bin/env python3
"""A small real-photo dataset: random square crops of the photographs that
PyPI's scikit-image wheel ships (skimage/data), resized to SIZE pixels and
written as Parquet in img2dataset's layout (key, png, caption), so `dalle`
reads it like any other dataset. Nothing is downloaded: only the images in
the wheel are used.

Two sets are written, from disjoint photographs, so a model trained on the
first is measured on pictures it never saw:
  OUT/train/part-00000.parquet     crops of most photographs
  OUT/held-out/part-00000.parquet  crops of every fifth photograph

Run it with scripts/real_photos.sh, which installs scikit-image and pyarrow
into the project's Python environment first.
"""

import argparse
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage
from PIL import Image

# Photographs and micrographs of the wheel; its synthetic test patterns
# (chessboards, colour wheel, logo, phantom, silhouettes) are left out.
PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
    "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
    "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
]


def crops(image, count, size, rng):
    """`count` random square crops of at least `size` pixels (up to the
    shorter side), resized to `size`."""
    w, h = image.size
    side_max = min(w, h)
    for _ in range(count):
        side = int(rng.integers(size, side_max + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = image.crop((x, y, x + side, y + side))
        yield crop.resize((size, size), Image.BICUBIC), (x, y, side)


def write(path, rows, rows_per_group):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({
        "key": [r[0] for r in rows],
        "png": pa.array([r[1] for r in rows], type=pa.binary()),
        "caption": [r[2] for r in rows],
    })
    tmp = path + ".partial"
    pq.write_table(table, tmp, row_group_size=rows_per_group)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--crops-per-photo", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-group", type=int, default=256)
    args = p.parse_args()

    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    rng = np.random.default_rng(args.seed)
    sets = {"train": [], "held-out": []}
    for i, name in enumerate(PHOTOS):
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: this scikit-image wheel does not ship {name}")
        image = Image.open(path).convert("RGB")
        split = "held-out" if i % 5 == 4 else "train"
        stem = os.path.splitext(name)[0]
        for j, (crop, (x, y, side)) in enumerate(crops(image, args.crops_per_photo, args.size, rng)):
            png = io.BytesIO()
            crop.save(png, format="PNG")
            caption = f"a photo: {stem.replace('_', ' ')}"
            sets[split].append((f"{stem}-{j:05d}-{x}-{y}-{side}", png.getvalue(), caption))
    for split, rows in sets.items():
        # Shuffle so row groups mix photographs.
        order = rng.permutation(len(rows))
        write(os.path.join(args.out, split, "part-00000.parquet"),
              [rows[k] for k in order], args.rows_per_group)
        print(f"{split}: {len(rows)} crops of {args.size}x{args.size} -> {args.out}/{split}")


if __name__ == "__main__":
    main()
