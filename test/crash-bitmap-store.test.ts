// SIGKILL of the server while it stores persistent dirty bitmaps at unmount
// (drivers/format/qcow2/bitmap.ts, BitmapTracker.store). The store writes the bitmaps'
// clusters, their tables, the directory and the header, with flushes between; a kill
// between any two of those writes must leave an image that qemu-img checks clean (leaked
// clusters allowed), with every written byte there, and each bitmap either consistent
// with exactly the bits QEMU would have set, or marked in use (QEMU then calls it
// inconsistent, as after any crash): never consistent with wrong bits.
//
// The store takes milliseconds; strace slows the server's pwrite64 and fdatasync calls
// (delay injection) once the writes are done, so that kills at random moments after the
// unmount land before, inside and after it. CI runs ROUNDS kills (TSMOUNT_SOAK=1: 100).
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, qemuImg, qemuIo, run, tempDir } from './helpers/qemu.js';
import { bitmapInfo, dirtyRuns } from './helpers/bitmaps.js';
import { isAlive, mountedPid, MountTracker, waitFor } from './helpers/mount.js';
import { rng } from './helpers/crash-writer.js';

const KiB = 1024;
const GiB = 1024 * 1024 * KiB;
const SOAK = process.env.TSMOUNT_SOAK === '1';
const ROUNDS = Number(process.env.TSMOUNT_BITMAP_KILLS ?? (SOAK ? 100 : 12));
const BITMAPS = [
  { name: 'fine', args: ['-g', '512'] },
  { name: 'coarse', args: [] },
  { name: 'off', args: ['-g', '4k', '--disable'] },
];

describe('crash: SIGKILL while the bitmaps are stored at unmount', function () {
  this.timeout(SOAK ? 3_600_000 : 300_000);
  const mounts = new MountTracker();
  let tmp: ReturnType<typeof tempDir>;
  const seed = Number(process.env.TSMOUNT_CRASH_SEED ?? Date.now() % 1_000_000);
  before(() => (tmp = tempDir('bitmap-store')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  it(`${ROUNDS} kills: a clean check, every byte there, each bitmap right or marked in use`, async function () {
    const rnd = rng(seed);
    // A 16 GiB disk: the fine bitmap is 4 MiB, 64 clusters, so storing it takes many writes.
    const template = path.join(tmp.dir, 'template.qcow2');
    await qemuImg('create', '-q', '-f', 'qcow2', template, String(16 * GiB));
    for (const b of BITMAPS) await qemuImg('bitmap', '--add', ...b.args, template, b.name);
    const outcomes = { stored: 0, inUse: 0, mixed: 0, leaky: 0, storedGrown: 0 };

    for (let round = 0; round < ROUNDS; round++) {
      const what = `seed ${seed}, round ${round}`;
      const ours = path.join(tmp.dir, `ours-${round}.qcow2`);
      const theirs = path.join(tmp.dir, `theirs-${round}.qcow2`);
      fs.copyFileSync(template, ours);
      fs.copyFileSync(template, theirs);
      const writes = Array.from({ length: 120 }, () => ({ offset: rnd(16 * GiB / (4 * KiB)) * 4 * KiB, length: (1 + rnd(16)) * 4 * KiB }));
      await qemuIo(theirs, 'qcow2', writes.map((w, i) => `write -P ${(i % 250) + 1} ${w.offset} ${w.length}`));
      // Odd rounds also grow the disk: the bitmaps' tables grow, so the store moves them and
      // writes a new directory behind a header write; even rounds keep the tables in place
      // and only the directory's flags change.
      const grow = round % 2 === 1;
      if (grow) await qemuImg('resize', '-q', '-f', 'qcow2', theirs, String(20 * GiB));

      const dir = path.join(tmp.dir, `mnt-${round}`);
      fs.mkdirSync(dir);
      await mounts.mount(['--rw', '--growable', ours, dir]);
      const pid = mountedPid(dir)!;
      const fd = fs.openSync(path.join(dir, `ours-${round}.raw`), 'r+');
      try {
        writes.forEach((w, i) => fs.writeSync(fd, Buffer.alloc(w.length, (i % 250) + 1), 0, w.length, w.offset));
        if (grow) fs.ftruncateSync(fd, 20 * GiB);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }

      // Slow the server's writes and flushes from here on, then unmount and kill it at a random moment.
      const tracer = spawn('strace', ['-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64,fdatasync', '-e', 'inject=pwrite64:delay_enter=4000', '-e', 'inject=fdatasync:delay_enter=15000', '-p', String(pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
      mounts.trackChild(tracer);
      await waitFor(() => fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/^TracerPid:\s+(\d+)/m)?.[1] !== '0', 10_000, `strace to attach (${what})`);
      await run('umount', [dir]);
      await new Promise((r) => setTimeout(r, rnd(700)));
      if (isAlive(pid)) process.kill(pid, 'SIGKILL');
      await waitFor(() => !isAlive(pid), 10_000, `server ${pid} to die (${what})`);
      tracer.kill('SIGKILL');

      const c = await checkImage(ours, 'qcow2');
      expect([0, 3], `${what}: ${c.output}`).to.include(c.code);
      expect(c.corruptions, `${what}: ${c.output}`).to.equal(0);
      expect(c.checkErrors, `${what}: ${c.output}`).to.equal(0);
      if (c.leaks > 0) outcomes.leaky++;
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', theirs, ours]);
      expect(cmp.code, `${what}: ${cmp.stdout}${cmp.stderr}`).to.equal(0);

      const listed = await bitmapInfo(ours);
      expect(listed.map((b) => b.name).sort(), what).to.deep.equal(BITMAPS.map((b) => b.name).sort());
      let inUse = 0;
      for (const b of listed) {
        if (b.flags.includes('in-use')) {
          inUse++;
          continue;
        }
        // Consistent: exactly QEMU's bits, and the disabled bitmap still disabled.
        expect(b.flags.includes('auto'), `${what}: ${b.name} ${b.flags.join(',')}`).to.equal(b.name !== 'off');
        expect(await dirtyRuns(tmp.dir, ours, b.name), `${what}: bits of ${b.name}`).to.deep.equal(await dirtyRuns(tmp.dir, theirs, b.name));
      }
      if (inUse === 0) outcomes[grow ? 'storedGrown' : 'stored']++;
      else if (inUse === listed.length) outcomes.inUse++;
      else outcomes.mixed++;
      fs.rmSync(ours);
      fs.rmSync(theirs);
    }
    if (SOAK || process.env.TSMOUNT_CRASH_VERBOSE) console.log(`      seed ${seed}: ${JSON.stringify(outcomes)}`);
  });
});
