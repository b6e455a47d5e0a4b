// --overlay FILE and --snapshot through real mounts: writes land in a qcow2 overlay
// (made by our own qcow2 create, the image as its backing file with its format
// recorded), the image is never written, and QEMU judges the overlay: qemu-img check
// clean, qemu-img compare equal to what was read through the mount.
import { expect } from 'chai';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { checkImage, md5File, run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount, mountpointIn, waitFor } from './helpers/mount.js';
import { pattern, writeSynced } from './helpers/images.js';
import { startServer } from './helpers/servers.js';

const MiB = 1 << 20;

function snapshotDirs(): string[] {
  return fs.readdirSync(os.tmpdir()).filter((n) => n.startsWith('tsmount-snapshot-'));
}

describe('tsmount --overlay and --snapshot: writes into a qcow2 overlay, the image untouched', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let image: string;
  let imageMd5: string;

  before(async () => {
    tmp = tempDir('overlay');
    const raw = path.join(tmp.dir, 'src.raw');
    const b = Buffer.alloc(16 * MiB);
    for (let i = 0; i < 16; i += 2) pattern(MiB, i + 1).copy(b, i * MiB);
    fs.writeFileSync(raw, b);
    // A foreign format in a file nobody may open for writing, root included (chattr +i):
    // the mount would fail if anything tried to.
    image = path.join(tmp.dir, 'disk.vmdk');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, image]);
    imageMd5 = await md5File(image);
    await runOk('chattr', ['+i', image]);
  });
  afterEach(() => mounts.cleanup());
  after(async () => {
    await run('chattr', ['-i', image]);
    tmp.cleanup();
  });

  const mp = (name: string): string => mountpointIn(tmp.dir, name);

  it('makes a read-only format writable through a new overlay, then reuses it; QEMU agrees with the mount', async function () {
    const refused = mp('refused');
    mounts.track(refused);
    const rw = await tsmount(['--rw', image, refused]);
    expect(rw.code, 'the image itself cannot be written').to.not.equal(0);

    const overlay = path.join(tmp.dir, 'disk-overlay.qcow2');
    const dir = mp('ov');
    const log = path.join(tmp.dir, 'overlay.log');
    await mounts.mount(['--overlay', overlay, '--log', log, image, dir]);
    const flat = path.join(dir, 'disk.raw');
    expect(fs.readdirSync(dir)).to.deep.equal(['disk.raw']);
    // The server logs its ready line once tsmount has acknowledged the mount, so just after tsmount returns.
    await waitFor(() => fs.readFileSync(log, 'utf8').includes(' ready: '), 15_000, 'the ready line');
    expect(fs.readFileSync(log, 'utf8'), 'the ready line names the image under the overlay').to.match(/disk\.raw ready: .*, vmdk under a qcow2 overlay, read-write/);
    writeSynced(flat, 3 * MiB + 100, pattern(200_000, 9));
    const seen1 = path.join(tmp.dir, 'seen1.raw');
    fs.copyFileSync(flat, seen1);
    await mounts.unmount(dir);

    expect(await md5File(image), 'image unchanged').to.equal(imageMd5);
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', overlay])) as Record<string, unknown>;
    expect(info.format).to.equal('qcow2');
    expect(info['backing-filename']).to.equal(image);
    expect(info['backing-filename-format']).to.equal('vmdk');
    expect((await checkImage(overlay, 'qcow2')).code, 'qemu-img check').to.equal(0);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', overlay, seen1]);

    // Mounted again with -o overlay=: the overlay is reused, earlier writes still there.
    await mounts.mount(['-o', `overlay=${overlay}`, image, dir]);
    expect(fs.readFileSync(flat).equals(fs.readFileSync(seen1))).to.equal(true);
    writeSynced(flat, 15 * MiB - 10, pattern(4096, 11));
    const seen2 = path.join(tmp.dir, 'seen2.raw');
    fs.copyFileSync(flat, seen2);
    await mounts.unmount(dir);
    expect(await md5File(image), 'image unchanged').to.equal(imageMd5);
    expect((await checkImage(overlay, 'qcow2')).code, 'qemu-img check').to.equal(0);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', overlay, seen2]);
  });

  it('--snapshot: writes are seen through the mount, then discarded at unmount', async function () {
    const before = snapshotDirs();
    const dir = mp('snap');
    await mounts.mount(['--snapshot', image, dir]);
    const flat = path.join(dir, 'disk.raw');
    const data = pattern(MiB, 21);
    writeSynced(flat, 5 * MiB, data);
    const back = Buffer.alloc(MiB);
    const fd = fs.openSync(flat, 'r');
    fs.readSync(fd, back, 0, MiB, 5 * MiB);
    fs.closeSync(fd);
    expect(back.equals(data)).to.equal(true);
    expect(snapshotDirs().length).to.be.greaterThan(before.length);
    await mounts.unmount(dir);
    expect(snapshotDirs().sort()).to.deep.equal(before.sort());
    expect(await md5File(image), 'image unchanged').to.equal(imageMd5);
    // A second snapshot mount starts from the image again.
    await mounts.mount(['-o', 'snapshot', image, dir]);
    const again = Buffer.alloc(MiB);
    const fd2 = fs.openSync(flat, 'r');
    fs.readSync(fd2, again, 0, MiB, 5 * MiB);
    fs.closeSync(fd2);
    expect(again.equals(data)).to.equal(false);
    await mounts.unmount(dir);
  });

  it('--overlay over a remote image (NBD): the export is only read, the overlay names its URI', async function () {
    const sock = path.join(tmp.dir, 'nbd.sock');
    const server = await startServer('nbdkit', ['-f', '-U', sock, 'memory', '16M'], { path: sock });
    try {
      const uri = `nbd+unix:///?socket=${sock}`;
      const overlay = path.join(tmp.dir, 'nbd-overlay.qcow2');
      const dir = mp('nbd');
      await mounts.mount(['--overlay', overlay, uri, dir]);
      writeSynced(path.join(dir, 'nbd.raw'), 4096, Buffer.from('into the overlay'));
      const seen = path.join(tmp.dir, 'nbd-seen.raw');
      fs.copyFileSync(path.join(dir, 'nbd.raw'), seen);
      await mounts.unmount(dir);
      const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', overlay])) as Record<string, unknown>;
      expect(info['backing-filename']).to.equal(uri);
      expect(info['backing-filename-format']).to.equal('raw');
      expect((await checkImage(overlay, 'qcow2')).code, 'qemu-img check').to.equal(0);
      await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', overlay, seen]);
      const export0 = await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0 0 16M', uri]);
      expect(export0, 'the export was not written').to.match(/read 16777216\/16777216 bytes/).and.not.match(/verification failed/i);
    } finally {
      await server.stop();
    }
  });

  it('refuses --overlay with two images, with --snapshot, the image as its own overlay, and an overlay of another image, changing nothing', async function () {
    const dir = mp('bad');
    // An overlay of another image is not reused for this one.
    const other = path.join(tmp.dir, 'other-overlay.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.join(tmp.dir, 'src.raw'), '-F', 'raw', other]);
    const otherMd5 = await md5File(other);
    const cases: [string[], RegExp][] = [
      [['--overlay', path.join(tmp.dir, 'x.qcow2'), image, path.join(tmp.dir, 'src.raw'), dir], /--overlay takes one image/],
      [['--overlay', path.join(tmp.dir, 'y.qcow2'), '--snapshot', image, dir], /--overlay or --snapshot, not both/],
      [['--overlay', image, image, dir], /cannot be the image itself/],
      [['--overlay', other, image, dir], /an overlay of .*src\.raw, not of/],
    ];
    for (const [args, why] of cases) {
      const r = await tsmount(args);
      expect(r.code, args.join(' ')).to.not.equal(0);
      expect(r.stderr.trim().split('\n'), r.stderr).to.have.length(1);
      expect(r.stderr).to.match(why);
    }
    expect(await md5File(other)).to.equal(otherMd5);
    expect(fs.existsSync(path.join(tmp.dir, 'x.qcow2'))).to.equal(false);
    expect(fs.existsSync(path.join(tmp.dir, 'y.qcow2'))).to.equal(false);
    expect(await md5File(image)).to.equal(imageMd5);
    expect((await run('grep', ['-c', dir, '/proc/mounts'])).stdout.trim()).to.equal('0');
  });
});
