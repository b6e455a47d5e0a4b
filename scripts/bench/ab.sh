#!/bin/bash
# A/B of tsmount's FUSE transport settings (issue 21), interleaved: the order of the
# modes rotates every round, each measurement on a fresh mount, the host image files
# warm in the page cache. Prints one line per measurement: test, mode, result, the
# server's CPU seconds (its JS thread and the rest, and the cores that makes), and for
# tsmount the counters `tsmount --list` shows.
#   ab.sh [ROUNDS] [WORKDIR]
# MODES: space-separated NAME=SETTINGS, SETTINGS a comma-separated list of environment
#   assignments for the tsmount server (NAME= alone: the defaults), or the word
#   `ceiling`: the ceiling server (scripts/bench/ceiling.c, built by scripts/bench.ts;
#   CEILING=path overrides), mounted over a file with a 1 MiB readahead as the bench does;
#   or the word `cfile`: the same server with --file, serving the raw copy of the qcow2
#   from storage (pread/pwrite in C on libfuse3: tsmount's storage work without
#   tsmount), for the random rows.
#   The earlier per-experiment scripts are these:
#     workers: MODES="one=TSMOUNT_FUSE_WORKERS=0 workers="
#     splice:  MODES="pread=TSMOUNT_FUSE_SPLICE=0 splice= ceiling"
#     uring:   MODES="workers= uring=TSMOUNT_FUSE_URING=1 uring-nospin=TSMOUNT_FUSE_URING=1,TSMOUNT_FUSE_SPIN_US=0"
# TESTS (default "seq-qcow2 seq-vmdk rand1 rand4"): dd bs=1M of the 1 GiB qcow2 and
#   vmdk, fio 4 KiB random reads (O_DIRECT) with 1 and 4 jobs on the qcow2; wrand1 and
#   wrand4 are the bench's row 4/4b: 128 MiB of random 4 KiB writes (psync) into the
#   allocated qcow2 (tsmount --rw) or its raw copy (cfile), then one fsync, counted in
#   the rate as the bench counts it (the ceiling and cfile serve them as direct I/O, as
#   tsmount serves a writable file; cfile's fsync is fdatasync of the file). whalf1 and
#   whalf4 write the same into a fresh copy of a qcow2 whose every other cluster is
#   allocated (a quarter of the writes allocate, the rest overwrite; cfile: the raw copy).
#   wnew-FMT (vdi, vmdk, qcow, qcow2...) writes the same into a new empty 1 GiB image
#   of format FMT (qemu-img create defaults): every block's first write allocates it.
#   wfull-FMT writes the same into a copy of the allocated image converted to FMT: every
#   write an overwrite (the FUSE workers' in place, where the format lets them).
# A mode with TSMOUNT_FUSE_URING=1 needs fuse.enable_uring=Y: the script sets it (root)
# and puts the old value back at the end.
set -euo pipefail
ROUNDS=${1:-3}
W=${2:-/tmp/tsmount-ab}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
TSMOUNT="node $HERE/dist/mount-helpers/tsmount.js"
read -r -a MODE_LIST <<< "${MODES:-one=TSMOUNT_FUSE_WORKERS=0 workers=}"
read -r -a TEST_LIST <<< "${TESTS:-seq-qcow2 seq-vmdk rand1 rand4}"
SIZE=$((1 << 30))

if [[ " ${MODES:-} " == *TSMOUNT_FUSE_URING=1* ]]; then
  PARAM=/sys/module/fuse/parameters/enable_uring
  OLD=$(cat $PARAM)
  trap 'echo "$OLD" > $PARAM' EXIT
  echo Y > $PARAM
fi
mkdir -p "$W/mp"
if [ ! -f "$W/full.qcow2" ]; then
  head -c 1G /dev/urandom > "$W/src.raw"
  qemu-img convert -O qcow2 "$W/src.raw" "$W/full.qcow2"
  qemu-img convert -O vmdk -o subformat=monolithicSparse "$W/src.raw" "$W/full.vmdk"
  rm -f "$W/src.raw"
