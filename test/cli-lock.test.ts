// The lock matrix of issue 3 ("Locking") at the command line: tsmount against
// qemu-img, qemu-io, qemu-storage-daemon and itself, seen through their exit status
// and /proc/locks. The byte table is in drivers/protocol/lock.ts.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, holdWithQemuIo, lockBytes, md5File, qemuIo, rawMd5, run, startStorageDaemon, tempDir, type QemuHolder } from './helpers/qemu.js';
import { mountedPid, MountTracker, tsmount } from './helpers/mount.js';

const MiB = 1 << 20;
/** QEMU's words for a conflict, ours too: `Failed to get "write" lock`, `... shared "write" lock`. */
const LOCK_ERROR = /Failed to get (shared )?"(consistent read|write|write unchanged|resize)" lock/;

describe('tsmount: locking against QEMU and itself', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let holders: QemuHolder[] = [];
  let n = 0;

  before(() => (tmp = tempDir('cli-lock')));
  afterEach(async () => {
    await mounts.cleanup();
    for (const h of holders.reverse()) await h.stop();
    holders = [];
  });
  after(() => tmp.cleanup());

  const at = (name: string): string => path.join(tmp.dir, name);
  const mp = (): string => {
    const p = at(`mnt${++n}`);
    fs.mkdirSync(p);
    mounts.track(p);
    return p;
  };

  /** A fresh image with some data in it; qcow2 ones optionally over a qcow2 backing file. */
  async function image(format: 'raw' | 'qcow2', withBacking = false): Promise<{ file: string; backing: string; flat: string }> {
    const id = ++n;
    const file = at(`img${id}.${format}`);
    const backing = at(`base${id}.qcow2`);
    if (withBacking) {
      await createImage(backing, 'qcow2', 16 * MiB);
      await qemuIo(backing, 'qcow2', ['write -P 0x33 0 1M']);
      await createImage(file, 'qcow2', 16 * MiB, {}, { file: path.basename(backing), format: 'qcow2' });
    } else {
      await createImage(file, format, 16 * MiB);
    }
    await qemuIo(file, format, ['write -P 0x44 4M 64k']);
    return { file, backing, flat: `img${id}.raw` };
  }

  /** tsmount must fail at once with one line that names the image and the lock, and leave nothing mounted. */
  async function expectLockedOut(args: string[], image: string): Promise<void> {
    const target = args[args.length - 1]!;
    const r = await tsmount(args, { timeoutMs: 30_000 });
    expect(r.code, `tsmount ${args.join(' ')} should fail`).to.not.equal(0);
    const line = r.stderr.replace(/\n$/, '');
    expect(line.split('\n'), r.stderr).to.have.length(1);
    expect(line).to.match(/^tsmount: /);
    expect(line).to.include(path.basename(image));
    expect(line).to.match(LOCK_ERROR);
    expect(mountedPid(target)).to.equal(undefined);
  }

  async function qemuIoWrite(file: string, format: string): Promise<{ code: number; output: string }> {
    const r = await run('qemu-io', ['-f', format, '-c', 'write -P 0x5a 0 4k', file], { cwd: tmp.dir });
    return { code: r.code, output: r.stdout + r.stderr };
  }

  it('while tsmount --rw holds a qcow2 image, qemu-img info fails and qemu-img info -U works', async () => {
    const img = await image('qcow2');
    const dir = mp();
    await mounts.mount(['--rw', img.file, dir]);
    const info = await run('qemu-img', ['info', img.file]);
    expect(info.code).to.not.equal(0);
    expect(info.stderr).to.match(/Failed to get shared "write" lock/);
    const infoU = await run('qemu-img', ['info', '-U', img.file]);
    expect(infoU.code, infoU.stderr).to.equal(0);
    expect(infoU.stdout).to.match(/file format: qcow2/);
    await mounts.unmount(dir);
    expect((await run('qemu-img', ['info', img.file])).code).to.equal(0);
  });

  describe('an image someone else writes', function () {
    it('while qemu-storage-daemon exports it writable: --rw and read-only fail naming the lock, --force-share mounts', async () => {
      const img = await image('qcow2');
      const exportFile = at('export.raw');
      fs.writeFileSync(exportFile, '');
      holders.push(
        await startStorageDaemon([`driver=file,node-name=f,filename=${img.file}`, 'driver=qcow2,node-name=q,file=f'], 'q', exportFile, { writable: true }),
      );
      // The daemon writes while we look.
      const w = await run('dd', ['if=/dev/zero', `of=${exportFile}`, 'bs=64k', 'count=1', 'seek=16', 'conv=notrunc,fsync', 'status=none']);
      expect(w.code, w.stderr).to.equal(0);
      const dir = mp();
      await expectLockedOut(['--rw', img.file, dir], img.file);
      await expectLockedOut([img.file, dir], img.file);
      for (const flag of ['--force-share', '-U']) {
        await mounts.mount([flag, img.file, dir]);
        const flat = path.join(dir, img.flat);
        expect(fs.statSync(flat).size).to.equal(16 * MiB);
        expect(await md5File(flat)).to.equal(await md5File(exportFile));
        await mounts.unmount(dir);
      }
    });

    it('while a second tsmount --rw holds it: --rw and read-only fail naming the lock, --force-share mounts', async () => {
      const img = await image('qcow2');
      const first = mp();
      await mounts.mount(['--rw', img.file, first]);
      const dir = mp();
      await expectLockedOut(['--rw', img.file, dir], img.file);
      await expectLockedOut([img.file, dir], img.file);
      await mounts.mount(['--force-share', img.file, dir]);
      expect(await md5File(path.join(dir, img.flat))).to.equal(await md5File(path.join(first, img.flat)));
      await mounts.unmount(dir);
      await mounts.unmount(first);
    });

    it('while qemu-io holds it read-write: --rw and read-only fail naming the lock, -U mounts', async () => {
      const img = await image('qcow2');
      holders.push(await holdWithQemuIo(img.file, ['-f', 'qcow2']));
      const dir = mp();
      await expectLockedOut(['--rw', img.file, dir], img.file);
      await expectLockedOut([img.file, dir], img.file);
      await mounts.mount(['-U', img.file, dir]);
      expect(await md5File(path.join(dir, img.flat))).to.equal(await rawMd5(img.file, 'qcow2'));
      await mounts.unmount(dir);
    });

    it('while a read-only tsmount holds it, --rw fails naming the lock', async () => {
      const img = await image('qcow2');
      const first = mp();
      await mounts.mount([img.file, first]);
      await expectLockedOut(['--rw', img.file, mp()], img.file);
      await mounts.unmount(first);
    });
  });

  it('two read-only tsmounts of one image work side by side', async () => {
    const img = await image('qcow2', true);
    const a = mp();
    const b = mp();
    await mounts.mount([img.file, a]);
    await mounts.mount([img.file, b]);
    const want = await rawMd5(img.file, 'qcow2');
    expect(await md5File(path.join(a, img.flat))).to.equal(want);
    expect(await md5File(path.join(b, img.flat))).to.equal(want);
    // Both hold consistent read and refuse write and resize; nobody holds write.
    expect(lockBytes(img.file)).to.deep.equal([100, 201, 203]);
    await mounts.unmount(a);
    await mounts.unmount(b);
  });

  for (const rw of [false, true]) {
    it(`a backing file is held for consistent read and refuses writers while its overlay is mounted${rw ? ' --rw' : ''}`, async () => {
      const img = await image('qcow2', true);
      const before = await md5File(img.backing);
      const dir = mp();
      await mounts.mount([...(rw ? ['--rw'] : []), img.file, dir]);
      expect(lockBytes(img.backing)).to.deep.equal([100, 201, 203]);
      const w = await qemuIoWrite(img.backing, 'qcow2');
      expect(w.code, w.output).to.not.equal(0);
      expect(w.output).to.match(/Failed to get "write" lock/);
      // Readers are welcome.
      expect((await run('qemu-img', ['info', img.backing])).code).to.equal(0);
      expect((await run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read 0 512', img.backing])).code).to.equal(0);
      await mounts.unmount(dir);
      expect(await md5File(img.backing)).to.equal(before);
      expect(lockBytes(img.backing)).to.deep.equal([]);
      expect((await qemuIoWrite(img.backing, 'qcow2')).code).to.equal(0);
    });
  }

  describe('--locking', function () {
    const cases: { mode: string; rw: boolean; bytes: number[] }[] = [
      { mode: 'off', rw: true, bytes: [] },
      { mode: 'off', rw: false, bytes: [] },
      { mode: 'on', rw: true, bytes: [100, 101, 103, 201, 203] },
      { mode: 'on', rw: false, bytes: [100, 201, 203] },
      { mode: 'auto', rw: true, bytes: [100, 101, 103, 201, 203] },
      { mode: 'auto', rw: false, bytes: [100, 201, 203] },
    ];
    for (const c of cases) {
      it(`--locking ${c.mode}${c.rw ? ' --rw' : ''} holds ${c.bytes.length ? c.bytes.join(' ') : 'no lock byte'} on the image and its backing file`, async () => {
        const img = await image('qcow2', true);
        const dir = mp();
        await mounts.mount([`--locking=${c.mode}`, ...(c.rw ? ['--rw'] : []), img.file, dir]);
        expect(lockBytes(img.file)).to.deep.equal(c.bytes);
        expect(lockBytes(img.backing)).to.deep.equal(c.mode === 'off' ? [] : [100, 201, 203]);
        if (c.mode === 'off') {
          // Nothing stops QEMU: locking=off is the user's promise that nobody else writes.
          expect((await run('qemu-img', ['info', img.file])).code).to.equal(0);
        } else {
          expect((await qemuIoWrite(img.file, 'qcow2')).code).to.not.equal(0);
        }
        await mounts.unmount(dir);
      });
    }

    it('--locking off ignores the locks of others', async () => {
      const img = await image('qcow2');
      const first = mp();
      await mounts.mount(['--rw', img.file, first]);
      const dir = mp();
      await mounts.mount(['--locking', 'off', img.file, dir]);
      await mounts.unmount(dir);
      await mounts.unmount(first);
    });

    it('rejects an unknown --locking mode', async () => {
      const img = await image('qcow2');
      const dir = mp();
      const r = await tsmount(['--locking', 'maybe', img.file, dir]);
      expect(r.code).to.not.equal(0);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.match(/maybe/);
      expect(mountedPid(dir)).to.equal(undefined);
    });
  });

  describe('--share-rw', function () {
    it('lets qemu-io write a raw image that tsmount --rw holds', async () => {
      const img = await image('raw');
      const dir = mp();
      await mounts.mount(['--rw', img.file, dir]);
      const refused = await qemuIoWrite(img.file, 'raw');
      expect(refused.code, refused.output).to.not.equal(0);
      expect(refused.output).to.match(/Failed to get "write" lock/);
      await mounts.unmount(dir);

      await mounts.mount(['--rw', '--share-rw', img.file, dir]);
      expect(lockBytes(img.file)).to.deep.equal([100, 101, 103]);
      const w = await qemuIoWrite(img.file, 'raw');
      expect(w.code, w.output).to.equal(0);
      expect(w.output).to.match(/wrote 4096\/4096 bytes/);
      const fd = fs.openSync(img.file, 'r');
      const got = Buffer.alloc(4096);
      fs.readSync(fd, got, 0, got.length, 0);
      fs.closeSync(fd);
      expect(got.equals(Buffer.alloc(4096, 0x5a))).to.equal(true);
      await mounts.unmount(dir);
    });

    it('lets a second tsmount --rw --share-rw into a raw image', async () => {
      const img = await image('raw');
      const a = mp();
      const b = mp();
      await mounts.mount(['--rw', '--share-rw', img.file, a]);
      await mounts.mount(['--rw', '--share-rw', img.file, b]);
      await mounts.unmount(b);
      await mounts.unmount(a);
    });

    it('does not let a second writer into a qcow2 image: its metadata is never shared', async () => {
      const img = await image('qcow2');
      const dir = mp();
      await mounts.mount(['--rw', '--share-rw', img.file, dir]);
      const w = await qemuIoWrite(img.file, 'qcow2');
      expect(w.code, w.output).to.not.equal(0);
      expect(w.output).to.match(/lock/);
      await mounts.unmount(dir);
    });
  });
});
