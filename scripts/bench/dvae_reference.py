#!/usr/bin/env python3
"""PyTorch-eager reference for the dVAE training-throughput benchmark.

The Rust trainer (tch/libtorch) is compared against this script: the same
OpenAI DALL-E dVAE architecture, the same loss (gumbel-softmax relaxation,
logit-Laplace NLL, KL to a uniform prior) and the same AdamW optimiser, run on
CPU with the same thread count in the same benchmark run.  The training data
is one fixed random batch generated once, so the timing measures model
compute only, not data loading.

It is written as a strong PyTorch user would for speed on the CPU: the
model and the batch in channels-last memory format (oneDNN's fast layout
for convolutions; `--memory-format contiguous` for NCHW) and
`torch.optim.AdamW(fused=True)` (`--adamw` for the foreach or for-loop
variants). Weight decay applies to kernels only, as in the Rust trainer.

Prints exactly one JSON line on stdout; progress goes to stderr.

Example:
    .torch-venv/bin/python scripts/bench/dvae_reference.py --threads 2
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Pixels are squeezed into [eps, 1 - eps] so the logit-Laplace likelihood
# never sees log(0).
LOGIT_LAPLACE_EPS = 0.1
TAU = 1.0
BETA = 1.0


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class Conv2d(nn.Module):
    """Conv with explicit `w`/`b` parameters and OpenAI's fan-in init."""

    def __init__(self, n_in, n_out, kw):
        super().__init__()
        std = 1.0 / math.sqrt(n_in * kw * kw)
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) * std)
        self.b = nn.Parameter(torch.zeros(n_out))
        self.padding = (kw - 1) // 2

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=self.padding)


class ResBlock(nn.Module):
    """Bottleneck residual block; the residual path is scaled down by
    1/n_layers**2 so the deep stack starts close to identity."""

    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [nn.ReLU(), Conv2d(widths[i], widths[i + 1], k)]
        self.res_path = nn.Sequential(*layers)

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def make_group(n_in, n_out, n_blk, n_layers, kernels):
    """n_blk blocks; only the first one changes the width."""
    blocks = [ResBlock(n_in if i == 0 else n_out, n_out, n_layers, kernels)
              for i in range(n_blk)]
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    def __init__(self, channels, n_hid, n_blk_per_group, vocab_size):
        super().__init__()
        n_layers = 4 * n_blk_per_group
        kernels = (3, 3, 3, 1)
        layers = [Conv2d(channels, n_hid, 7)]
        width = n_hid
        for g in range(1, 5):
            n_out = n_hid * 2 ** (g - 1)
            layers.append(make_group(width, n_out, n_blk_per_group, n_layers, kernels))
            width = n_out
            if g < 4:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), Conv2d(8 * n_hid, vocab_size, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, channels, n_hid, n_blk_per_group, vocab_size, n_init):
        super().__init__()
        n_layers = 4 * n_blk_per_group
        kernels = (1, 3, 3, 3)
        layers = [Conv2d(vocab_size, n_init, 1)]
        width = n_init
        for g in range(1, 5):
            n_out = n_hid * 2 ** (4 - g)
            layers.append(make_group(width, n_out, n_blk_per_group, n_layers, kernels))
            width = n_out
            if g < 4:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), Conv2d(n_hid, 2 * channels, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z):
        return self.blocks(z)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------


def map_pixels(x):
    return x * (1 - 2 * LOGIT_LAPLACE_EPS) + LOGIT_LAPLACE_EPS


