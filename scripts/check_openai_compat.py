#!/usr/bin/env python3
"""Check that our dVAE weights are OpenAI's dVAE, name for name and op for op.

What this proves, for one weights file written by `dalle dvae train`:

1. Layout: every tensor loads into OpenAI's own released dVAE code (the
   `dall_e` package from PyPI, `Encoder` and `Decoder`) with
   `load_state_dict(strict=True)` once the `encoder.`/`decoder.` prefix is
   dropped: the same names, the same shapes, nothing missing, nothing extra.
2. Encoder: for N test images, the tokens `dalle dvae encode` (Rust, libtorch)
   writes equal the argmax of OpenAI's encoder logits on map_pixels(x).
   A mismatch is forgiven only where OpenAI's top logit and the logit of the
   token we chose differ by less than TIE_TOLERANCE (a float tie).
3. Decoder: OpenAI's decoder on one-hot(those tokens), read out as
   unmap_pixels(sigmoid(first 3 channels)), matches the PNG grid that
   `dalle dvae decode` writes to within one 8-bit level per pixel.

Both sides run on the CPU in float32 (OpenAI's Conv2d switches to float16
only on CUDA), so they compute with the same numbers.

Usage, from the repository root after scripts/setup.sh and a release build:

    .torch-venv/bin/python scripts/check_openai_compat.py [--weights W] [--images N]

Without --weights it trains a tiny model itself (demo config, two steps) in a
temporary directory. If `dall_e` does not import, it installs the `DALL-E`
package with --no-deps (its declared deps include torchvision, mypy and
pytest, which importing it does not need) plus `attrs` and `requests` into
this Python's environment. Exit status 0 only if all three checks pass.
"""

import argparse
import importlib
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.toml"

# Two logits closer than this are a tie: either argmax is a correct answer.
TIE_TOLERANCE = 1e-4
# Decoded pixels are rounded to 8 bits on our side; float noise can push a
# value across a rounding boundary, so one level of difference is allowed.
PIXEL_TOLERANCE = 1
# `dalle dvae decode` lays images out 8 to a row with a 2-pixel white gap.
GRID_COLS, GRID_GAP = 8, 2
# The self-trained model: a couple of optimiser steps at a small learning
# rate, so the file is written by our trainer after real updates while the
# weights stay near their random initialisation, where the encoder uses many
# codes. At the demo's lr of 1e-3 the first steps on 64 synthetic images
# collapse it to one or two codes, and equal tokens would then prove little.
TRAIN_STEPS = 2
TRAIN_LR = 1e-5


