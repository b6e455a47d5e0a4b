#!/bin/bash
# A/B of the FUSE workers' splice path (issue 21): TSMOUNT_FUSE_SPLICE=0 (pread into a
# JS buffer, write to /dev/fuse) against =1 (splice through a pipe) and the ceiling
# server (scripts/bench/ceiling.c, libfuse3 serving memory), interleaved (the order
# rotates every round), a fresh mount per measurement, the host image files warm in the
# page cache. Prints one line per measurement: image, mode, dd's speed, and the
# server's CPU seconds over the read. Usage: splice-ab.sh [ROUNDS] [WORKDIR]
# MODES (default "0 1 ceiling"): 0 and 1 are TSMOUNT_FUSE_SPLICE, "ceiling" the ceiling
# server; a suffix /KIB sets the mount's read_ahead_kb (tsmount: TSMOUNT_READAHEAD_KIB,
# the ceiling: through sysfs after its mount; without one each keeps its own: 1024 for
# tsmount, the kernel's for libfuse). VMDK=0 skips the vmdk image.
# Needs the ceiling binary that scripts/bench.ts builds (CEILING=path to override).
set -euo pipefail
ROUNDS=${1:-3}
W=${2:-/tmp/tsmount-splice-ab}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
TSMOUNT="node $HERE/dist/mount-helpers/tsmount.js"
CEILING=${CEILING:-$(ls -t /tmp/tsmount-ceiling-* 2>/dev/null | grep -v '\.' | head -1)}
mkdir -p "$W/mp"
if [ ! -f "$W/full.qcow2" ]; then
  head -c 1G /dev/urandom > "$W/src.raw"
  qemu-img convert -O qcow2 "$W/src.raw" "$W/full.qcow2"
  qemu-img convert -O vmdk -o subformat=monolithicSparse "$W/src.raw" "$W/full.vmdk"
  rm -f "$W/src.raw"
fi
cat "$W/full.qcow2" "$W/full.vmdk" > /dev/null
SIZE=$((1 << 30))

pid_of() { $TSMOUNT --list --output json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const m=JSON.parse(s).find(x=>x.mountpoint===process.argv[1]);console.log(m?m.pid:0)})' "$1"; }
cpu_of() { awk '{s=0; for (i=14;i<=15;i++) s+=$i; print s}' "/proc/$1/stat"; }
# Per thread: "tid:cpu_ticks" for every thread of the process.
threads_of() { for t in /proc/"$1"/task/*; do echo "${t##*/}:$(awk '{print $14+$15}' "$t/stat" 2>/dev/null)"; done; }
# The CPU seconds of each thread that used more than 0.05 s between two threads_of lists.
thread_delta() { # before after
  join -t: <(tr ' ' '\n' <<< "$1" | sort) <(tr ' ' '\n' <<< "$2" | sort) | awk -F: '{d=($3-$2)/100; if (d>0.05) printf "%s=%.2f ", $1, d}'
}
dd_read() { dd if="$1" of=/dev/null bs=1M 2>&1 | sed -n 's/.*copied, \([0-9.]*\) s, \(.*\)/\2/p' | tr -d ' '; }

bdi_of() { awk -v mp="$1" '$5 == mp { print $3 }' /proc/self/mountinfo | tail -1; }

measure() { # image mode
  local img=$1 mode=${2%%/*} ra= flat pid cpid=
  [ "$2" != "$mode" ] && ra=${2#*/}
  if [ "$mode" = ceiling ]; then
    # Its root is the file: mounted over a regular file, as scripts/bench.ts does.
    : > "$W/cfile"
    "$CEILING" "$SIZE" "$W/cfile" >/dev/null 2>&1 & cpid=$!
    for _ in $(seq 100); do grep -q " $W/cfile " /proc/mounts && break; sleep 0.05; done
    if [ -n "$ra" ]; then echo "$ra" > "/sys/class/bdi/$(bdi_of "$W/cfile")/read_ahead_kb"; fi
    flat="$W/cfile"; pid=$cpid
  else
    TSMOUNT_FUSE_SPLICE=$mode TSMOUNT_READAHEAD_KIB=${ra:-1024} $TSMOUNT "$img" "$W/mp" >/dev/null
    flat="$W/mp/$(basename "${img%.*}").raw"; pid=$(pid_of "$W/mp")
    # The workers start within a second or two of the mount; a first pass fills the read map.
    sleep 2
  fi
  local c0 out c1 extra= t0 t1
  c0=$(cpu_of "$pid"); t0=$(threads_of "$pid" | tr '\n' ' ')
  out=$(dd_read "$flat" || echo failed)
  c1=$(cpu_of "$pid"); t1=$(threads_of "$pid" | tr '\n' ' ')
  if [ "$mode" = ceiling ]; then kill "$cpid"; wait "$cpid" 2>/dev/null || true; umount -l "$W/cfile" 2>/dev/null || true
  else
    sleep 1.1
    extra=$($TSMOUNT --list --output json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const m=JSON.parse(s).find(x=>x.mountpoint===process.argv[1]);const c=m.counters||{};console.log(`reads=${c.reads} worker=${c.workerReads??0} spliced=${c.splicedReads??0}`)})' "$W/mp")
    $TSMOUNT -u "$W/mp" >/dev/null
  fi
  printf '%s mode=%s %s server_cpu=%.2fs %s threads: %s\n' "$(basename "$img")" "$2" "$out" "$(echo "($c1-$c0)/100" | bc -l)" "$extra" "$(thread_delta "$t0" "$t1")"
}

read -r -a MODE_LIST <<< "${MODES:-0 1 ceiling}"
N=${#MODE_LIST[@]}
for r in $(seq 1 "$ROUNDS"); do
  # Rotate the order each round.
  modes=()
  for i in $(seq 0 $((N - 1))); do modes+=("${MODE_LIST[$(((i + r - 1) % N))]}"); done
  echo "# round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
  for m in "${modes[@]}"; do measure "$W/full.qcow2" "$m"; done
  if [ "${VMDK:-1}" = 1 ]; then for m in "${modes[@]}"; do [ "${m%%/*}" = ceiling ] || measure "$W/full.vmdk" "$m"; done; fi
done
