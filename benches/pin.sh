#!/bin/bash
# Placement runs of docs/benchmarks.md ("Fifth look"): give this script as THINBLK_BENCH_BIN.
#   PIN_THINBLK=<cpu list>  the whole daemon on those CPUs (taskset -c);
#   PIN_THINBLK=split       queue thread N on CPU N % 2, set as soon as the threads exist;
#   unset                   the daemon as it is.
# The daemon keeps this script's PID (exec), so the bench's CPU figures are still its own.
# The client's placement: run the bench itself under taskset (qemu-storage-daemon and fio
# then inherit it). THINBLK_PIN_BIN: the thinblk binary (default: this tree's release build).
set -u
bin=${THINBLK_PIN_BIN:-$(dirname "$0")/../target/release/thinblk}
me=$$
case "${PIN_THINBLK:-}" in
  "") exec "$bin" "$@" ;;
  split)
    # Watches for up to 5 s for the queue threads (named queueN) and pins each once seen.
    (
      for _ in $(seq 1 50); do
        for t in /proc/"$me"/task/*; do
          name=$(cat "$t/comm" 2>/dev/null) || continue
          case "$name" in
            queue*) taskset -p -c $(( ${name#queue} % 2 )) "${t##*/}" >/dev/null 2>&1 ;;
          esac
        done
        sleep 0.1
      done
    ) &
    exec "$bin" "$@"
    ;;
  *) exec taskset -c "$PIN_THINBLK" "$bin" "$@" ;;
esac
