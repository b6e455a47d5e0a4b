// A loop device over the flat file, with a real file system on it, written under
// memory pressure (issue 20): the page cache of the copy is squeezed by a memory
// cgroup that also holds the tsmount server, so write-back through the loop device
// into the server happens while the server itself is short of memory, the case that
// can deadlock a FUSE server (nbdfuse's manual warns of it; the server sets
// PR_SET_IO_FLUSHER where it may, see drivers/util/sys.ts). Then the file system is
// unmounted, `e2fsck -fn` judges what `qemu-img convert` makes of the image, and
// every file is compared with its source.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { convertToRaw, createImage, run, runOk, tempDir } from './helpers/qemu.js';
import { mountedPid, MountTracker } from './helpers/mount.js';
import { attachLoop, canLoopMount, detachLoop, memoryCgroup, type MemoryCgroup } from './helpers/host-fs.js';

const MiB = 1 << 20;
const SOAK = process.env.TSMOUNT_SOAK === '1';
/** Bytes of files copied in: several times what the cgroup lets the copy keep cached. */
const TREE = (SOAK ? 200 : 48) * MiB;

/** A tree of files of random sizes and contents, some in nested folders. */
function makeTree(dir: string, total: number): number {
  let made = 0;
  let n = 0;
  while (made < total) {
    const sub = path.join(dir, `d${n % 7}`, `e${n % 3}`);
    fs.mkdirSync(sub, { recursive: true });
    const size = n % 10 === 0 ? 4 * MiB + (n % 5) * 4099 : 1 + ((n * 7919 * 13) % (512 * 1024));
    fs.writeFileSync(path.join(sub, `f${n}.bin`), crypto.randomBytes(size));
    made += size;
    n++;
  }
  return n;
}

/** PF_MEMALLOC_NOIO in a task's flags: PR_SET_IO_FLUSHER took effect there. */
function flusherFlag(statFile: string): boolean {
  const flags = Number(fs.readFileSync(statFile, 'utf8').split(') ')[1]!.split(' ')[6]);
  return (flags & 0x80000) !== 0;
}

/** PR_SET_IO_FLUSHER took effect in the server's main thread. */
function isIoFlusher(pid: number): boolean {
  return flusherFlag(`/proc/${pid}/stat`);
}

/** How many of the server's threads have it (the main thread, libuv's pool, the FUSE workers). */
function flusherThreads(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/task`).filter((t) => flusherFlag(`/proc/${pid}/task/${t}/stat`)).length;
}

describe('a loop device over a --rw mount, written under memory pressure', function () {
  this.timeout(SOAK ? 1_800_000 : 300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let src: string;
  let files = 0;
  const undo: (() => void)[] = [];
  /** Times the cgroup's limit was hit, per format (for the README's figures). */
  const pressure: number[] = [];

  before(function () {
    if (!canLoopMount()) this.skip();
    tmp = tempDir('loop');
    src = path.join(tmp.dir, 'src');
    files = makeTree(src, TREE);
  });
  afterEach(async () => {
    // Innermost first: the file system on the loop device, the loop device, the cgroup, the mount.
    for (const f of undo.splice(0).reverse()) f();
    await mounts.cleanup();
  });
  after(() => {
    tmp?.cleanup();
    if (pressure.length && (SOAK || process.env.TSMOUNT_CRASH_VERBOSE)) console.log(`      memory limit hit ${pressure.join(', ')} times`);
  });

  for (const format of ['qcow2', 'vmdk', 'vhdx']) {
    it(`${format}: mkfs.ext4 on a loop device, ${TREE / MiB} MiB copied in within a 32 MiB memory cgroup, e2fsck clean, every file the same`, async function () {
      const img = path.join(tmp.dir, `disk.${format}`);
      await createImage(img, format, 256 * MiB);
      const mp = path.join(tmp.dir, `mnt-${format}`);
      fs.mkdirSync(mp);
      await mounts.mount(['--rw', img, mp]);
      const pid = mountedPid(mp)!;
      const dev = await attachLoop(path.join(mp, 'disk.raw'));
      undo.push(() => detachLoop(dev));
      await runOk('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', dev]);
      const fsdir = path.join(tmp.dir, `fs-${format}`);
      fs.mkdirSync(fsdir);
      await runOk('mount', [dev, fsdir]);
      undo.push(() => void run('umount', ['-l', fsdir]));

      // The copy runs in a small cgroup, and so does the server where it is an I/O
      // flusher. Without PR_SET_IO_FLUSHER (no CAP_SYS_RESOURCE, as on the machine this
      // was written on) a server in the cgroup DEADLOCKS: its own allocation waits in
      // reclaim for the write-back of a loop device page that only it can finish (seen:
      // main thread in folio_wait_writeback under try_charge_memcg). Moving a process in does not move what
      // it already uses (v1 and v2 alike): the limit is on what both allocate from now
      // on, the copy's page cache and the server's own, heap and buffers.
      const limit = 32 * MiB;
      const cg: MemoryCgroup | undefined = memoryCgroup(`tsmount-loop-${process.pid}-${format}`, limit);
      if (cg) {
        undo.push(() => cg.remove());
        if (isIoFlusher(pid)) {
          // The image's reads and writes run on libuv's pool (4 threads) and the FUSE
          // workers: they must have it too, not only the main thread (tsmount-server.cts).
          expect(flusherThreads(pid), 'threads marked I/O flusher: the main one and the pool at least').to.be.at.least(5);
          fs.writeFileSync(cg.procsFile, String(pid));
        }
        else console.log('      (the server is no I/O flusher here, no CAP_SYS_RESOURCE: only the copy is in the cgroup)');
      } else {
        console.log('      (no memory cgroup here: the copy runs without memory pressure)');
      }
      const dst = path.join(fsdir, 'tree');
      const argv = cg ? cg.argv(`cp -r ${src} ${dst} && sync -f ${dst}`) : ['sh', '-c', `cp -r ${src} ${dst} && sync -f ${dst}`];
      const copy = await run(argv[0]!, argv.slice(1), { timeoutMs: 1_200_000 });
      expect(copy.code, copy.stderr).to.equal(0);
      if (cg) {
        const oom = cg.oomKills();
        expect(oom, 'nothing in the cgroup was OOM-killed').to.equal(0);
        const hits = cg.limitHits();
        pressure.push(hits);
        expect(hits, 'the copy ran into the memory limit').to.be.above(0);
      }

      const umounted = await run('umount', [fsdir]);
      expect(umounted.code, umounted.stderr).to.equal(0);
      detachLoop(dev);
      cg?.remove();
      undo.splice(0);
      await mounts.unmount(mp);

      const raw = path.join(tmp.dir, `disk-${format}.raw`);
      await convertToRaw(img, raw, format);
      const fsck = await run('e2fsck', ['-fn', raw]);
      expect(fsck.code, fsck.stdout + fsck.stderr).to.equal(0);
      const back = path.join(tmp.dir, `back-${format}`);
      fs.mkdirSync(back);
      await runOk('mount', ['-o', 'loop,ro', raw, back]);
      try {
        const diff = await run('diff', ['-r', src, path.join(back, 'tree')]);
        expect(diff.code, `${files} files compared: ${diff.stdout}`).to.equal(0);
      } finally {
        await run('umount', [back]);
        fs.rmSync(raw);
      }
    });
  }
});