def log(msg: str) -> None:
    print(f"openai-compat: {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    print(f"openai-compat: FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# --- OpenAI's package ------------------------------------------------------


def import_dall_e():
    """Imports `dall_e`, installing it into this environment if missing."""
    try:
        return importlib.import_module("dall_e")
    except ImportError as e:
        log(f"installing OpenAI's DALL-E package from PyPI ({e})")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # `import dall_e` needs attrs (the model classes) and requests (its
    # __init__ imports it for load_model's URL download). Installed first, so
    # pip does not then warn about DALL-E's declared but unneeded deps.
    subprocess.run(pip + ["attrs", "requests"], check=True)
    subprocess.run(pip + ["--no-deps", "DALL-E==0.1"], check=True)
    importlib.invalidate_caches()
    return importlib.import_module("dall_e")


def build_openai_models(dall_e, cfg: dict):
    """OpenAI's Encoder and Decoder for our config, on the CPU."""
    # OpenAI's attrs validators (n_hid >= 64, vocab_size >= 512, ...) are
    # lambdas returning a bool, which attrs ignores, so they never reject a
    # config: the demo's n_hid = 32 builds as it is.
    common = dict(
        n_hid=cfg["n_hid"],
        n_blk_per_group=cfg["n_blk_per_group"],
        vocab_size=cfg["vocab_size"],
        device=torch.device("cpu"),
        requires_grad=False,
    )
    encoder = dall_e.Encoder(input_channels=cfg["channels"], **common)
    decoder = dall_e.Decoder(output_channels=cfg["channels"], n_init=cfg["n_init"], **common)
    # A config's post_gain replaces OpenAI's 1 / n_layers² in every block.
    if cfg.get("post_gain") is not None:
        for module in [*encoder.modules(), *decoder.modules()]:
            if hasattr(module, "post_gain"):
                module.post_gain = cfg["post_gain"]
    return encoder.eval(), decoder.eval()


# --- our weights file ------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (our writer stores F32 only).

    The format: an 8-byte little-endian header length, a JSON header giving
    each tensor's dtype, shape and byte range, then the raw data.
    """
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    metadata = header.pop("__metadata__", {})
    data = memoryview(raw)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            fail(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype="<f4").reshape(info["shape"])
        tensors[name] = torch.from_numpy(array.copy())
    return tensors, metadata


def split_by_prefix(tensors: dict[str, torch.Tensor]):
    """Our single file → OpenAI's two state dicts, prefixes dropped."""
    parts = {"encoder.": {}, "decoder.": {}}
    stray = []
    for name, t in tensors.items():
        prefix = next((p for p in parts if name.startswith(p)), None)
        if prefix is None:
            stray.append(name)
        else:
            parts[prefix][name[len(prefix) :]] = t
    if stray:
        fail(f"tensors outside encoder./decoder.: {', '.join(sorted(stray))}")
    return parts["encoder."], parts["decoder."]


def load_strictly(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> int:
    """Loads with strict=True, first naming every offending tensor clearly."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    problems = [f"missing from our file: {what}.{k} {want[k]}" for k in missing]
    problems += [f"not in OpenAI's model: {what}.{k} {have[k]}" for k in extra]
    problems += [
        f"shape of {what}.{k}: ours {have[k]}, OpenAI's {want[k]}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    if problems:
        fail(f"{what} does not load into OpenAI's code:\n  " + "\n  ".join(problems))
    # The proof itself: PyTorch's own strict load, which raises on any mismatch.
    model.load_state_dict(state, strict=True)
    return len(state)


# --- our CLI ---------------------------------------------------------------


def run_dalle(dalle: Path, args: list[str], overrides: list[str] = ()) -> None:
    """Runs our CLI on the CPU, in float32 like the Python side."""
    sets = [a for kv in ["run.device=cpu", *overrides] for a in ("--set", kv)]
    res = subprocess.run(
        [str(dalle), "--config", str(DEMO_CONFIG), *sets, *args], capture_output=True, text=True
    )
    if res.returncode != 0:
        fail(f"dalle {' '.join(args[:2])} exited {res.returncode}:\n{res.stdout}{res.stderr}")


def train_tiny_model(dalle: Path, work: Path) -> Path:
    run_dir = work / "run"
    overrides = [
        f"run.dir={run_dir}",
        f"data.url={run_dir / 'data'}",
        "synth.count=64",
        "synth.rows_per_file=64",
        "synth.rows_per_group=16",
        f"dvae.train.steps={TRAIN_STEPS}",
        f"dvae.train.lr.start={TRAIN_LR}",
        f"dvae.train.lr.end={TRAIN_LR}",
        # OpenAI's residual gain (1 / n_layers², 4 blocks), not the demo's 1:
        # the check is about the released architecture.
        "dvae.model.post_gain=0.0625",
        "data.validation.fraction=0",
    ]
    log(f"training a tiny dVAE ({TRAIN_STEPS} steps, demo config) in {run_dir}")
    run_dalle(dalle, ["data", "synth"], overrides)
    run_dalle(dalle, ["dvae", "train"], overrides)
    return run_dir / "dvae.safetensors"


def our_tokens(dalle: Path, weights: Path, images: list[Path], out: Path) -> torch.Tensor:
    """`dalle dvae encode` → (N, h, w) tokens, in the order of `images`."""
    paths = [str(p) for p in images]
    run_dalle(dalle, ["dvae", "encode", "--weights", str(weights), "--out", str(out), *paths])
    grids = {}
    for line in out.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            grids[rec["key"]] = torch.tensor(rec["tokens"]).view(*rec["grid"])
    missing = [p for p in paths if p not in grids]
    if missing:
        fail(f"dalle dvae encode wrote no tokens for {missing}")
    return torch.stack([grids[p] for p in paths])


def our_decoded(dalle: Path, weights: Path, tokens: Path, count: int, size: int) -> torch.Tensor:
    """`dalle dvae decode`'s PNG grid → (N, 3, S, S) uint8 images."""
    png = tokens.with_name("decoded.png")
    args = ["dvae", "decode", "--weights", str(weights), "--tokens", str(tokens), "--out", str(png)]
    run_dalle(dalle, args)
    grid = torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).copy())
    cells = []
    for i in range(count):
        r, c = divmod(i, GRID_COLS)
        y, x = GRID_GAP + r * (size + GRID_GAP), GRID_GAP + c * (size + GRID_GAP)
        cells.append(grid[y : y + size, x : x + size].permute(2, 0, 1))
    return torch.stack(cells)


# --- test images -----------------------------------------------------------


def write_test_images(out_dir: Path, count: int, size: int) -> list[Path]:
    """PNGs of exactly size×size, so neither side resizes or crops. Varied on
    purpose, so the encoder picks many different codes: coloured shapes on a
    gradient, blocky noise (a new colour every few pixels), pixel noise."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            ramp = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
            a, b = rng.random((2, 1, 1, 3), dtype=np.float32)
            row = (255 * (a + (b - a) * ramp)).astype(np.uint8)
            img = Image.fromarray(np.repeat(row, size, axis=0))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(2, 6))):
                (x0, x1), (y0, y1) = np.sort(rng.integers(0, size, (2, 2)), axis=1).tolist()
                colour = tuple(rng.integers(0, 256, 3).tolist())
                shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
                shape((x0, y0, x1, y1), fill=colour)
        else:
            cell = int(rng.choice([4, 8, 16])) if kind == 1 else 1
            noise = rng.integers(0, 256, (size // cell, size // cell, 3), dtype=np.uint8)
            img = Image.fromarray(noise).resize((size, size), Image.NEAREST)
        path = out_dir / f"img_{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


def load_pixels(paths: list[Path]) -> torch.Tensor:
    """PNGs → (N, 3, S, S) floats in [0, 1], as our loader makes them."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --- the comparisons -------------------------------------------------------


