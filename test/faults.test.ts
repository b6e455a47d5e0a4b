// Faults from the host (issue 20): the file system under the image fills up, and the
// disk under it fails reads, writes and flushes. The writer sees ENOSPC or EIO, the
// server logs it and keeps serving, nothing already written is lost, the image stays
// consistent, and writing resumes once the fault is gone. Full disks are a small
// loop-mounted ext4 the test makes; I/O errors are injected under the file protocol
// node (drivers/filters/faults.ts, TSMOUNT_FAULTS), as this machine has no
// device-mapper error target.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, convertToRaw, createImage, qemuIo, run, tempDir } from './helpers/qemu.js';
import { isAlive, mountedPid, MountTracker } from './helpers/mount.js';
import { readBytes } from './helpers/images.js';
import { canLoopMount, fillUp, makeLoopFs, type LoopFs } from './helpers/host-fs.js';

const MiB = 1 << 20;

/** dd SRC into the flat file at byte `seek`, flushed; the result, not thrown. */
function ddInto(src: string, flat: string, seek: number, extra: string[] = []): ReturnType<typeof run> {
  return run('dd', [`if=${src}`, `of=${flat}`, 'bs=1M', `seek=${seek}`, 'oflag=seek_bytes', 'conv=notrunc,nocreat,fsync', 'status=none', ...extra]);
}

describe('faults: a full host file system and failing host I/O', function () {
  this.timeout(240_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let host: LoopFs | undefined;
  before(() => (tmp = tempDir('faults')));
  afterEach(async () => {
    await mounts.cleanup();
    host?.remove();
    host = undefined;
    delete process.env.TSMOUNT_FAULTS;
  });
  after(() => tmp.cleanup());

  for (const format of ['qcow2', 'vmdk', 'vhdx']) {
    it(`${format} on a full ext4: ENOSPC to the writer, nothing lost, consistent, writing resumes once space is freed`, async function () {
      if (!canLoopMount()) this.skip();
      host = await makeLoopFs(path.join(tmp.dir, `host-${format}.img`), 48 * MiB, path.join(tmp.dir, `host-${format}`));
      const img = path.join(host.mountpoint, `full.${format}`);
      await createImage(img, format, 128 * MiB);
      const a = path.join(tmp.dir, 'a.bin');
      const b = path.join(tmp.dir, 'b.bin');
      fs.writeFileSync(a, crypto.randomBytes(4 * MiB));
      fs.writeFileSync(b, crypto.randomBytes(16 * MiB));
      const mp = path.join(tmp.dir, `mnt-${format}`);
      fs.mkdirSync(mp, { recursive: true });
      const log = path.join(tmp.dir, `full-${format}.log`);
      await mounts.mount(['--rw', '--log', log, img, mp]);
      const flat = path.join(mp, 'full.raw');
      const pid = mountedPid(mp)!;

      expect((await ddInto(a, flat, 0)).code, 'the first write, with room').to.equal(0);
      const filler = await fillUp(host.mountpoint);
      const full = await ddInto(b, flat, 32 * MiB);
      expect(full.code, 'a write with no room left fails').to.not.equal(0);
      expect(full.stderr).to.match(/No space left on device/);
      expect(isAlive(pid), 'the server lives on').to.equal(true);
      expect(readBytes(flat, 0, 4 * MiB).equals(fs.readFileSync(a)), 'what was written before reads back').to.equal(true);

      fs.rmSync(filler);
      await run('sync', []);
      const again = await ddInto(b, flat, 32 * MiB);
      expect(again.code, `the same write once space is freed: ${again.stderr}`).to.equal(0);
      await mounts.unmount(mp);
      expect(fs.readFileSync(log, 'utf8')).to.match(/ENOSPC/);

      const c = await checkImage(img, format);
      expect(c.corruptions, c.output).to.equal(0);
      expect(c.checkErrors, c.output).to.equal(0);
      const raw = path.join(tmp.dir, `full-${format}.raw`);
      await convertToRaw(img, raw, format);
      expect(readBytes(raw, 0, 4 * MiB).equals(fs.readFileSync(a)), 'the first write, in the image').to.equal(true);
      expect(readBytes(raw, 32 * MiB, 16 * MiB).equals(fs.readFileSync(b)), 'the write made once space was freed').to.equal(true);
      fs.rmSync(raw);
    });
  }

  it('injected EIO on reads, writes and flushes of the host file: EIO to the reader and writer, logged, no crash', async () => {
    const img = path.join(tmp.dir, 'eio.qcow2');
    await createImage(img, 'qcow2', 64 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x5a 0 8M']);
    const control = path.join(tmp.dir, 'faults');
    process.env.TSMOUNT_FAULTS = control;
    const mp = path.join(tmp.dir, 'mnt-eio');
    fs.mkdirSync(mp);
    const log = path.join(tmp.dir, 'eio.log');
    // --cache none: every read reaches the file node, none is served from the data cache.
    await mounts.mount(['--rw', '--cache', 'none', '--log', log, img, mp]);
    const flat = path.join(mp, 'eio.raw');
    const pid = mountedPid(mp)!;
    const data = path.join(tmp.dir, 'eio.bin');
    fs.writeFileSync(data, crypto.randomBytes(2 * MiB));
    const rd = (skip: number) => run('dd', [`if=${flat}`, 'of=/dev/null', 'bs=1M', 'count=1', `skip=${skip}`, 'iflag=direct', 'status=none']);

    fs.writeFileSync(control, 'read EIO\n');
    const r1 = await rd(3);
    expect(r1.code).to.not.equal(0);
    expect(r1.stderr).to.match(/Input\/output error/);
    fs.writeFileSync(control, '');
    expect((await rd(3)).code, 'reads work again once the fault is gone').to.equal(0);

    for (const op of ['write', 'flush']) {
      fs.writeFileSync(control, `${op} EIO\n`);
      const w = await ddInto(data, flat, 20 * MiB, ['oflag=seek_bytes,direct']);
      expect(w.code, `a write with ${op} failing`).to.not.equal(0);
      expect(w.stderr).to.match(/Input\/output error/);
      expect(isAlive(pid), `the server lives on after a failed ${op}`).to.equal(true);
    }
    fs.writeFileSync(control, '');
    const ok = await ddInto(data, flat, 20 * MiB, ['oflag=seek_bytes,direct']);
    expect(ok.code, `writing resumes: ${ok.stderr}`).to.equal(0);
    expect(readBytes(flat, 0, MiB).equals(Buffer.alloc(MiB, 0x5a))).to.equal(true);
    await mounts.unmount(mp);
    delete process.env.TSMOUNT_FAULTS;

    const text = fs.readFileSync(log, 'utf8');
    expect(text).to.match(/read .*EIO \(injected\)/);
    expect(text).to.match(/write .*EIO \(injected\)/);
    const c = await checkImage(img, 'qcow2');
    expect(c.corruptions, c.output).to.equal(0);
    expect(c.checkErrors, c.output).to.equal(0);
    const raw = path.join(tmp.dir, 'eio.raw');
    await convertToRaw(img, raw, 'qcow2');
    expect(readBytes(raw, 0, 8 * MiB).equals(Buffer.alloc(8 * MiB, 0x5a)), 'the data from before').to.equal(true);
    expect(readBytes(raw, 20 * MiB, 2 * MiB).equals(fs.readFileSync(data)), 'the write made after the faults').to.equal(true);
  });
});
