#!/bin/bash
# A/B of FUSE over io_uring (issue 21, fs/fuse-uring.ts): the default transport (worker
# threads on cloned /dev/fuse descriptors) against TSMOUNT_FUSE_URING=1, interleaved
# (the order flips every round), a fresh mount per measurement, host files warm. Sets
# fuse.enable_uring=Y for the run (root) and puts the old value back at the end. Modes:
# workers, uring, uring-nospin (TSMOUNT_FUSE_SPIN_US=0: the queues sleep at once).
# Prints one line per measurement: row, mode, result, and the server's CPU seconds
# (JS thread and the rest). Usage: uring-ab.sh [ROUNDS] [WORKDIR]
set -euo pipefail
ROUNDS=${1:-3}
W=${2:-/tmp/tsmount-uring-ab}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
TSMOUNT="node $HERE/dist/mount-helpers/tsmount.js"
PARAM=/sys/module/fuse/parameters/enable_uring
OLD=$(cat $PARAM)
trap 'echo "$OLD" > $PARAM' EXIT
echo Y > $PARAM
mkdir -p "$W/mp"
if [ ! -f "$W/full.qcow2" ]; then
  head -c 1G /dev/urandom > "$W/src.raw"
  qemu-img convert -O qcow2 "$W/src.raw" "$W/full.qcow2"
  rm -f "$W/src.raw"
fi
cat "$W/full.qcow2" > /dev/null

pid_of() { $TSMOUNT --list --output json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const m=JSON.parse(s).find(x=>x.mountpoint===process.argv[1]);console.log(m?m.pid:0)})' "$1"; }
cpu_of() { awk '{print $14+$15}' "/proc/$1/stat"; }
main_of() { awk '{print $14+$15}' "/proc/$1/task/$1/stat"; }

measure() { # row mode image cmd...
  local row=$1 mode=$2 img=$3; shift 3
  local uring=0 spin=${TSMOUNT_FUSE_SPIN_US:-50}
  case $mode in uring) uring=1 ;; uring-nospin) uring=1 spin=0 ;; esac
  TSMOUNT_FUSE_URING=$uring TSMOUNT_FUSE_SPIN_US=$spin $TSMOUNT "$img" "$W/mp" >/dev/null
  local flat="$W/mp/$(basename "${img%.*}").raw" pid; pid=$(pid_of "$W/mp")
  sleep 2
  # A first pass fills the read map (misses go to the JS thread in both modes).
  dd if="$flat" of=/dev/null bs=1M iflag=direct status=none
  local c0 m0 t0 out c1 m1 t1; c0=$(cpu_of "$pid"); m0=$(main_of "$pid"); t0=$(date +%s.%N)
  out=$("$@" "$flat")
  c1=$(cpu_of "$pid"); m1=$(main_of "$pid"); t1=$(date +%s.%N)
  $TSMOUNT -u "$W/mp" >/dev/null
  local main other
  main=$(echo "($m1-$m0)/100" | bc -l); other=$(echo "($c1-$c0-$m1+$m0)/100" | bc -l)
  printf '%s mode=%s %s main_cpu=%.2fs other_cpu=%.2fs cores=%.2f\n' "$row" "$mode" "$out" "$main" "$other" "$(echo "($c1-$c0)/100/($t1-$t0)" | bc -l)"
}

dd_read() { dd if="$1" of=/dev/null bs=1M iflag=direct 2>&1 | sed -n 's/.*copied, \([0-9.]*\) s, \(.*\)/\2/p' | tr -d ' '; }
fio_rand() { # jobs file
  fio --name=ab --filename="$2" --rw=randread --bs=4k --ioengine=psync --direct=1 --numjobs="$1" --size=1G \
    --group_reporting --time_based --runtime=5 --output-format=json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s.slice(s.indexOf("{")));console.log(Math.round(j.jobs[0].read.iops)+"iops")})'
}
fio1() { fio_rand 1 "$1"; }
fio4() { fio_rand 4 "$1"; }

for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then modes="workers uring uring-nospin"; else modes="uring-nospin uring workers"; fi
  echo "# round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
  for m in $modes; do measure seq-qcow2 "$m" "$W/full.qcow2" dd_read; done
  for m in $modes; do measure rand1-qcow2 "$m" "$W/full.qcow2" fio1; done
  for m in $modes; do measure rand4-qcow2 "$m" "$W/full.qcow2" fio4; done
done