def compare_tokens(logits: torch.Tensor, ours: torch.Tensor) -> tuple[int, int]:
    """Our tokens against OpenAI's argmax; returns (equal, ties)."""
    theirs = logits.argmax(1)
    if theirs.shape != ours.shape:
        fail(f"token grids: ours {tuple(ours.shape)}, OpenAI's {tuple(theirs.shape)}")
    differ = theirs != ours
    if not differ.any():
        return ours.numel(), 0
    # How far below OpenAI's top logit is the logit of the token we chose?
    gap = logits.max(1).values - logits.gather(1, ours.unsqueeze(1)).squeeze(1)
    log(
        f"{int(differ.sum())} tokens differ; logit gap at mismatches: "
        f"max {gap[differ].max().item():.3g}, min {gap[differ].min().item():.3g}"
    )
    real = differ & (gap >= TIE_TOLERANCE)
    if real.any():
        n, y, x = real.nonzero()[0].tolist()
        fail(
            f"{int(real.sum())} token mismatches beyond the tie tolerance {TIE_TOLERANCE} "
            f"(first: image {n}, cell ({y}, {x}): ours {ours[n, y, x].item()}, "
            f"OpenAI's {theirs[n, y, x].item()}, logit gap {gap[n, y, x].item():.3g})"
        )
    return int((~differ).sum()), int(differ.sum())


def openai_decoded(dall_e, decoder, tokens: torch.Tensor, cfg: dict) -> torch.Tensor:
    """OpenAI's decoder on one-hot tokens → (N, 3, S, S) uint8, rounded as
    our `decode` rounds (clamp to [0, 1], ×255, round half to even)."""
    one_hot = F.one_hot(tokens, cfg["vocab_size"]).permute(0, 3, 1, 2).float()
    stats = decoder(one_hot)
    n, size, channels = tokens.shape[0], cfg["image_size"], cfg["channels"]
    if stats.shape != (n, 2 * channels, size, size) or not stats.isfinite().all():
        finite = bool(stats.isfinite().all())
        fail(f"OpenAI's decoder gave shape {tuple(stats.shape)}, all finite: {finite}")
    # Its first `channels` outputs are the logit-Laplace means (OpenAI's usage).
    pixels = dall_e.unmap_pixels(torch.sigmoid(stats[:, :channels]))
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dalle", type=Path, default=REPO / "target" / "release" / "dalle")
    ap.add_argument("--weights", type=Path, help="default: train a tiny model in a temp dir")
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    if not args.dalle.is_file():
        fail(f"no dalle binary at {args.dalle} (cargo build --release)")
    dall_e = import_dall_e()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory(prefix="openai-compat-") as tmp:
        work = Path(tmp)
        weights = args.weights or train_tiny_model(args.dalle, work)

        # 1. Layout: strict loads into OpenAI's classes.
        tensors, metadata = read_safetensors(weights)
        if "dvae_config" not in metadata:
            fail(f"{weights} has no dvae_config metadata")
        cfg = json.loads(metadata["dvae_config"])
        encoder, decoder = build_openai_models(dall_e, cfg)
        enc_state, dec_state = split_by_prefix(tensors)
        n_enc = load_strictly(encoder, enc_state, "encoder")
        n_dec = load_strictly(decoder, dec_state, "decoder")

        # 2. Encoder: our CLI's tokens against OpenAI's argmax.
        images = write_test_images(work, args.images, cfg["image_size"])
        tokens_file = work / "tokens.jsonl"
        ours = our_tokens(args.dalle, weights, images, tokens_file)
        logits = encoder(dall_e.map_pixels(load_pixels(images)))
        equal, ties = compare_tokens(logits, ours)

        # 3. Decoder: OpenAI's decoder on our tokens against our decoded PNG.
        theirs_px = openai_decoded(dall_e, decoder, ours, cfg)
        ours_px = our_decoded(args.dalle, weights, tokens_file, args.images, cfg["image_size"])
        pixel_diff = int((ours_px.to(torch.int16) - theirs_px.to(torch.int16)).abs().max())
        if pixel_diff > PIXEL_TOLERANCE:
            fail(f"decoded images differ by up to {pixel_diff}/255 (tolerance {PIXEL_TOLERANCE})")

    distinct = ours.unique().numel()
    notes = f", {ties} float ties" if ties else ""
    if distinct < 2:
        notes += "; weak check: the encoder used a single code"
    print(
        f"openai-compat: OK: {args.images} images, {equal}/{ours.numel()} tokens equal "
        f"({distinct} distinct codes{notes}), decoded pixels within {pixel_diff}/255; "
        f"encoder {n_enc} and decoder {n_dec} tensors loaded strictly"
    )


if __name__ == "__main__":
    main()
