#!/usr/bin/env bash
# The job under random faults (see chaos.py): workers SIGKILLed and
# SIGSTOPped, the coordinator killed and started again once, a worker
# host's link cut once; the sample ledger is then checked against an
# uninterrupted run, and the figures come out as a Markdown table.
#
#   scripts/bench/chaos.sh DURATION [SEED] [STEPS]
#
# Run it as root: the hosts are network namespaces. Where they cannot be
# made, the other faults still run (every host on 127.0.0.1) and the output
# says loudly that the link cut was left out.
#
# DALLE=path/to/dalle uses that binary and builds nothing: as root, build as
# yourself first (scripts/setup.sh, cargo build --release --bin dalle) and
# pass DALLE=target/release/dalle, so that root's set-up does not install
# torch into a cache of its own and relink the checkout to it.
set -euo pipefail
if [ -n "${DALLE:-}" ]; then
  # Resolved before the cd below, so that a relative path works.
  dalle=$(realpath "$DALLE")
fi
cd "$(dirname "$0")/../.."
if [ -z "${DALLE:-}" ]; then
  scripts/setup.sh >&2
  cargo build --release --bin dalle >&2
  dalle=target/release/dalle
fi
exec python3 scripts/bench/chaos.py "$dalle" "$@"
