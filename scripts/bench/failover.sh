#!/usr/bin/env bash
# What losing a worker costs (see failover.py): the demo's dVAE stage with
# two workers, uninterrupted, with one worker killed, and with one hung.
#
#   scripts/bench/failover.sh [STEPS] [EVERY] [KILL_AT]
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh >&2
cargo build --release --bin dalle >&2
exec python3 scripts/bench/failover.py target/release/dalle "$@"
