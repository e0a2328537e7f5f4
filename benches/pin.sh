#!/bin/bash
# Placement runs of docs/benchmarks.md ("Fifth look"): give this script as THINBLK_BENCH_BIN.
#   PIN_THINBLK=<cpu list>  the whole daemon on those CPUs (taskset -c);
#   PIN_THINBLK=split       queue thread N on CPU N % 2, each pinned once as soon as it exists;
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
    # As many queue threads as --num-queues asks for (the daemon's default is 1).
    queues=1
    prev=""
    for a in "$@"; do
      [ "$prev" = --num-queues ] && queues=$a
      case "$a" in --num-queues=*) queues=${a#*=} ;; esac
      prev=$a
    done
    # Looks every 20 ms for 5 s at most (a sleep is the only process a look starts); stops once
    # every queue thread is pinned, so nothing runs beside the measured row (it then stays a
    # zombie child of the daemon until the daemon exits: harmless).
    (
      pinned=" "
      n=0
      for _ in $(seq 1 250); do
        for t in /proc/"$me"/task/*; do
          tid=${t##*/}
          case "$pinned" in *" $tid "*) continue ;; esac
          read -r name 2>/dev/null < "$t/comm" || continue
          case "$name" in
            queue*)
              taskset -p -c $(( ${name#queue} % 2 )) "$tid" >/dev/null 2>&1 && pinned="$pinned$tid " && n=$((n + 1))
              ;;
          esac
        done
        [ "$n" -ge "$queues" ] && exit 0
        sleep 0.02
      done
      echo "pin.sh: pinned $n of $queues queue threads in 5 s; the rest run unpinned" >&2
    ) &
    exec "$bin" "$@"
    ;;
  *) exec taskset -c "$PIN_THINBLK" "$bin" "$@" ;;
esac
