// Crash safety (qcow2 issue): the server is SIGKILLed in the middle of heavy random
// writes, many times over, with and without lazy_refcounts. After each kill
// `qemu-img check` finds at most leaked clusters (a lazy_refcounts image after the
// repair its next writable open makes, as QEMU's does), and every write an fsync
// acknowledged before the kill reads back. TSMOUNT_SOAK=1 runs many more rounds.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkImage, convertToRaw, createImage, run, tempDir } from './helpers/qemu.js';
import { isAlive, mountedPid, MountTracker, waitFor } from './helpers/mount.js';
import { firstLostByte, readJournal } from './helpers/crash-writer.js';

const MiB = 1 << 20;
const DISK = 32 * MiB;
const SOAK = process.env.TSMOUNT_SOAK === '1';
const ROUNDS = SOAK ? 25 : 3;
const WRITER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'helpers', 'crash-writer.js');

describe('tsmount --rw: writes acknowledged by fsync survive a kill of the server', function () {
  this.timeout(SOAK ? 3_600_000 : 120_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  const seed = Number(process.env.TSMOUNT_CRASH_SEED ?? Date.now() % 1_000_000);
  before(() => (tmp = tempDir('crashfsync')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  for (const lazy of [false, true]) {
    it(`a qcow2 ${lazy ? 'with' : 'without'} lazy_refcounts, killed ${ROUNDS} times during random writes`, async () => {
      const img = path.join(tmp.dir, `img-${lazy}.qcow2`);
      await createImage(img, 'qcow2', DISK, { compat: '1.1', lazy_refcounts: lazy ? 'on' : 'off' });
      const dir = path.join(tmp.dir, `mnt-${lazy}`);
      fs.mkdirSync(dir);
      const flat = path.join(dir, path.basename(img).replace(/\.qcow2$/, '.raw'));
      const raw = path.join(tmp.dir, 'now.raw');
      let model = Buffer.alloc(DISK);
      let acknowledged = 0;

      for (let round = 0; round < ROUNDS; round++) {
        const what = `seed ${seed}, lazy=${lazy}, round ${round}`;
        const journal = path.join(tmp.dir, `journal-${lazy}-${round}`);
        await mounts.mount(['--rw', img, dir]);
        const pid = mountedPid(dir)!;
        const writer = spawn(process.execPath, [WRITER, flat, journal, String(seed + round * 101 + (lazy ? 7 : 0)), String(DISK)], { stdio: 'ignore' });
        mounts.trackChild(writer);
        // The first round kills only after an fsync was acknowledged, so every run checks
        // durable writes even when a loaded machine starts node slowly; later rounds
        // also kill during the writer's first writes.
        if (round === 0) await waitFor(() => fs.existsSync(journal) && readJournal(journal).durable.length > 0, 60_000, `the first acknowledged fsync (${what})`);
        await new Promise((r) => setTimeout(r, 300 + ((seed + round * 37) % 700)));
        process.kill(pid, 'SIGKILL');
        await waitFor(() => !isAlive(pid), 10_000, `server ${pid} to die (${what})`);
        await run('umount', ['-l', dir]);
        await waitFor(() => writer.exitCode !== null || writer.signalCode !== null, 10_000, `the writer to stop (${what})`).catch(() => writer.kill('SIGKILL'));

        if (lazy) {
          // The dirty bit is set: the next writable open rebuilds the refcounts.
          await mounts.mount(['--rw', img, dir]);
          await mounts.unmount(dir);
        }
        const c = await checkImage(img, 'qcow2');
        expect(c.corruptions, `${what}: ${c.output}`).to.equal(0);
        expect([0, 3], `${what}: ${c.output}`).to.include(c.code);

        const j = readJournal(journal);
        acknowledged += j.durable.length;
        await convertToRaw(img, raw, 'qcow2');
        const now = fs.readFileSync(raw);
        const k = firstLostByte(model, now, j);
        if (k >= 0) expect.fail(`${what}: byte ${k} differs from what fsync acknowledged`);
        model = now;
      }
      expect(acknowledged, 'some writes were acknowledged before the kills').to.be.above(0);
    });
  }
});
