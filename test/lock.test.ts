// QEMU-compatible image locking, checked against QEMU's own tools (qemu-img, qemu-io,
// qemu-storage-daemon) and /proc/locks. See the byte table in drivers/protocol/lock.ts.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../drivers/open.js';
import { FileNode } from '../drivers/protocol/file.js';
import { LockedError, UsageError } from '../drivers/errors.js';
import {
  createLockHost,
  ImageLock,
  lockBytesFor,
  lockRequestFor,
  PERM_ALL,
  PERM_CONSISTENT_READ,
  POSIX_FALLBACK_WARNING,
  type LockingMode,
  type LockPolicy,
} from '../drivers/protocol/lock.js';
import type { BlockNode } from '../drivers/types.js';
import { createImage, holdWithQemuIo, lockBytes, lockEntries, run, startStorageDaemon, tempDir, type QemuHolder } from './helpers/qemu.js';

const HINT = '(is another process using the image?)';

describe('image locking (QEMU-compatible)', function () {
  let tmp: { dir: string; cleanup: () => void };
  /** Undone in reverse order after each test, pass or fail: nodes, fds, QEMU processes. */
  let undo: (() => unknown)[] = [];

  before(function () {
    tmp = tempDir('lock');
  });
  after(function () {
    tmp.cleanup();
  });
  afterEach(async function () {
    const steps = undo.reverse();
    undo = [];
    for (const step of steps) {
      try {
        await step();
      } catch {
        /* keep cleaning */
      }
    }
  });

  let n = 0;
  /** A fresh image in the temp dir: raw, or qcow2 (optionally over a fresh qcow2 backing file). */
  async function image(format: 'raw' | 'qcow2', withBacking = false): Promise<{ file: string; backing: string }> {
    const id = ++n;
    const file = path.join(tmp.dir, `img${id}.${format}`);
    const backing = path.join(tmp.dir, `base${id}.qcow2`);
    if (withBacking) {
      await createImage(backing, 'qcow2', '1M');
      await createImage(file, 'qcow2', '1M', {}, { file: path.basename(backing), format: 'qcow2' });
    } else {
      await createImage(file, format, '1M');
    }
    return { file, backing };
  }

  function own<T extends BlockNode | QemuHolder>(thing: T): T {
    undo.push(() => ('stop' in thing ? thing.stop() : thing.close()));
    return thing;
  }

  type Open = Partial<Omit<LockPolicy, 'mode'>> & { mode?: LockingMode };

  /** The file layer alone, locked as lockRequestFor says (qcow2 until its driver lands). */
  async function openFile(file: string, o: Open = {}): Promise<FileNode> {
    const readOnly = o.readOnly ?? true;
    const mode = o.mode ?? 'on';
    const lock =
      mode === 'off'
        ? undefined
        : lockRequestFor({ readOnly, backing: !!o.backing, forceShare: !!o.forceShare, shareRw: !!o.shareRw, mode, format: o.format });
    return own(await FileNode.open(file, { readOnly, lock }));
  }

  /** The whole open path, for raw images. */
  async function openRaw(file: string, o: Open = {}): Promise<BlockNode> {
    return own(
      await openImage(file, {
        readOnly: o.readOnly ?? true,
        format: o.format ?? 'raw',
        cache: 'writeback',
        metadataCacheBytes: 1 << 20,
        locking: o.mode ?? 'on',
        forceShare: !!o.forceShare,
        shareRw: !!o.shareRw,
      }),
    );
  }

  async function expectLocked(p: Promise<unknown>, message: string): Promise<void> {
    try {
      await p;
    } catch (err) {
      expect(err).to.be.instanceOf(LockedError);
      expect((err as Error).message).to.equal(message);
      return;
    }
    expect.fail(`expected LockedError: ${message}`);
  }

  const qemuImgInfo = (file: string, ...args: string[]) => run('qemu-img', ['info', ...args, file]);
  const qemuIoWrite = (file: string, ...args: string[]) => run('qemu-io', [...args, '-c', 'write 0 512', file]);

  describe('the bytes we hold', function () {
    const cases: { what: string; open: Open; qemuIo: string[]; bytes: number[] }[] = [
      { what: 'a read-only open', open: {}, qemuIo: ['-r'], bytes: [100, 201, 203] },
      { what: 'a read-write open', open: { readOnly: false }, qemuIo: [], bytes: [100, 101, 103, 201, 203] },
      { what: 'a force-share open', open: { forceShare: true }, qemuIo: ['-U', '-r'], bytes: [100] },
    ];
    for (const c of cases) {
      it(`${c.what} of a qcow2 image holds what qemu-io ${c.qemuIo.join(' ')} holds: ${c.bytes.join(' ')}`, async function () {
        const { file } = await image('qcow2');
        const q = own(await holdWithQemuIo(file, c.qemuIo));
        const theirs = lockBytes(file);
        await q.stop();
        expect(theirs).to.deep.equal(c.bytes);

        const node = await openFile(file, { ...c.open, format: 'qcow2' });
        expect(lockBytes(file)).to.deep.equal(c.bytes);
        expect(lockEntries(file).every((e) => e.kind === 'OFDLCK' && e.mode === 'READ')).to.equal(true);
        await node.close();
        expect(lockBytes(file)).to.deep.equal([]);
      });
    }

    it('a backing file is held as qemu-io holds the backing file of an overlay: 100 201 203', async function () {
      const { file, backing } = await image('qcow2', true);
      const q = own(await holdWithQemuIo(file));
      const theirs = lockBytes(backing);
      await q.stop();
      expect(theirs).to.deep.equal([100, 201, 203]);

      await openFile(backing, { backing: true, format: 'qcow2' });
      expect(lockBytes(backing)).to.deep.equal([100, 201, 203]);
    });

    it('a raw image opened through openImage holds 100 201 203 read-only and 100 101 103 201 203 read-write', async function () {
      const { file } = await image('raw');
      const ro = await openRaw(file);
      expect(lockBytes(file)).to.deep.equal([100, 201, 203]);
      await ro.close();
      await openRaw(file, { readOnly: false });
      expect(lockBytes(file)).to.deep.equal([100, 101, 103, 201, 203]);
    });

    it('locking off takes no lock at all, and ignores everyone else’s', async function () {
      const { file } = await image('raw');
      await openRaw(file, { readOnly: false, mode: 'off' });
      expect(lockEntries(file)).to.deep.equal([]);
      own(await holdWithQemuIo(file, ['-f', 'raw']));
      await openRaw(file, { readOnly: false, mode: 'off' });
      expect(lockBytes(file)).to.deep.equal([100, 101]);
    });

    it('closing the image drops every byte', async function () {
      const { file } = await image('raw');
      const node = await openRaw(file, { readOnly: false });
      await node.close();
      expect(lockEntries(file)).to.deep.equal([]);
      expect((await qemuIoWrite(file, '-f', 'raw')).code).to.equal(0);
    });
  });

  describe('QEMU’s tools while we hold an image', function () {
    it('qemu-img info fails and qemu-img info -U works while we hold a qcow2 image read-write', async function () {
      const { file } = await image('qcow2');
      await openFile(file, { readOnly: false, format: 'qcow2' });
      const plain = await qemuImgInfo(file);
      expect(plain.code).to.not.equal(0);
      expect(plain.stderr).to.match(/Failed to get shared "write" lock/);
      expect((await qemuImgInfo(file, '-U')).code).to.equal(0);
    });

    it('qemu-img info of a raw image takes no lock in QEMU 7.2, so it works even while we write', async function () {
      // Only a format that maps guest data refuses writers on its file; raw passes
      // qemu-img's permissions through, and info asks for none.
      const { file } = await image('raw');
      await openRaw(file, { readOnly: false });
      expect((await qemuImgInfo(file, '-f', 'raw')).code).to.equal(0);
    });

    it('qemu-io cannot write an image we hold read-write', async function () {
      const { file } = await image('raw');
      await openRaw(file, { readOnly: false });
      const r = await qemuIoWrite(file, '-f', 'raw');
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.match(/Failed to get "write" lock/);
    });

    it('qemu-img info works and qemu-io cannot write while we hold it read-only', async function () {
      const { file } = await image('raw');
      await openRaw(file);
      expect((await qemuImgInfo(file, '-f', 'raw')).code).to.equal(0);
      const r = await qemuIoWrite(file, '-f', 'raw');
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.match(/Failed to get "write" lock/);
    });

    it('a backing file we hold refuses a qemu-io writer but allows qemu-img info and a writer of the overlay', async function () {
      const { file, backing } = await image('qcow2', true);
      await openFile(backing, { backing: true, format: 'qcow2' });
      const w = await qemuIoWrite(backing, '-f', 'qcow2');
      expect(w.code).to.not.equal(0);
      expect(w.stderr).to.match(/Failed to get "write" lock/);
      expect((await qemuImgInfo(backing, '-f', 'qcow2')).code).to.equal(0);
      expect((await qemuIoWrite(file, '-f', 'qcow2')).code).to.equal(0);
    });

    it('two read-only opens of ours side by side work, and qemu-io -r can join them', async function () {
      const { file } = await image('raw');
      await openRaw(file);
      await openRaw(file);
      expect(lockBytes(file)).to.deep.equal([100, 201, 203]);
      const r = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 512', file]);
      expect(r.code, r.stderr).to.equal(0);
    });
  });

  describe('opening an image someone else holds writable', function () {
    it('fails read-write and read-only while qemu-storage-daemon exports the qcow2 writable; force-share gets in', async function () {
      const { file, backing } = await image('qcow2', true);
      const mnt = path.join(tmp.dir, `mnt${++n}`);
      fs.writeFileSync(mnt, '');
      own(await startStorageDaemon([`driver=file,node-name=f,filename=${file}`, 'driver=qcow2,node-name=q,file=f'], 'q', mnt, { writable: true }));
      expect(lockBytes(file)).to.deep.equal([100, 101, 103, 201, 203]);

      await expectLocked(openFile(file, { readOnly: false, format: 'qcow2' }), `${file}: Failed to get "write" lock ${HINT}`);
      await expectLocked(openFile(file, { format: 'qcow2' }), `${file}: Failed to get shared "write" lock ${HINT}`);
      expect(lockBytes(file), 'a failed open leaves nothing behind').to.deep.equal([100, 101, 103, 201, 203]);
      await openFile(file, { forceShare: true, format: 'qcow2' });
      // Its backing file is only read: we may read it too, but not write it.
      await openFile(backing, { backing: true, format: 'qcow2' });
      await expectLocked(openFile(backing, { readOnly: false, format: 'qcow2' }), `${backing}: Failed to get "write" lock ${HINT}`);
    });

    it('fails read-write and read-only while another open of ours holds it read-write; force-share gets in', async function () {
      const { file } = await image('raw');
      await openRaw(file, { readOnly: false });
      await expectLocked(openRaw(file, { readOnly: false }), `${file}: Failed to get "write" lock ${HINT}`);
      await expectLocked(openRaw(file), `${file}: Failed to get shared "write" lock ${HINT}`);
      await openRaw(file, { forceShare: true });
    });

    it('fails read-write while qemu-io holds it read-only', async function () {
      const { file } = await image('qcow2');
      own(await holdWithQemuIo(file, ['-r']));
      await expectLocked(openFile(file, { readOnly: false, format: 'qcow2' }), `${file}: Failed to get "write" lock ${HINT}`);
      await openFile(file, { format: 'qcow2' });
    });

    it('force-share is refused for a read-write open, as QEMU refuses it', function () {
      expect(() => lockRequestFor({ readOnly: false, backing: false, forceShare: true, shareRw: false, mode: 'on' })).to.throw(UsageError);
    });
  });

  describe('share-rw', function () {
    it('lets a second writer of ours into a raw image', async function () {
      const { file } = await image('raw');
      await openRaw(file, { readOnly: false, shareRw: true });
      await openRaw(file, { readOnly: false, shareRw: true });
      expect(lockBytes(file)).to.deep.equal([100, 101, 103]);
    });

    it('does not let in a writer that itself refuses to share', async function () {
      const { file } = await image('raw');
      await openRaw(file, { readOnly: false, shareRw: true });
      await expectLocked(openRaw(file, { readOnly: false }), `${file}: Failed to get shared "write" lock ${HINT}`);
    });

    it('lets qemu-io write a raw image alongside us (qemu-io needs nothing: it shares everything over raw)', async function () {
      const { file } = await image('raw');
      await openRaw(file, { readOnly: false, shareRw: true });
      const r = await qemuIoWrite(file, '-f', 'raw');
      expect(r.code, r.stderr).to.equal(0);
      // qemu-io cannot ask for more: -U is for read-only opens only.
      const u = await qemuIoWrite(file, '-U', '-f', 'raw');
      expect(u.stderr).to.match(/force-share=on can only be used with read-only images/);
    });

    it('lets us join a qemu-storage-daemon that exports a raw image writable', async function () {
      const { file } = await image('raw');
      const mnt = path.join(tmp.dir, `mnt${++n}`);
      fs.writeFileSync(mnt, '');
      own(await startStorageDaemon([`driver=file,node-name=f,filename=${file}`, 'driver=raw,node-name=r,file=f'], 'r', mnt, { writable: true }));
      expect(lockBytes(file)).to.deep.equal([100, 101, 103]);
      await expectLocked(openRaw(file, { readOnly: false }), `${file}: Failed to get shared "write" lock ${HINT}`);
      await openRaw(file, { readOnly: false, shareRw: true });
    });

    it('does not let a second writer into a qcow2 image: its metadata is never shared', async function () {
      const { file } = await image('qcow2');
      await openFile(file, { readOnly: false, shareRw: true, format: 'qcow2' });
      expect(lockBytes(file)).to.deep.equal([100, 101, 103, 201, 203]);
      await expectLocked(openFile(file, { readOnly: false, shareRw: true, format: 'qcow2' }), `${file}: Failed to get "write" lock ${HINT}`);
      expect((await qemuIoWrite(file, '-f', 'qcow2')).code).to.not.equal(0);
    });

    it('refuses a probed qcow2 image that another writer holds, once probing shows it is not raw', async function () {
      const { file } = await image('qcow2');
      await openFile(file, { readOnly: false, shareRw: true });
      await expectLocked(
        openImage(file, { readOnly: false, cache: 'writeback', metadataCacheBytes: 1 << 20, locking: 'on', forceShare: false, shareRw: true }),
        `${file}: Failed to get shared "write" lock ${HINT}`,
      );
      expect(lockBytes(file)).to.deep.equal([100, 101, 103]);
    });
  });

  describe('changing the permissions of an open lock', function () {
    function lockFd(file: string, req: Parameters<typeof ImageLock.acquire>[2], host = createLockHost(), flags = 'r+'): ImageLock {
      const fd = fs.openSync(file, flags);
      let lock: ImageLock;
      try {
        lock = ImageLock.acquire(fd, file, req, host);
      } catch (err) {
        fs.closeSync(fd);
        throw err;
      }
      undo.push(() => {
        lock.release();
        fs.closeSync(fd);
      });
      return lock;
    }
    const policy = (o: Partial<LockPolicy>): LockPolicy => ({ readOnly: true, backing: false, forceShare: false, shareRw: false, mode: 'on', ...o });

    it('upgrading read-only to read-write takes write and resize', async function () {
      const { file } = await image('raw');
      const lock = lockFd(file, lockRequestFor(policy({})));
      lock.update(lockRequestFor(policy({ readOnly: false })));
      expect(lockBytes(file)).to.deep.equal([100, 101, 103, 201, 203]);
      lock.update(lockRequestFor(policy({})));
      expect(lockBytes(file)).to.deep.equal([100, 201, 203]);
    });

    it('an upgrade that conflicts fails with LockedError and keeps the old lock', async function () {
      const { file } = await image('raw');
      const other = lockFd(file, lockRequestFor(policy({})));
      const lock = lockFd(file, lockRequestFor(policy({})));
      expect(() => lock.update(lockRequestFor(policy({ readOnly: false })))).to.throw(LockedError, `${file}: Failed to get "write" lock ${HINT}`);
      expect(lock.current).to.deep.equal({ perm: PERM_CONSISTENT_READ, shared: PERM_ALL & ~0x0a });
      other.release();
      expect(lockBytes(file)).to.deep.equal([100, 201, 203]);
    });

    it('lockBytesFor names the bytes of a request', function () {
      expect(lockBytesFor(lockRequestFor(policy({ readOnly: false, shareRw: true })))).to.deep.equal([100, 101, 103]);
      expect(lockBytesFor(lockRequestFor(policy({ backing: true, readOnly: false })))).to.deep.equal([100, 201, 203]);
    });

    describe('without OFD locks', function () {
      it('locking on falls back to POSIX locks, warns once, and QEMU still sees them', async function () {
        const a = await image('raw');
        const b = await image('raw');
        const warnings: string[] = [];
        const host = createLockHost({ ofd: false, warn: (t) => warnings.push(t) });
        const lock = lockFd(a.file, lockRequestFor(policy({ readOnly: false })), host);
        lockFd(b.file, lockRequestFor(policy({})), host);
        expect(lock.flavour).to.equal('posix');
        expect(warnings).to.deep.equal([POSIX_FALLBACK_WARNING]);
        expect(lockEntries(a.file).map((e) => `${e.kind} ${e.byte}`)).to.deep.equal(['POSIX 100', 'POSIX 101', 'POSIX 103', 'POSIX 201', 'POSIX 203']);
        const r = await qemuIoWrite(a.file, '-f', 'raw');
        expect(r.code).to.not.equal(0);
        expect(r.stderr).to.match(/Failed to get "write" lock/);
        lock.release();
        expect(lockEntries(a.file)).to.deep.equal([]);
      });

      it('POSIX locks still refuse a QEMU writer that holds the image first', async function () {
        const { file } = await image('qcow2');
        own(await holdWithQemuIo(file));
        expect(() => lockFd(file, lockRequestFor(policy({ format: 'qcow2' })), createLockHost({ ofd: false, warn: () => undefined }))).to.throw(
          LockedError,
          `${file}: Failed to get shared "write" lock ${HINT}`,
        );
      });

      it('the warning goes to stderr once per process host', async function () {
        const { file } = await image('raw');
        const host = createLockHost({ ofd: false });
        const seen: string[] = [];
        const write = process.stderr.write;
        process.stderr.write = ((chunk: string | Uint8Array) => (seen.push(String(chunk)), true)) as typeof process.stderr.write;
        try {
          lockFd(file, lockRequestFor(policy({})), host);
          lockFd(file, lockRequestFor(policy({})), host);
        } finally {
          process.stderr.write = write;
        }
        expect(seen).to.deep.equal([`tsmount: ${POSIX_FALLBACK_WARNING}`]);
      });

      it('locking auto takes nothing, silently', async function () {
        const { file } = await image('raw');
        const warnings: string[] = [];
        const lock = lockFd(file, lockRequestFor(policy({ readOnly: false, mode: 'auto' })), createLockHost({ ofd: false, warn: (t) => warnings.push(t) }));
        expect(lock.flavour).to.equal(undefined);
        expect(lockEntries(file)).to.deep.equal([]);
        expect(warnings).to.deep.equal([]);
      });
    });

    it('locking auto uses OFD locks where the kernel has them', async function () {
      const { file } = await image('raw');
      const lock = lockFd(file, lockRequestFor(policy({ mode: 'auto' })));
      expect(lock.flavour).to.equal('ofd');
      expect(lockBytes(file)).to.deep.equal([100, 201, 203]);
    });
  });
});
