#!/usr/bin/env bash
# Runs every vhost fuzz target over its committed corpus, then fuzzes it for SECONDS (default
# 20) each, on stable Rust: cargo-fuzz's nightly flags are accepted with RUSTC_BOOTSTRAP=1
# (docs/decisions.md). New inputs go to a temporary directory, not to the committed corpus.
#   cargo install cargo-fuzz --locked && bash vhost/fuzz/smoke.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-20}"
t=$(mktemp -d); trap 'rm -rf "$t"' EXIT
export RUSTC_BOOTSTRAP=1
cargo fuzz build --fuzz-dir vhost/fuzz
for target in message wire chain; do
  mkdir -p "$t/$target"
  cargo fuzz run --fuzz-dir vhost/fuzz "$target" "$t/$target" "vhost/fuzz/corpus/$target" -- \
    -max_total_time="$secs" -max_len=8192 -print_final_stats=1
done
