// Killing the server mid-write (issue 3, "The cluster cache"): whatever moment the
// tsmount process dies at, `qemu-img check` finds at worst leaked clusters, never a
// corruption. Writes come through the FUSE mount from dd, as a user's would.
// Short by default; TSMOUNT_SOAK=1 runs many more rounds. TSMOUNT_CRASH_SEED repeats a run.
import { expect } from 'chai';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, createImage, md5File, qemuIo, run, runOk, tempDir } from './helpers/qemu.js';
import { isAlive, mountedPid, MountTracker, waitFor } from './helpers/mount.js';
import { rng } from './helpers/crash-writer.js';

const MiB = 1 << 20;
const SOAK = process.env.TSMOUNT_SOAK === '1';
const ROUNDS = SOAK ? 30 : 3;
const DISK = 48 * MiB;


function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

describe('tsmount --rw: killing the server at any moment leaves no corruption', function () {
  this.timeout(SOAK ? 1_800_000 : 60_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  const seed = Number(process.env.TSMOUNT_CRASH_SEED ?? Date.now() % 1_000_000);

  before(() => (tmp = tempDir('crash')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  /**
   * Writers that keep dd busy on the flat file until stopped: unaligned sizes and
   * offsets, some with O_DSYNC or a final fdatasync so flushes happen mid-stream too.
   */
  function startWriters(flat: string, rnd: (n: number) => number, count: number): { stop: () => Promise<void>; wrote: () => number } {
    let stopping = false;
    let runs = 0;
    const loops: Promise<void>[] = [];
    for (let w = 0; w < count; w++) {
      loops.push(
        (async () => {
          while (!stopping) {
            const bs = 512 + rnd(130_000);
            const n = Math.max(1, Math.floor((1 + rnd(4)) * MiB / bs));
            const seek = rnd(DISK - n * bs);
            // nocreat: once the mount is gone, dd must not make a file in the bare directory.
            const flags = ['oflag=seek_bytes' + (rnd(4) === 0 ? ',dsync' : ''), rnd(3) === 0 ? 'conv=notrunc,nocreat,fdatasync' : 'conv=notrunc,nocreat'];
            const dd = spawn('dd', ['if=/dev/urandom', `of=${flat}`, `bs=${bs}`, `count=${n}`, `seek=${seek}`, ...flags, 'status=none'], { stdio: 'ignore' });
            mounts.trackChild(dd);
            await exited(dd);
            runs++;
            // The mount is gone once the server dies: dd fails, and so would the next one.
            if (dd.exitCode !== 0) break;
          }
        })(),
      );
    }
    return {
      stop: () => {
        stopping = true;
        return Promise.all(loops).then(() => undefined);
      },
      wrote: () => runs,
    };
  }

  const geometries = [
    { clusterSize: 512, refcountBits: 1 },
    { clusterSize: 512, refcountBits: 16 },
    { clusterSize: 65536, refcountBits: 1 },
    { clusterSize: 65536, refcountBits: 16 },
  ];
  for (const [gi, g] of geometries.entries()) {
    it(`a qcow2 with ${g.clusterSize}-byte clusters and refcount_bits=${g.refcountBits} over a backing file, killed ${ROUNDS} times`, async () => {
      const rnd = rng(seed + gi * 7919);
      const base = path.join(tmp.dir, `base${gi}.qcow2`);
      const img = path.join(tmp.dir, `crash${gi}.qcow2`);
      await createImage(base, 'qcow2', DISK);
      await qemuIo(base, 'qcow2', ['write -P 0x33 0 24M']);
      await createImage(img, 'qcow2', DISK, { cluster_size: g.clusterSize, refcount_bits: g.refcountBits }, { file: path.basename(base), format: 'qcow2' });
      const baseMd5 = await md5File(base);
      const dir = path.join(tmp.dir, `mnt${gi}`);
      fs.mkdirSync(dir);
      const flat = path.join(dir, `crash${gi}.raw`);
      const modes = ['writeback', 'writethrough', 'writeback', 'none'];
      let leaky = 0;
      let ddRuns = 0;

      for (let round = 0; round < ROUNDS; round++) {
        const what = `seed ${seed}, ${path.basename(img)}, round ${round}`;
        await mounts.mount(['--rw', '--cache', modes[round % modes.length]!, img, dir]);
        const pid = mountedPid(dir);
        expect(pid, what).to.be.a('number').and.above(0);
        const writers = startWriters(flat, rnd, 1 + rnd(3));
        await new Promise((r) => setTimeout(r, 50 + rnd(SOAK ? 2000 : 900)));
        process.kill(pid!, 'SIGKILL');
        const stopped = writers.stop();
        await waitFor(() => !isAlive(pid!), 10_000, `server ${pid} to die (${what})`);
        // Every request on the dead mount fails now, so the writers end.
        await run('umount', ['-l', dir]);
        await stopped;
        expect(mountedPid(dir), what).to.equal(undefined);

        const c = await checkImage(img, 'qcow2');
        expect(c.corruptions, `${what}, after ${writers.wrote()} dd runs: ${c.output}`).to.equal(0);
        expect(c.checkErrors, `${what}: ${c.output}`).to.equal(0);
        expect([0, 3], `${what}: ${c.output}`).to.include(c.code);
        if (c.leaks > 0) leaky++;
        ddRuns += writers.wrote();
      }
      if (SOAK || process.env.TSMOUNT_CRASH_VERBOSE) {
        console.log(`      seed ${seed}: ${ROUNDS} kills, ${leaky} left leaked clusters, ${ddRuns} dd runs finished before a kill`);
      }

      // Still a working image: a clean mount writes, and qemu-img reads it back.
      await mounts.mount(['--rw', img, dir]);
      const data = Buffer.alloc(100_000, 0xc7);
      const src = path.join(tmp.dir, 'final.bin');
      fs.writeFileSync(src, data);
      await runOk('dd', [`if=${src}`, `of=${flat}`, 'bs=100000', `seek=${7 * MiB + 3}`, 'oflag=seek_bytes', 'conv=notrunc,fsync', 'status=none']);
      await mounts.unmount(dir);
      const c = await checkImage(img, 'qcow2');
      expect(c.corruptions, c.output).to.equal(0);
      const out = path.join(tmp.dir, 'final.raw');
      await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, out], { cwd: tmp.dir });
      const back = Buffer.alloc(data.length);
      const fd = fs.openSync(out, 'r');
      fs.readSync(fd, back, 0, back.length, 7 * MiB + 3);
      fs.closeSync(fd);
      fs.rmSync(out);
      expect(back.equals(data)).to.equal(true);
      expect(await md5File(base), 'the backing file is never written').to.equal(baseMd5);
    });
  }
});