fi
if [[ " ${MODES:-} " == *" cfile "* ]]; then
  [ -f "$W/full.raw" ] || qemu-img convert -O raw "$W/full.qcow2" "$W/full.raw"
  cat "$W/full.raw" > /dev/null
fi
if [[ " ${TESTS:-} " == *" whalf"* ]] && [ ! -f "$W/half.qcow2" ]; then
  # Every other 64 KiB cluster random, the rest zeros (left unallocated by the convert).
  node -e 'const fs=require("fs"),c=require("crypto");const fd=fs.openSync(process.argv[1],"w");const z=Buffer.alloc(65536);
    for(let i=0;i<16384;i++)fs.writeSync(fd,i%2?z:c.randomBytes(65536));fs.closeSync(fd)' "$W/half.raw"
  qemu-img convert -O qcow2 "$W/half.raw" "$W/half.qcow2"
  rm -f "$W/half.raw"
fi
cat "$W/full.qcow2" "$W/full.vmdk" > /dev/null

pid_of() { $TSMOUNT --list --output json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const m=JSON.parse(s).find(x=>x.mountpoint===process.argv[1]);console.log(m?m.pid:0)})' "$1"; }
counters_of() { $TSMOUNT --list --output json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const m=JSON.parse(s).find(x=>x.mountpoint===process.argv[1]);const c=(m&&m.counters)||{};console.log(`reads=${c.reads} worker=${c.workerReads??0} spliced=${c.splicedReads??0} wwrites=${c.workerWrites??0} handed=${c.handedOver??0} spin=${c.spinTakes??0}`)})' "$1"; }
cpu_of() { awk '{print $14+$15}' "/proc/$1/stat"; }
main_of() { awk '{print $14+$15}' "/proc/$1/task/$1/stat"; }
bdi_of() { awk -v mp="$1" '$5 == mp { print $3 }' /proc/self/mountinfo | tail -1; }

dd_read() { dd if="$1" of=/dev/null bs=1M 2>&1 | sed -n 's/.*copied, \([0-9.]*\) s, \(.*\)/\2/p' | tr -d ' '; }
fio_rand() { # jobs file
  fio --name=ab --filename="$2" --rw=randread --bs=4k --ioengine=psync --direct=1 --numjobs="$1" --size=1G \
    --group_reporting --time_based --runtime=5 --output-format=json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s.slice(s.indexOf("{")));console.log(Math.round(j.jobs[0].read.iops)+"iops")})'
}

fio_wrand() { # jobs file
  local t0 t1 out
  t0=$(date +%s.%N)
  out=$(fio --name=ab --filename="$2" --rw=randwrite --bs=4k --ioengine=psync --numjobs="$1" --size=1G \
    --io_size=$((128 / $1))M --end_fsync=1 --fallocate=none --group_reporting --output-format=json)
  t1=$(date +%s.%N)
  node -e 'const s=process.argv[1];const j=JSON.parse(s.slice(s.indexOf("{")));console.log(Math.round(j.jobs[0].write.io_bytes/4096/Number(process.argv[2]))+"iops")' "$out" "$(echo "$t1-$t0" | bc -l)"
}

