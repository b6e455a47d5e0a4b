// What the threads that answer READs from a read map share (fs/fuse-worker.ts, the
// /dev/fuse workers, and fs/fuse-uring.ts, the io_uring queues): a READ's range as runs
// of host-file bytes or zeros, the bytes of one run read into a reply, and a WRITE
// written in place. Imports only the map's layout, so a worker loads nothing of the
// block graph.
import fs from 'node:fs';
import { countWritten, granuleOf, H_CHANGING, H_WRITABLE, H_WRITES_IN_FLIGHT, lookup } from './read-map-table.js';

/**
 * The runs of [offset, offset + size) in `table`, as triples (fd, host offset, length)
 * in `runs`: granules that continue each other (zeros, or one file contiguously) make
 * one run. Returns the number of words written, or -1 when a granule is not in the map
 * (the main thread answers then). `hit` is the caller's scratch triple for lookup().
 * `inPlace`: for a WRITE, every granule must be writable in place (else -1).
 */
export function readRuns(table: Int32Array, offset: number, size: number, hit: number[], runs: number[], inPlace = false): number {
  const end = offset + size;
  const granule = granuleOf(table);
  let count = 0;
  let runFd = 0;
  let runHost = 0;
  let runFrom = offset;
  let pos = offset;
  let first = true;
  while (pos < end) {
    const g = Math.floor(pos / granule);
    if (!lookup(table, g, hit) || (inPlace && hit[2] !== 1)) return -1;
    const fd = hit[0]!;
    const host = hit[1]! + (pos - g * granule);
    if (first) {
      first = false;
      runFd = fd;
      runHost = host;
    } else if (fd !== runFd || (fd >= 0 && host !== runHost + (pos - runFrom))) {
      runs[count++] = runFd;
      runs[count++] = runHost;
      runs[count++] = pos - runFrom;
      runFd = fd;
      runHost = host;
      runFrom = pos;
    }
    pos = Math.min(end, (g + 1) * granule);
  }
  runs[count++] = runFd;
  runs[count++] = runHost;
  runs[count++] = end - runFrom;
  return count;
}

/** `length` bytes at `at` in out: zeros (fd < 0) or the host file's bytes; false on a short read or an error. */
export function fillFromHost(fd: number, host: number, out: Buffer, at: number, length: number): boolean {
  if (fd < 0) {
    out.fill(0, at, at + length);
    return true;
  }
  let done = 0;
  try {
    while (done < length) {
      const n = fs.readSync(fd, out, at + done, length - done, host + done);
      if (n <= 0) return false;
      done += n;
    }
  } catch {
    return false;
  }
  return true;
}

/**
 * Whether the threads write in place at all: TSMOUNT_FUSE_WORKER_WRITES=0 hands every
 * WRITE to the main thread (for comparison: scripts/bench/ab.sh; the main thread then
 * keeps no map for writes either, fs/flatfs.ts). Read in each thread: a worker inherits
 * the server's environment.
 */
export const WORKER_WRITES = process.env.TSMOUNT_FUSE_WORKER_WRITES !== '0';

/**
 * A WRITE of [offset, offset + size), its bytes in `src` from `at`, straight into the
 * host files: only where every granule is published writable in place in the current
 * epoch, and only while the main thread changes nothing of the file (read-map-table.ts
 * says how the two sides keep out of each other's way). Counted, and the file marked
 * for the next flush, before the caller replies. False: the main thread writes it (all
 * of it again, if a host error stopped this halfway, and reports the error).
 */
export function writeInPlace(table: Int32Array, offset: number, size: number, src: Buffer, at: number, hit: number[], runs: number[]): boolean {
  if (!WORKER_WRITES) return false;
  Atomics.add(table, H_WRITES_IN_FLIGHT, 1);
  try {
    if (Atomics.load(table, H_CHANGING) !== 0 || Atomics.load(table, H_WRITABLE) !== 1) return false;
    const count = readRuns(table, offset, size, hit, runs, true);
    if (count < 0) return false;
    for (let i = 0; i < count; i += 3) {
      if (!writeToHost(runs[i]!, runs[i + 1]!, src, at, runs[i + 2]!)) return false;
      at += runs[i + 2]!;
    }
    countWritten(table, size);
    return true;
  } finally {
    Atomics.sub(table, H_WRITES_IN_FLIGHT, 1);
  }
}

/** `length` bytes from `src` at `at` written to `host` in `fd`; false on a short write or an error. */
function writeToHost(fd: number, host: number, src: Buffer, at: number, length: number): boolean {
  let done = 0;
  try {
    while (done < length) {
      const n = fs.writeSync(fd, src, at + done, length - done, host + done);
      if (n <= 0) return false;
      done += n;
    }
  } catch {
    return false;
  }
  return true;
}
