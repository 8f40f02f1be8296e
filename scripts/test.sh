#!/usr/bin/env bash
# Every check of the project: formatting, lints, and the whole test suite
# (unit, integration and multi-process tests). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# S3 tests run against a real Garage server; build it once (cached in ~/.cargo/bin).
command -v garage >/dev/null 2>&1 || [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/garage" ] || cargo install garage --locked
# The multi-host fault tests (tests/hosts.rs) give each worker a network
# namespace of its own; as root that always works, so there a missing
# namespace is a failure, not a skip.
if [ "$(id -u)" = 0 ]; then
  export DALLE_REQUIRE_NETNS=1
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
