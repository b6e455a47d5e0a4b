// A writer for the kill tests, run as its own process: random writes into a flat file
// with an fsync every few, and a journal (on a normal file system) that says which
// writes were started and which an fsync acknowledged. The journal survives the
// kill, so the test knows exactly which bytes must have reached the image. With
// `punch`, some of the writes are holes punched (fallocate PUNCH_HOLE: zeros, the
// space given back), mostly of whole 64 KiB clusters.
//   node crash-writer.js FLAT JOURNAL SEED DISK_BYTES [punch]
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate } from '../../drivers/util/sys.js';

/** The bytes of write number i: recomputable by the test from i alone. */
export function blockFor(i: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let k = 0; k < length; k += 4) b.writeUInt32LE((i * 2654435761 + k) >>> 0, k);
  return b;
}

export /** xorshift32: the same seed, the same writes and kill moments. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

export interface Journal {
  /** Writes an fsync acknowledged, in order (`punch`: a hole, zeros). */
  durable: { i: number; offset: number; length: number; punch?: boolean }[];
  /** Ranges written after the last acknowledged fsync: their bytes may be old or new. */
  uncertain: [number, number][];
}

/** What a writer's journal says: the writes an fsync acknowledged, and the ranges left uncertain. */
export function readJournal(file: string): Journal {
  const writes: { i: number; offset: number; length: number; punch?: boolean }[] = [];
  let synced = -1;
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const f = line.split(' ');
    if (f[0] === 'W' && f.length === 4) writes.push({ i: Number(f[1]), offset: Number(f[2]), length: Number(f[3]) });
    if (f[0] === 'P' && f.length === 4) writes.push({ i: Number(f[1]), offset: Number(f[2]), length: Number(f[3]), punch: true });
    if (f[0] === 'S' && f.length === 2) synced = Math.max(synced, Number(f[1]));
  }
  return {
    durable: writes.filter((w) => w.i <= synced),
    uncertain: writes.filter((w) => w.i > synced).map((w) => [w.offset, w.offset + w.length]),
  };
}

/**
 * Check `now` (the disk as QEMU reads it after a kill) against `model` (the disk before
 * the writer ran) and the journal: every acknowledged write is there, bytes no write
 * touched are unchanged. Returns the first differing byte, or -1.
 */
export function firstLostByte(model: Buffer, now: Buffer, j: Journal): number {
  const sure = Buffer.from(model);
  for (const w of j.durable) {
    if (w.punch) sure.fill(0, w.offset, w.offset + w.length);
    else blockFor(w.i, w.length).copy(sure, w.offset);
  }
  // Bytes an unacknowledged write may have touched are whatever the image says.
  for (const [a, b] of j.uncertain) now.copy(sure, a, a, b);
  if (sure.length !== now.length) return Math.min(sure.length, now.length);
  if (sure.equals(now)) return -1;
  let k = 0;
  while (sure[k] === now[k]) k++;
  return k;
}

function main(flat: string, journal: string, seed: number, disk: number, punch: boolean): void {
  let x = seed >>> 0 || 1;
  const rnd = (n: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  // The journal first: on a loaded machine the kill can come before this process has
  // even opened the flat file, and an empty journal then says that nothing was written.
  const log = fs.openSync(journal, 'a');
  let fd: number;
  try {
    fd = fs.openSync(flat, 'r+');
  } catch {
    process.exit(0);
  }
  const CLUSTER = 64 * 1024;
  for (let i = 0; ; i++) {
    const hole = punch && rnd(4) === 0;
    // A hole: mostly whole clusters (freed and given back), sometimes any sectors.
    const whole = hole && rnd(4) !== 0;
    const unit = whole ? CLUSTER : 512;
    const length = unit * (1 + rnd(whole ? 8 : 128));
    const offset = unit * rnd(Math.floor((disk - length) / unit));
    // Intent first: a write that may have landed only partly is known to the test.
    fs.writeSync(log, `${hole ? 'P' : 'W'} ${i} ${offset} ${length}\n`);
    try {
      if (hole) fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
      else fs.writeSync(fd, blockFor(i, length), 0, length, offset);
      if (i % 8 === 7) {
        fs.fsyncSync(fd);
        fs.writeSync(log, `S ${i}\n`);
      }
    } catch {
      // The mount died: the test has what it needs.
      process.exit(0);
    }
  }
}

// Run only as a program, never when a test imports blockFor.
if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [flat, journal, seed, disk, mode] = process.argv.slice(2);
  main(flat!, journal!, Number(seed), Number(disk), mode === 'punch');
}
