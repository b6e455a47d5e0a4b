// A writer for the kill tests, run as its own process: random writes into a flat file
// with an fsync every few, and a journal (on a normal file system) that says which
// writes were started and which an fsync acknowledged. The journal survives the
// kill, so the test knows exactly which bytes must have reached the image.
//   node crash-writer.js FLAT JOURNAL SEED DISK_BYTES
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';

/** The bytes of write number i: recomputable by the test from i alone. */
export function blockFor(i: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let k = 0; k < length; k += 4) b.writeUInt32LE((i * 2654435761 + k) >>> 0, k);
  return b;
}

function main(flat: string, journal: string, seed: number, disk: number): void {
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
  for (let i = 0; ; i++) {
    const length = 512 * (1 + rnd(128));
    const offset = 512 * rnd((disk - length) / 512);
    // Intent first: a write that may have landed only partly is known to the test.
    fs.writeSync(log, `W ${i} ${offset} ${length}\n`);
    try {
      fs.writeSync(fd, blockFor(i, length), 0, length, offset);
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
  const [flat, journal, seed, disk] = process.argv.slice(2);
  main(flat!, journal!, Number(seed), Number(disk));
}
