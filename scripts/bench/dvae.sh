#!/usr/bin/env bash
# dVAE training throughput: dalle-rs (`dalle bench dvae`) against the same
# model, loss and optimizer in PyTorch eager (dvae_reference.py), on the CPU
# with the same thread count, alternating runs in one session. Model and
# batch: the demo config's (configs/demo.toml), overridable with --set.
#
#   scripts/bench/dvae.sh [ROUNDS] [THREADS] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
threads=${2:-$(nproc)}
shift $(( $# > 2 ? 2 : $# ))

scripts/setup.sh
cargo build --release --bin dalle >&2
dalle=target/release/dalle
py=.torch-venv/bin/python

cfg=$("$dalle" --set run.device=cpu "$@" config)
get() { awk -v sec="[$1]" -v key="$2" '$0==sec{f=1;next} /^\[/{f=0} f && $1==key{print $3}' <<<"$cfg"; }
model_args=(--image-size "$(get dvae.model image_size)" --n-hid "$(get dvae.model n_hid)"
  --n-blk-per-group "$(get dvae.model n_blk_per_group)" --vocab-size "$(get dvae.model vocab_size)"
  --n-init "$(get dvae.model n_init)" --batch-size "$(get dvae.train batch_size)")

results=$(mktemp)
for r in $(seq "$rounds"); do
  echo "round $r/$rounds" >&2
  "$dalle" --set run.device=cpu --set run.threads="$threads" --set dvae.train.relaxation=soft \
    --set dvae.train.recon=logit_laplace "$@" bench dvae --warmup 3 --steps 20 >>"$results"
  "$py" scripts/bench/dvae_reference.py "${model_args[@]}" --threads "$threads" --warmup 3 --steps 20 >>"$results"
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["impl"], []).append(r)
ours, ref = by["dalle-rs"], by["pytorch"]
med = lambda rs, k: statistics.median(r[k] for r in rs)
c = ours[0]
print(f"config: image {c['image_size']}, n_hid {c['n_hid']}, blocks/group {c['n_blk_per_group']}, "
      f"vocab {c['vocab_size']}, n_init {c['n_init']}, batch {c['batch_size']}, threads {c['threads']}, "
      f"{len(ours)} rounds × {c['steps']} steps")
print(f"dalle-rs: {med(ours, 'images_per_s'):.1f} img/s, peak RSS {med(ours, 'peak_rss_mib'):.0f} MiB")
print(f"pytorch:  {med(ref, 'images_per_s'):.1f} img/s, peak RSS {med(ref, 'peak_rss_mib'):.0f} MiB")
print(f"ratio (dalle-rs / pytorch): throughput {med(ours, 'images_per_s') / med(ref, 'images_per_s'):.3f}, "
      f"peak RSS {med(ours, 'peak_rss_mib') / med(ref, 'peak_rss_mib'):.3f}")
PY
rm -f "$results"
