#!/usr/bin/env bash
# Seeds the fuzz corpus with small real images (plain, compressed, with a snapshot), then
# fuzzes the open path. Stable Rust works: cargo-fuzz with RUSTC_BOOTSTRAP=1 and -s none
# (FUZZ_SANITIZER=address for AddressSanitizer, as CI runs it).
#   cargo install cargo-fuzz && bash qcow2/fuzz/seed.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus
t=$(mktemp -d); trap 'rm -rf "$t"' EXIT
qemu-img create -q -f qcow2 -o cluster_size=512 "$t/a.qcow2" 1M
qemu-io -f qcow2 -c 'write -P 1 0 4k' -c 'write -z 8k 4k' "$t/a.qcow2" >/dev/null
cp "$t/a.qcow2" corpus/plain.qcow2
head -c 300000 /dev/zero | tr '\0' a > "$t/r"
qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 "$t/r" corpus/compressed.qcow2
qemu-img snapshot -c s1 "$t/a.qcow2" && cp "$t/a.qcow2" corpus/snapshot.qcow2
RUSTC_BOOTSTRAP=1 cargo fuzz run open -s "${FUZZ_SANITIZER:-none}" corpus -- -max_total_time="${1:-60}" -max_len=80000