def unmap_pixels(y):
    return torch.clamp((y - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def gumbel_noise(like):
    # Clamp keeps both logs finite.
    u = torch.rand_like(like).clamp(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def logit_laplace_nll(x_mapped, mu, ln_b):
    """Mean negative log-likelihood of the logit-Laplace distribution."""
    logit_x = torch.log(x_mapped) - torch.log1p(-x_mapped)
    nll = (ln_b + math.log(2.0) + torch.log(x_mapped - x_mapped**2)
           + torch.abs(logit_x - mu) * torch.exp(-ln_b))
    return nll.mean()


def kl_to_uniform(logits):
    """KL(q || uniform) summed over codes and positions, averaged over batch."""
    vocab = logits.shape[1]
    log_q = F.log_softmax(logits, dim=1)
    q = log_q.exp()
    return (q * (log_q + math.log(vocab))).sum() / logits.shape[0]


def train_step(enc, dec, opt, x, autocast):
    """One optimisation step; returns the loss as a Python float."""
    channels, height, width = x.shape[1:]
    with autocast:
        x_mapped = map_pixels(x)
        # The noise, the KL and the likelihood in fp32 (no-ops in fp32), as
        # the Rust trainer computes them under bf16 autocast.
        logits = enc(x_mapped).float()
        z = F.softmax((logits + gumbel_noise(logits)) / TAU, dim=1)  # mode "soft"
        stats = dec(z).float()
        mu, ln_b = stats[:, :channels], stats[:, channels:2 * channels]

        nll = logit_laplace_nll(x_mapped, mu, ln_b)
        kl = kl_to_uniform(logits)
        loss = nll + BETA * kl / (channels * height * width)

    # Side metrics computed for parity with the Rust trainer's logging; they
    # are never synchronised to Python, so they cost only their compute.
    with torch.no_grad():
        _mse = F.mse_loss(unmap_pixels(torch.sigmoid(mu.detach())), x)
        _codes = logits.detach().argmax(dim=1)

    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    # One host read per step, like the Rust loop.
    return loss.item()


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--n-hid", type=int, default=32)
    p.add_argument("--n-blk-per-group", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--n-init", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"],
                   default="channels_last")
    p.add_argument("--adamw", choices=["fused", "foreach", "for-loop"], default="fused")
    # bf16 is torch.autocast around forward and loss with fp32 weights, as
    # PyTorch users train; tf32 lets cuBLAS and cuDNN use TF32.
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.image_size % 8 != 0:
        p.error("--image-size must be divisible by 8 (three 2x pools)")
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # Only settable before any inter-op work has started.
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")

    enc = Encoder(args.channels, args.n_hid, args.n_blk_per_group, args.vocab_size)
    dec = Decoder(args.channels, args.n_hid, args.n_blk_per_group,
                  args.vocab_size, args.n_init)
    log(f"encoder params: {count_params(enc):,}  decoder params: "
        f"{count_params(dec):,}  threads: {torch.get_num_threads()}")

    enc, dec = enc.to(device), dec.to(device)
    params = list(enc.parameters()) + list(dec.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 1e-4},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    variant = {"fused": {"fused": True}, "foreach": {"foreach": True},
               "for-loop": {"foreach": False}}[args.adamw]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, **variant)
    x = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size,
                   device=device)
    if args.memory_format == "channels_last":
        enc = enc.to(memory_format=torch.channels_last)
        dec = dec.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    for i in range(args.warmup):
        loss = train_step(enc, dec, opt, x, autocast)
        log(f"warmup {i + 1}/{args.warmup}: loss {loss:.5f}")

    start = time.perf_counter()
    for i in range(args.steps):
        loss = train_step(enc, dec, opt, x, autocast)
        log(f"step {i + 1}/{args.steps}: loss {loss:.5f}")
    seconds = time.perf_counter() - start

    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "n_hid": args.n_hid,
        "n_blk_per_group": args.n_blk_per_group,
        "vocab_size": args.vocab_size,
        "n_init": args.n_init,
        "batch_size": args.batch_size,
        "memory_format": args.memory_format,
        "precision": args.precision,
        "device": str(device),
        "adamw": args.adamw,
        "steps": args.steps,
        "seconds": seconds,
        "images_per_s": args.batch_size * args.steps / seconds,
        # ru_maxrss is KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": float(loss),
    }), flush=True)


if __name__ == "__main__":
    main()
