#!/usr/bin/env python3
"""PyTorch-eager reference for the stage-2 transformer training benchmark.

`dalle bench gpt` (tch/libtorch) is compared against this script: the same
decoder-only transformer over [BOS, caption, image tokens], the same
weighted text/image cross-entropy, global-norm gradient clipping and AdamW
(decay on weight matrices only), run with the same thread count in the same
benchmark run. The batch is one fixed set of random captions and image
tokens generated once, so the timing measures model compute only.

Prints exactly one JSON line on stdout; progress goes to stderr.

Example:
    .torch-venv/bin/python scripts/bench/gpt_reference.py --threads 2
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

INIT_STD = 0.02
LR = 1e-4


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def linear(n_in, n_out, std):
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.zeros_(layer.bias)
    return layer


def embedding(count, dim):
    emb = nn.Embedding(count, dim)
    nn.init.normal_(emb.weight, 0.0, INIT_STD)
    return emb


class Attention(nn.Module):
    def __init__(self, dim, heads, depth, attn_dropout):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = linear(dim, 3 * dim, INIT_STD)
        # GPT-2: residual projections scaled by 1/sqrt(2 * depth).
        self.proj = linear(dim, dim, INIT_STD / math.sqrt(2 * depth))

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, ratio, depth):
        super().__init__()
        self.fc = linear(dim, ratio * dim, INIT_STD)
        self.proj = linear(ratio * dim, dim, INIT_STD / math.sqrt(2 * depth))

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, dim, heads, ratio, depth, dropout, attn_dropout):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads, depth, attn_dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, ratio, depth)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """Input [BOS, caption (T), image tokens 0..N-2]: T + N positions.
    Text ids 0..V are BPE, V + p the pad of position p, V + T is BOS."""

    def __init__(self, a):
        super().__init__()
        d, t, v, g = a.dim, a.text_len, a.text_vocab, a.image_grid
        self.text_len, self.text_vocab, self.grid = t, v, g
        self.text_emb = embedding(v + t + 1, d)
        self.text_pos = embedding(t + 1, d)
        self.image_emb = embedding(a.image_vocab, d)
        self.image_row = embedding(g, d)
        self.image_col = embedding(g, d)
        self.drop = nn.Dropout(a.dropout)
        self.blocks = nn.ModuleList(
            Block(d, a.heads, a.mlp_ratio, a.depth, a.dropout, a.attn_dropout)
            for _ in range(a.depth))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.text_head = linear(d, v + t, INIT_STD)
        self.image_head = linear(d, a.image_vocab, INIT_STD)
        n = g * g
        self.register_buffer("text_positions", torch.arange(t + 1), persistent=False)
        self.register_buffer("rows", torch.arange(n - 1) // g, persistent=False)
        self.register_buffer("cols", torch.arange(n - 1) % g, persistent=False)

    def forward(self, text, image):
        b, t = text.shape[0], self.text_len
        bos = torch.full((b, 1), self.text_vocab + t, dtype=torch.long, device=text.device)
        x_text = self.text_emb(torch.cat([bos, text], 1)) + self.text_pos(self.text_positions)
        x_image = (self.image_emb(image[:, :-1]) + self.image_row(self.rows)
                   + self.image_col(self.cols))
        x = self.drop(torch.cat([x_text, x_image], 1))
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        return self.text_head(h[:, :t]), self.image_head(h[:, t:])


def loss_fn(model, text, image, text_weight):
    text_logits, image_logits = model(text, image)
    text_loss = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text.reshape(-1))
    image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]),
                                 image.reshape(-1))
    return text_weight * text_loss + (1 - text_weight) * image_loss


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--attn-dropout", type=float, default=0.0)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--text-vocab", type=int, default=512)
    p.add_argument("--image-vocab", type=int, default=512)
    p.add_argument("--image-grid", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--text-loss-weight", type=float, default=0.125)
    p.add_argument("--grad-clip", type=float, default=None,
                   help="global-norm clip (left out: the norm is computed, not applied)")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.96)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.045)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    # The fastest AdamW torch has for the device: the fused kernel (CPU and
    # CUDA since torch 2.4), unless told otherwise.
    p.add_argument("--adamw", choices=["fused", "foreach", "loop"], default="fused")
    # What a PyTorch user trains in: bf16 autocast (fp32 master weights and
    # AdamW state) or TF32 matmuls on a GPU; fp32 is the like-for-like
    # comparison with `run.precision = "fp32"`.
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (the step ends with .item(), so timings are synchronised)")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.dim % args.heads:
        p.error("--dim must be a multiple of --heads")
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
    model = Transformer(args).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {params:,}  threads: {torch.get_num_threads()}")

    # Decoupled weight decay on matrices only (not biases, gains, ...):
    # embeddings are matrices too, as in the Rust optimizer.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(args.beta1, args.beta2), eps=args.eps,
        fused=args.adamw == "fused", foreach=args.adamw == "foreach")
    max_norm = args.grad_clip if args.grad_clip is not None else math.inf

    t, n = args.text_len, args.image_grid ** 2
    text = torch.randint(0, args.text_vocab + t, (args.batch_size, t), device=device)
    image = torch.randint(0, args.image_vocab, (args.batch_size, n), device=device)

    phases = [0.0, 0.0, 0.0, 0.0]

    def step(record):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model, text, image, args.text_loss_weight)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        # Read back like the Rust loop, which logs the norm.
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        t3 = time.perf_counter()
        opt.step()
        value = loss.item()
        t4 = time.perf_counter()
        if record:
            for i, d in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[i] += d
        return value

    for i in range(args.warmup):
        loss = step(False)
        log(f"warmup {i + 1}/{args.warmup}: loss {loss:.5f}")

    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(True)
        log(f"step {i + 1}/{args.steps}: loss {loss:.5f}")
    seconds = time.perf_counter() - start

    positions = t + n
    print(json.dumps({
        "impl": "pytorch",
        "adamw": args.adamw,
        "precision": args.precision,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dim": args.dim,
        "depth": args.depth,
        "heads": args.heads,
        "mlp_ratio": args.mlp_ratio,
        "text_len": t,
        "text_vocab": args.text_vocab,
        "image_vocab": args.image_vocab,
        "image_grid": args.image_grid,
        "positions": positions,
        "batch_size": args.batch_size,
        "parameters": params,
        "steps": args.steps,
        "seconds": seconds,
        "steps_per_s": args.steps / seconds,
        "tokens_per_s": args.batch_size * positions * args.steps / seconds,
        "seconds_per_step": {
            "forward_loss": phases[0] / args.steps,
            "backward": phases[1] / args.steps,
            "grad_norm_clip": phases[2] / args.steps,
            "optimizer": phases[3] / args.steps,
        },
        # ru_maxrss is KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": float(loss),
    }), flush=True)


if __name__ == "__main__":
    main()
