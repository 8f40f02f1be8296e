#!/usr/bin/env python3
"""Screening runs for the dVAE recipe (README, "The dVAE recipe"; QUALITY.md).

The model, loss and optimiser of scripts/bench/dvae_reference.py (the same
architecture and init as dalle-rs' dVAE) trained on a dataset written by
`dalle data synth` (or scripts/real_photos.sh), with one recipe knob per
flag, and measured every 200 steps on held-out images through the path
stage 2 sees: argmax codes, decoded. Prints one JSON line per measurement:
PSNR, the mean-colour baseline, codes used per batch of 16 and their
perplexity, and `soft` (decoding the softmax posterior, to tell a codebook
problem from a decoder one). Single-threaded, so two variants can run side
by side on two cores. The Rust trainer is what ships; this is for sweeps.

Example (the demo's recipe):
    scripts/bench/dvae_recipe_sweep.sh --train runs/demo/data \
        --val runs/heldout/data --recon mse --usage 1 --post-gain 1
"""
import glob
import io
import argparse, json, math, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import torch
import torch.nn.functional as F
from dvae_reference import Encoder, Decoder, ResBlock, map_pixels, unmap_pixels, logit_laplace_nll

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--steps", type=int, default=1200)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--lr-end", type=float, default=1e-5)
p.add_argument("--tau", type=float, default=1.0)
p.add_argument("--tau-end", type=float, default=1 / 16)
p.add_argument("--tau-steps", type=int, default=1200)
p.add_argument("--beta", type=float, default=6.6)
p.add_argument("--beta-steps", type=int, default=100)
p.add_argument("--usage", type=float, default=0.0)
p.add_argument("--recon", default="ll")
p.add_argument("--usage-ema", type=float, default=0.0)
p.add_argument("--min-lnb", type=float, default=None)
p.add_argument("--sigma", type=float, default=0.1)
p.add_argument("--no-noise", action="store_true")
p.add_argument("--usage-on", default="q")
p.add_argument("--post-gain", type=float, default=None)
p.add_argument("--st", action="store_true")
p.add_argument("--n-hid", type=int, default=32)
p.add_argument("--vocab", type=int, default=512)
p.add_argument("--image-size", type=int, default=64)
p.add_argument("--train", required=True, help="directory of Parquet files")
p.add_argument("--val", required=True, help="directory of Parquet files (held out)")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)

enc = Encoder(3, a.n_hid, 1, a.vocab)
dec = Decoder(3, a.n_hid, 1, a.vocab, 64)
if a.post_gain is not None:
    for m in list(enc.modules()) + list(dec.modules()):
        if isinstance(m, ResBlock):
            m.post_gain = a.post_gain
params = list(enc.parameters()) + list(dec.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)


def read_images(directory, limit=None):
    """[0, 1] float images (N, 3, S, S) of every Parquet file in `directory`."""
    import pyarrow.parquet as pq
    from PIL import Image
    images = []
    for path in sorted(glob.glob(os.path.join(directory, "*.parquet"))):
        table = pq.read_table(path)
        column = next(c for c in ("png", "jpg", "webp", "image") if c in table.column_names)
        for blob in table.column(column).to_pylist():
            blob = blob["bytes"] if isinstance(blob, dict) else blob
            images.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1))
            if limit and len(images) == limit:
                break
    if not images:
        raise SystemExit(f"no images in {directory}")
    return torch.from_numpy(np.stack(images)).float() / 255


train = read_images(a.train)
val = read_images(a.val, 512)


def cos(start, end, steps, t):
    t = min(t, steps) / steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def evaluate():
    with torch.no_grad():
        mses, base, used, ppl, soft = [], [], [], [], []
        for i in range(0, len(val), 16):
            x = val[i:i + 16]
            logits = enc(map_pixels(x))
            tok = logits.argmax(1)
            z = F.one_hot(tok, a.vocab).permute(0, 3, 1, 2).float()
            stats = dec(z)
            xr = unmap_pixels(torch.sigmoid(stats[:, :3]))
            mses.append(((xr - x) ** 2).mean().item())
            xs = unmap_pixels(torch.sigmoid(dec(F.softmax(logits, 1))[:, :3]))
            soft.append(((xs - x) ** 2).mean().item())
            base.append(((x.mean((2, 3), keepdim=True) - x) ** 2).mean().item())
            c = torch.bincount(tok.flatten(), minlength=a.vocab).double()
            used.append((c > 0).sum().item())
            q = c / c.sum()
            ppl.append(math.exp(-(q * q.clamp_min(1e-30).log()).sum().item()))
        m = np.mean(mses)
        return dict(psnr=-10 * math.log10(m), soft=-10 * math.log10(np.mean(soft)), base=-10 * math.log10(np.mean(base)),
                    used=float(np.mean(used)), ppl=float(np.mean(ppl)))


g = torch.Generator().manual_seed(a.seed)
t0 = time.time()
for step in range(a.steps):
    idx = torch.randint(len(train), (a.batch,), generator=g)
    x = train[idx]
    lr = cos(a.lr, a.lr_end, a.steps, step)
    for pg in opt.param_groups:
        pg["lr"] = lr
    tau = cos(a.tau, a.tau_end, a.tau_steps, step)
    beta = cos(0, a.beta, a.beta_steps, step)
    xm = map_pixels(x)
    logits = enc(xm)
    z = F.softmax(logits, 1) if a.no_noise else F.gumbel_softmax(logits, tau=tau, hard=a.st, dim=1)
    stats = dec(z)
    mu, lnb = stats[:, :3], stats[:, 3:]
    if a.min_lnb is not None:
        lnb = lnb.clamp_min(a.min_lnb)
    if a.recon == "ll":
        rec = logit_laplace_nll(xm, mu, lnb)
    else:
        rec = ((unmap_pixels(torch.sigmoid(mu)) - x) ** 2).mean() / (2 * a.sigma ** 2)
    logq = F.log_softmax(logits, 1)
    kl = (logq.exp() * (logq + math.log(a.vocab))).sum() / a.batch
    qbar = (logq.exp() if a.usage_on == "q" else z).mean((0, 2, 3))
    if a.usage_ema > 0:
        ema = qbar.detach() if step == 0 else a.usage_ema * ema + (1 - a.usage_ema) * qbar.detach()
        usage = (qbar * (ema.clamp_min(1e-30).log() + math.log(a.vocab))).sum()
    else:
        usage = (qbar * (qbar.clamp_min(1e-30).log() + math.log(a.vocab))).sum()
    loss = rec + beta * kl / (3 * a.image_size ** 2) + a.usage * usage
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % 200 == 0 or step + 1 == a.steps:
        e = evaluate()
        print(json.dumps(dict(tag=a.tag, step=step + 1, rec=round(rec.item(), 4), kl=round(kl.item() / (a.image_size // 8) ** 2, 3),
                              usage=round(usage.item(), 3), t=round(time.time() - t0), **{k: round(v, 2) for k, v in e.items()})), flush=True)
