#!/usr/bin/env bash
# Stage-2 transformer training throughput: dalle-rs (`dalle bench gpt`)
# against the same model, loss, clipping and AdamW in PyTorch eager
# (gpt_reference.py), with the same config and thread count, alternating
# runs in one session. Two configs:
#   small: dim 256, depth 4, heads 8, text_len 32, 16×16 image grid
#          (288 positions), batch 8
#   demo:  configs/demo.toml's [gpt]: dim 128, depth 4, heads 4,
#          text_len 16, 8×8 grid (80 positions), batch 32
# Both with text and image vocabularies of 512 and dense attention; extra
# --set arguments apply to both (`--set run.precision=bf16`: both sides in
# bf16 autocast). Fails if the two models' parameter counts
# differ.
#
#   scripts/bench/gpt.sh [ROUNDS] [THREADS] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
threads=${2:-$(nproc)}
shift $(( $# > 2 ? 2 : $# ))

scripts/setup.sh
cargo build --release --bin dalle >&2
dalle=target/release/dalle
py=.torch-venv/bin/python
warmup=3

declare -A sets=(
  [small]="--set gpt.model.dim=256 --set gpt.model.heads=8 --set gpt.model.depth=4 --set text.text_len=32 --set gpt.train.batch_size=8"
  [demo]=""
)
declare -A grids=([small]=16 [demo]=8)
declare -A steps=([small]=10 [demo]=30)

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for name in small demo; do
  # shellcheck disable=SC2206
  job=(--set run.device=cpu --set run.threads="$threads" --set gpt.model.attention=dense ${sets[$name]} "$@")
  shape=(--text-vocab 512 --image-vocab 512 --image-grid "${grids[$name]}")
  # The reference's arguments, from the resolved config.
  mapfile -t ref_args < <("$dalle" "${job[@]}" config | python3 -c '
import sys, tomllib
c = tomllib.loads(sys.stdin.read())
m, t, a = c["gpt"]["model"], c["gpt"]["train"], c["gpt"]["train"]["adamw"]
args = {"dim": m["dim"], "depth": m["depth"], "heads": m["heads"], "mlp-ratio": m["mlp_ratio"],
        "dropout": m["dropout"], "attn-dropout": m["attn_dropout"],
        "text-len": c["text"]["text_len"], "batch-size": t["batch_size"],
        "text-loss-weight": t["text_loss_weight"], "beta1": a["beta1"], "beta2": a["beta2"],
        "eps": a["eps"], "weight-decay": a["weight_decay"], "seed": c["run"]["seed"]}
# The same precision (this script runs on the CPU, where auto is fp32).
precision = c["run"].get("precision", "auto")
args["precision"] = "fp32" if precision == "auto" else precision
if "grad_clip" in t:
    args["grad-clip"] = t["grad_clip"]
for k, v in args.items():
    print(f"--{k}"); print(v)
')
  for r in $(seq "$rounds"); do
    echo "$name: round $r/$rounds" >&2
    "$dalle" "${job[@]}" bench gpt "${shape[@]}" --warmup "$warmup" --steps "${steps[$name]}" \
      | sed "s/^{/{\"config\":\"$name\",/" >>"$results"
    "$py" scripts/bench/gpt_reference.py "${ref_args[@]}" "${shape[@]}" --threads "$threads" \
      --warmup "$warmup" --steps "${steps[$name]}" | sed "s/^{/{\"config\":\"$name\",/" >>"$results"
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = True
for name in dict.fromkeys(r["config"] for r in rows):
    by = {}
    for r in rows:
        if r["config"] == name:
            by.setdefault(r["impl"], []).append(r)
    ours, ref = by["dalle-rs"], by["pytorch"]
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    phase = lambda rs, k: statistics.median(r["seconds_per_step"][k] for r in rs) * 1e3
    c = ours[0]
    print(f"[{name}] dim {c['dim']}, depth {c['depth']}, heads {c['heads']}, text_len {c['text_len']}, "
          f"grid {c['image_grid']} ({c['positions']} positions), vocab {c['text_vocab']}/{c['image_vocab']}, "
          f"batch {c['batch_size']}, threads {c['threads']}, {len(ours)} rounds × {c['steps']} steps")
    print(f"  parameters: dalle-rs {c['parameters']:,}, pytorch {ref[0]['parameters']:,}")
    if c["parameters"] != ref[0]["parameters"]:
        print("  PARAMETER COUNTS DIFFER: the two models are not the same", file=sys.stderr)
        ok = False
    for label, rs in (("dalle-rs", ours), ("pytorch ", ref)):
        print(f"  {label}: {med(rs, 'tokens_per_s'):8.0f} tokens/s, {med(rs, 'steps_per_s'):.2f} steps/s, "
              f"peak RSS {med(rs, 'peak_rss_mib'):.0f} MiB; ms/step: forward+loss {phase(rs, 'forward_loss'):.1f}, "
              f"backward {phase(rs, 'backward'):.1f}, grad norm/clip {phase(rs, 'grad_norm_clip'):.1f}, "
              f"AdamW {phase(rs, 'optimizer'):.1f}")
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
        print(f"            runs: {runs} tokens/s")
    print(f"  ratio (dalle-rs / pytorch): tokens/s {med(ours, 'tokens_per_s') / med(ref, 'tokens_per_s'):.3f}, "
          f"peak RSS {med(ours, 'peak_rss_mib') / med(ref, 'peak_rss_mib'):.3f}")
sys.exit(0 if ok else 1)
PY
