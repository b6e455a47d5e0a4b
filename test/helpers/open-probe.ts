// Run in a child process by the bounded-open tests: open one image read-only, read a
// few ranges, and print one JSON line with how long the open took, the process's
// peak resident memory (VmHWM) and what was read, or the error message.
//   node open-probe.js FILE [--rw] [--secret S] [OFFSET:LENGTH ...]
import fs from 'node:fs';
import crypto from 'node:crypto';
import { openImage } from '../../drivers/open.js';
import { messageOf } from '../../drivers/errors.js';

function peakKiB(): number {
  const m = /VmHWM:\s+(\d+)/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) : -1;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const file = args.shift()!;
  let secret: string | undefined;
  const rw = args[0] === '--rw';
  if (rw) args.shift();
  if (args[0] === '--secret') {
    args.shift();
    secret = args.shift();
  }
  const start = performance.now();
  try {
    const node = await openImage(file, { readOnly: !rw, cache: 'writeback', metadataCacheBytes: 1 << 20, locking: 'off', forceShare: false, shareRw: false, secret });
    const openMs = performance.now() - start;
    const reads: string[] = [];
    for (const a of args) {
      const [off, len] = a.split(':').map(Number) as [number, number];
      const buf = Buffer.alloc(len);
      await node.read(off, buf);
      reads.push(crypto.createHash('md5').update(buf).digest('hex'));
    }
    await node.close();
    process.stdout.write(`${JSON.stringify({ ok: true, openMs, peakKiB: peakKiB(), size: node.size, reads })}\n`);
  } catch (err) {
    process.stdout.write(`${JSON.stringify({ ok: false, openMs: performance.now() - start, peakKiB: peakKiB(), error: messageOf(err) })}\n`);
  }
}

await main();
