#!/usr/bin/env python3
"""Pillow reference for the image preprocessing benchmark.

Does what dalle-rs does per sample, on one thread: decode the bytes, convert
to RGB, resize the shorter side to SIZE (bilinear with antialiasing, Pillow's
default for downscaling), centre-crop SIZE×SIZE, and lay the pixels out as
contiguous CHW bytes (batches are scaled to [0, 1] on the device). Files are read into memory first, so disk is not
timed. Prints one JSON line.

    python decode_reference.py --images DIR [--size 256] [--passes 3]
"""

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image


def preprocess(data: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    files = [open(os.path.join(args.images, f), "rb").read()
             for f in sorted(os.listdir(args.images))
             if f.endswith((".jpg", ".png", ".webp"))]
    start = time.perf_counter()
    for _ in range(args.passes):
        for data in files:
            preprocess(data, args.size)
    seconds = time.perf_counter() - start
    n = len(files) * args.passes
    print(json.dumps({"impl": "pillow", "images": n, "size": args.size, "seconds": seconds,
                      "images_per_s_per_core": n / seconds}))


if __name__ == "__main__":
    main()