measure() { # test mode
  local test=$1 name=${2%%=*} settings= img=$W/full.qcow2 flat pid cpid= work
  [[ $2 == *=* ]] && settings=${2#*=}
  [ "$test" = seq-vmdk ] && img=$W/full.vmdk
  if [[ $test == whalf* ]]; then
    cp "$W/half.qcow2" "$W/half-run.qcow2"
    img=$W/half-run.qcow2
  fi
  if [[ $test == wfull-* ]]; then
    local fmt=${test#wfull-}
    [ -f "$W/full.$fmt" ] || qemu-img convert -O "$fmt" "$W/full.qcow2" "$W/full.$fmt"
    img=$W/full-run.$fmt
    cp "$W/full.$fmt" "$img"
  fi
  if [[ $test == wnew-* ]]; then
    img=$W/new-run.${test#wnew-}
    rm -f "$img"
    qemu-img create -q -f "${test#wnew-}" "$img" "$SIZE"
  fi
  local -a rw=() direct=()
  case $test in
    seq-*) work=dd_read ;;
    rand1) work="fio_rand 1" ;;
    rand4) work="fio_rand 4" ;;
    wrand1 | wrand4) work="fio_wrand ${test#wrand}"; rw=(--rw); direct=(--direct) ;;
    whalf1 | whalf4) work="fio_wrand ${test#whalf}"; rw=(--rw); direct=(--direct) ;;
    wnew-* | wfull-*) work="fio_wrand 1"; rw=(--rw); direct=(--direct) ;;
    *) echo "unknown test $test" >&2; exit 2 ;;
  esac
  if [ "$name" = ceiling ] || [ "$name" = cfile ]; then
    local ceiling=${CEILING:-$(ls -t /tmp/tsmount-ceiling-* 2>/dev/null | grep -v '\.' | head -1)}
    local -a cargs=()
    [ "$name" = cfile ] && cargs=(--file "$W/full.raw")
    cargs+=("${direct[@]}")
    : > "$W/cfile"
    "$ceiling" "$SIZE" "$W/cfile" "${cargs[@]}" >/dev/null 2>&1 & cpid=$!
    for _ in $(seq 100); do grep -q " $W/cfile " /proc/mounts && break; sleep 0.05; done
    echo 1024 > "/sys/class/bdi/$(bdi_of "$W/cfile")/read_ahead_kb"
    flat=$W/cfile; pid=$cpid
  else
    local -a envs=()
    [ -n "$settings" ] && IFS=, read -r -a envs <<< "$settings"
    env "${envs[@]}" $TSMOUNT "${rw[@]}" "$img" "$W/mp" >/dev/null
    flat="$W/mp/$(basename "${img%.*}").raw"; pid=$(pid_of "$W/mp")
    # The workers (or queues) start within a second or two; a first pass fills the read map.
    sleep 2
    dd if="$flat" of=/dev/null bs=1M iflag=direct status=none
  fi
  local c0 m0 t0 out c1 m1 t1 extra=
  c0=$(cpu_of "$pid"); m0=$(main_of "$pid"); t0=$(date +%s.%N)
  out=$($work "$flat" || echo failed)
  c1=$(cpu_of "$pid"); m1=$(main_of "$pid"); t1=$(date +%s.%N)
  if [ -n "$cpid" ]; then
    kill "$cpid"; wait "$cpid" 2>/dev/null || true; umount -l "$W/cfile" 2>/dev/null || true
  else
    sleep 1.1
    extra=$(counters_of "$W/mp")
    $TSMOUNT -u "$W/mp" >/dev/null
  fi
  printf '%s mode=%s %s main_cpu=%.2fs other_cpu=%.2fs cores=%.2f %s\n' "$test" "$name" "$out" \
    "$(echo "($m1-$m0)/100" | bc -l)" "$(echo "($c1-$c0-$m1+$m0)/100" | bc -l)" "$(echo "($c1-$c0)/100/($t1-$t0)" | bc -l)" "$extra"
}

N=${#MODE_LIST[@]}
for r in $(seq 1 "$ROUNDS"); do
  modes=()
  for i in $(seq 0 $((N - 1))); do modes+=("${MODE_LIST[$(((i + r - 1) % N))]}"); done
  echo "# round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
  for t in "${TEST_LIST[@]}"; do
    for m in "${modes[@]}"; do
      # The ceiling serves memory: one file is enough, vmdk adds nothing.
      case ${m%%=*} in ceiling | cfile) [ "$t" = seq-vmdk ] && continue ;; esac
      measure "$t" "$m"
    done
  done
done
