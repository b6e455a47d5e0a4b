// The file protocol: regular files and host block devices.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { FileNode } from '../drivers/protocol/file.js';
import { createImage, md5File, qemuIo, rawMd5, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';

const MiB = 1 << 20;

describe('file protocol', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  const loops: string[] = [];
  before(() => (tmp = tempDir('file')));
  afterEach(async () => {
    await mounts.cleanup();
    while (loops.length) await runOk('losetup', ['-d', loops.pop()!]).catch(() => undefined);
  });
  after(() => tmp.cleanup());

  async function loopDevice(file: string, readOnly: boolean): Promise<string> {
    const dev = (await runOk('losetup', [...(readOnly ? ['-r'] : []), '-f', '--show', file])).trim();
    loops.push(dev);
    return dev;
  }

  it('sizes a host block device with an ioctl and reads it', async () => {
    const img = path.join(tmp.dir, 'dev.raw');
    fs.writeFileSync(img, Buffer.alloc(3 * MiB, 0x3c));
    const dev = await loopDevice(img, true);
    const node = await FileNode.open(dev, { readOnly: true });
    try {
      expect(node.isBlockDevice).to.equal(true);
      expect(node.size).to.equal(3 * MiB);
      const buf = Buffer.alloc(4096);
      await node.read(MiB, buf);
      expect(buf.every((b) => b === 0x3c)).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('mounts a qcow2 image that lives on a block device, read-write', async () => {
    // A qcow2 container written onto a loop device: the device's size is the file's.
    const img = path.join(tmp.dir, 'container.qcow2');
    await createImage(img, 'qcow2', 32 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x5e 1M 2M']);
    const backingFile = path.join(tmp.dir, 'blockdev.bin');
    fs.writeFileSync(backingFile, Buffer.alloc(16 * MiB));
    fs.writeSync(fs.openSync(backingFile, 'r+'), fs.readFileSync(img), 0, fs.statSync(img).size, 0);
    const dev = await loopDevice(backingFile, false);
    const expected = await rawMd5(dev, 'qcow2');
    const dir = path.join(tmp.dir, 'mnt');
    fs.mkdirSync(dir);
    await mounts.mount(['--rw', '-f', 'qcow2', dev, dir]);
    const flat = path.join(dir, `${path.basename(dev)}.raw`);
    expect(await md5File(flat)).to.equal(expected);
    await runOk('dd', ['if=/dev/urandom', `of=${flat}`, 'bs=4096', 'count=4', 'seek=100', 'conv=notrunc,fsync', 'status=none']);
    const written = await md5File(flat);
    await mounts.unmount(dir);
    expect(await rawMd5(dev, 'qcow2')).to.equal(written);
    const check = await runOk('qemu-img', ['check', '-f', 'qcow2', dev]);
    expect(check).to.match(/No errors/);
  });

  it('punches holes for zero(unmap) and reads zeros back, where the file system can', async () => {
    const img = path.join(tmp.dir, 'holes.raw');
    fs.writeFileSync(img, Buffer.alloc(4 * MiB, 0xff));
    const node = await FileNode.open(img, { readOnly: false });
    try {
      const before = fs.statSync(img).blocks;
      await node.zero(MiB, 2 * MiB, true);
      await node.flush();
      const buf = Buffer.alloc(2 * MiB);
      await node.read(MiB, buf);
      expect(buf.every((b) => b === 0)).to.equal(true);
      const head = Buffer.alloc(16);
      await node.read(MiB - 16, head);
      expect(head.every((b) => b === 0xff)).to.equal(true);
      // Where punching works the file really shrinks on disk; elsewhere zeros were written.
      expect(fs.statSync(img).blocks).to.be.at.most(before);
      await node.zero(3 * MiB, MiB, false);
      await node.read(3 * MiB, buf.subarray(0, MiB));
      expect(buf.subarray(0, MiB).every((b) => b === 0)).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('reads past the end of a file as zeros, as QEMU does', async () => {
    const img = path.join(tmp.dir, 'short.raw');
    fs.writeFileSync(img, Buffer.alloc(1000, 7));
    const node = await FileNode.open(img, { readOnly: true });
    try {
      const buf = Buffer.alloc(100, 0xaa);
      await node.read(950, buf);
      expect([...buf.subarray(0, 50)].every((b) => b === 7)).to.equal(true);
      expect([...buf.subarray(50)].every((b) => b === 0)).to.equal(true);
    } finally {
      await node.close();
    }
  });
});
