// Host drives (qemu-block-drivers(7), "Using host drives"): loop devices the test sets
// up over files (512-byte and 4 KiB logical blocks), a fake CD-ROM drive (the ioctl
// layer injected), NVMe addresses resolved in a fake sysfs tree, and the names of
// other systems. Every loop device is detached, every mount unmounted.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FileNode } from '../drivers/protocol/file.js';
import { CDS_DISC_OK, CDS_NO_DISC, CDS_TRAY_OPEN } from '../drivers/util/sys.js';
import { ENOMEDIUM, RemovableMedium, type MediumIoctls } from '../drivers/protocol/removable.js';
import { makeNvmeProtocol, parseNvmeUri, resolveNvme } from '../drivers/protocol/nvme.js';
import { parseForeignHostName } from '../drivers/protocol/host-names.js';
import { imageOptsToSpec } from '../drivers/protocol/remote.js';
import { openImage, openProtocol } from '../drivers/open.js';
import { protocolFor } from '../drivers/protocol/index.js';
import { messageOf } from '../drivers/errors.js';
import { md5File, run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';

const MiB = 1 << 20;

/** Lines written to stderr while `fn` runs (the drivers' "tsmount: ..." log lines). */
async function capturingStderr<T>(fn: () => Promise<T>): Promise<{ value: T; lines: string[] }> {
  const lines: string[] = [];
  const orig = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    lines.push(...String(chunk).split('\n').filter(Boolean));
    return (orig as (...a: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stderr.write;
  try {
    return { value: await fn(), lines };
  } finally {
    process.stderr.write = orig;
  }
}

describe('host drives', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  const loops: string[] = [];
  let haveLoop = true;
  before(async () => {
    tmp = tempDir('hostdrv');
    haveLoop = (await run('losetup', ['-f'])).code === 0;
  });
  afterEach(async () => {
    await mounts.cleanup();
    while (loops.length) await runOk('losetup', ['-d', loops.pop()!]).catch(() => undefined);
  });
  after(() => tmp.cleanup());

  /** A test that needs loop devices: skipped, saying so, where losetup cannot make one. */
  function itLoop(title: string, fn: () => Promise<void>): void {
    it(title, async function () {
      if (!haveLoop) {
        process.stdout.write(`      (skipped: losetup -f found no free loop device on this machine)\n`);
        this.skip();
      }
      await fn();
    });
  }

  async function loopDevice(file: string, sectorSize?: number): Promise<string> {
    const dev = (await runOk('losetup', [...(sectorSize ? ['--sector-size', String(sectorSize)] : []), '-f', '--show', file])).trim();
    loops.push(dev);
    return dev;
  }

  function randomFile(name: string, size: number): string {
    const p = path.join(tmp.dir, name);
    fs.writeFileSync(p, crypto.randomBytes(size));
    return p;
  }

  itLoop('reads and writes a 512-byte-sector device byte for byte as its backing file, zeroes and discards', async () => {
    const file = randomFile('d512.img', 4 * MiB);
    const dev = await loopDevice(file);
    const { value: node, lines } = await capturingStderr(() => FileNode.open(dev, { readOnly: false }));
    try {
      expect(lines.filter((l) => l.includes('WARNING') && l.includes(dev))).to.have.length(1);
      expect(node.size).to.equal(4 * MiB);
      expect(node.requestAlignment).to.equal(512);
      const got = Buffer.alloc(4 * MiB);
      await node.read(0, got);
      expect(got.equals(fs.readFileSync(file))).to.equal(true);
      const patch = crypto.randomBytes(64 * 1024);
      await node.write(MiB + 512, patch);
      await node.zero(2 * MiB, 128 * 1024, false);
      await node.zero(3 * MiB, 128 * 1024, true);
      await node.flush();
      const after = fs.readFileSync(file);
      expect(after.subarray(MiB + 512, MiB + 512 + patch.length).equals(patch)).to.equal(true);
      expect(after.subarray(2 * MiB, 2 * MiB + 128 * 1024).every((b) => b === 0)).to.equal(true);
      expect(after.subarray(3 * MiB, 3 * MiB + 128 * 1024).every((b) => b === 0)).to.equal(true);
      // BLKDISCARD on a loop device punches the backing file: the range is freed.
      const before = fs.statSync(file).blocks;
      expect(await node.discard(0, MiB)).to.equal(true);
      await node.flush();
      expect(fs.statSync(file).blocks).to.be.below(before);
    } finally {
      await node.close();
    }
  });

  itLoop('a 4 KiB-sector device with --cache none (O_DIRECT): unaligned writes through the graph land byte-exact', async () => {
    const file = randomFile('d4k.img', 2 * MiB);
    const expected = fs.readFileSync(file);
    const dev = await loopDevice(file, 4096);
    const probe = await FileNode.open(dev, { readOnly: true, direct: true });
    expect([probe.requestAlignment, probe.direct]).to.deep.equal([4096, true]);
    await probe.close();
    const node = await openProtocol(dev, { readOnly: false, cache: 'none' });
    try {
      for (const [off, len] of [[1, 10], [4095, 2], [8191, 4097], [100_000, 70_000], [2 * MiB - 3, 3]] as const) {
        const data = crypto.randomBytes(len);
        await node.write(off, data);
        data.copy(expected, off);
        const back = Buffer.alloc(len + 2);
        await node.read(Math.max(0, off - 1), back.subarray(0, Math.min(len + 2, 2 * MiB - Math.max(0, off - 1))));
      }
      const all = Buffer.alloc(2 * MiB);
      await node.read(0, all);
      expect(all.equals(expected)).to.equal(true);
      await node.flush();
    } finally {
      await node.close();
    }
    expect(fs.readFileSync(file).equals(expected)).to.equal(true);
  });

  itLoop('a device that shrinks away underneath gives EIO and one log line, not a crash', async () => {
    const file = randomFile('gone.img', 2 * MiB);
    const dev = await loopDevice(file);
    const node = await FileNode.open(dev, { readOnly: true });
    try {
      const buf = Buffer.alloc(4096);
      await node.read(MiB, buf);
      // What a detached loop device looks like to an open descriptor: it ends at 0.
      fs.truncateSync(file, 0);
      await runOk('losetup', ['-c', dev]);
      const { lines } = await capturingStderr(async () => {
        for (let i = 0; i < 3; i++) {
          const err = await node.read(MiB, buf).then(() => undefined, (e: unknown) => e);
          expect(err, 'read after the device went away').to.be.instanceOf(Error);
          expect((err as { errno?: number }).errno).to.equal(5);
        }
      });
      expect(lines.filter((l) => l.startsWith('tsmount: ') && l.includes(dev))).to.have.length(1);
    } finally {
      await node.close().catch(() => undefined);
    }
  });

  itLoop('through a mount, a device that goes away gives EIO to the reader and the mount stays', async () => {
    const file = randomFile('gone-mnt.img', 3 * MiB);
    const dev = await loopDevice(file);
    const mp = path.join(tmp.dir, 'mnt-gone');
    fs.mkdirSync(mp);
    await mounts.mount(['-f', 'raw', dev, mp]);
    const flat = path.join(mp, `${path.basename(dev)}.raw`);
    const fh = await fs.promises.open(flat, 'r');
    try {
      const buf = Buffer.alloc(4096);
      await fh.read(buf, 0, buf.length, 0);
      expect(buf.equals(fs.readFileSync(file).subarray(0, 4096))).to.equal(true);
      fs.truncateSync(file, 0);
      await runOk('losetup', ['-c', dev]);
      const err = await fh.read(buf, 0, buf.length, 2 * MiB).then(() => undefined, (e: NodeJS.ErrnoException) => e);
      expect(err?.code).to.equal('EIO');
    } finally {
      await fh.close();
    }
    expect(fs.statSync(flat).size).to.equal(3 * MiB);
    await mounts.unmount(mp);
  });

  itLoop('mounting a host device --rw prints the host-disk warning once; the flat file is the device', async () => {
    const file = randomFile('part.img', 3 * MiB);
    const dev = await loopDevice(file);
    const mp = path.join(tmp.dir, 'mnt-rw');
    fs.mkdirSync(mp);
    mounts.track(mp);
    const r = await tsmount(['--rw', '-f', 'raw', dev, mp]);
    expect(r.code, r.stderr).to.equal(0);
    const warnings = (r.stdout + r.stderr).split('\n').filter((l) => l.includes('WARNING') && l.includes('READ-ONLY'));
    expect(warnings).to.have.length(1);
    const flat = path.join(mp, `${path.basename(dev)}.raw`);
    expect(await md5File(flat)).to.equal(await md5File(file));
    await mounts.unmount(mp);
    const ro = await tsmount(['-f', 'raw', dev, mp]);
    mounts.track(mp);
    expect(ro.code, ro.stderr).to.equal(0);
    expect(ro.stderr).not.to.include('WARNING');
  });

  describe('removable media, against a fake drive', () => {
    class FakeDrive implements MediumIoctls {
      status = CDS_NO_DISC;
      bytes = 0;
      changed = 0;
      driveStatus = (): number => this.status;
      mediaChanged = (): number => {
        const c = this.changed;
        this.changed = 0;
        return c;
      };
      size = (): number => {
        if (this.status !== CDS_DISC_OK) throw new Error('ENOMEDIUM');
        return this.bytes;
      };
      insert(bytes: number): void {
        this.status = CDS_DISC_OK;
        this.bytes = bytes;
        this.changed = 1;
      }
      eject(): void {
        this.status = CDS_TRAY_OPEN;
        this.bytes = 0;
        this.changed = 1;
      }
    }

    itLoop('opens with no medium, follows insertion, a change of size and removal', async () => {
      const file = randomFile('cd.img', 2 * MiB);
      const dev = await loopDevice(file);
      const drive = new FakeDrive();
      const log: string[] = [];
      const { value: node } = await capturingStderr(() => FileNode.open(dev, { readOnly: true, medium: drive, mediumPollMs: 0 }));
      try {
        expect(node.size).to.equal(0);
        expect(node.mediumGeneration).to.equal(0);
        const buf = Buffer.alloc(2048);
        const noMedium = await node.read(0, buf).then(() => undefined, (e: unknown) => e);
        expect((noMedium as { errno?: number }).errno).to.equal(ENOMEDIUM);

        drive.insert(MiB);
        const { lines } = await capturingStderr(async () => node.size);
        log.push(...lines);
        expect(node.size).to.equal(MiB);
        await node.read(2048, buf);
        expect(buf.equals(fs.readFileSync(file).subarray(2048, 4096))).to.equal(true);

        drive.insert(2 * MiB);
        expect(node.size).to.equal(2 * MiB);
        await node.read(MiB + 2048, buf);

        drive.eject();
        const gen = node.mediumGeneration!;
        const removed = await capturingStderr(() => node.read(0, buf).then(() => undefined, (e: unknown) => e));
        expect((removed.value as { errno?: number }).errno).to.equal(ENOMEDIUM);
        expect(node.size).to.equal(0);
        expect(node.mediumGeneration).to.be.above(gen - 1);
        expect(log.some((l) => l.includes('medium inserted'))).to.equal(true);
      } finally {
        await node.close();
      }
    });

    it('the medium layer alone: a floppy (no CD-ROM ioctls) is known by its size; a swap of same size is a change', () => {
      const drive = { status: -25, bytes: 0, changed: 0 };
      const io: MediumIoctls = { driveStatus: () => drive.status, mediaChanged: () => drive.changed, size: () => drive.bytes };
      const lines: string[] = [];
      const m = new RemovableMedium(3, '/dev/fd0', io, 0, (l) => lines.push(l));
      expect(m.size).to.equal(0);
      drive.bytes = 1474560;
      expect(m.size).to.equal(1474560);
      expect(m.generation).to.equal(1);
      expect(m.check(512, 1)).to.equal(0);
      expect(m.check(512, 0)).to.equal(5);
      expect(m.check(1474561, 1)).to.equal(5);
      drive.changed = 1;
      expect(m.refresh()).to.equal(true);
      expect(m.generation).to.equal(2);
      drive.changed = 0;
      drive.bytes = 0;
      expect(m.size).to.equal(0);
      expect(m.check(512, 3)).to.equal(ENOMEDIUM);
      expect(lines).to.deep.equal(['/dev/fd0: medium inserted (1474560 bytes)', '/dev/fd0: medium changed (1474560 bytes)', '/dev/fd0: medium removed']);
    });

    itLoop('an image on an empty drive opens as a raw disk of no bytes and follows the medium', async () => {
      const file = randomFile('cd2.img', MiB);
      const dev = await loopDevice(file);
      const drive = new FakeDrive();
      const fileProto = protocolFor(dev);
      const open = fileProto.open;
      // The fake drive goes in through the protocol's open (the graph builder calls it).
      fileProto.open = (spec, opts) => FileNode.open(spec, { readOnly: opts.readOnly, medium: drive, mediumPollMs: 0 });
      try {
        const node = await openImage(dev, { readOnly: true, cache: 'writeback', metadataCacheBytes: MiB, locking: 'off', forceShare: false, shareRw: false });
        try {
          expect(node.size).to.equal(0);
          drive.insert(MiB);
          expect(node.size).to.equal(MiB);
          const buf = Buffer.alloc(4096);
          await node.read(0, buf);
          expect(buf.equals(fs.readFileSync(file).subarray(0, 4096))).to.equal(true);
        } finally {
          await node.close();
        }
      } finally {
        fileProto.open = open;
      }
    });
  });

  describe('NVMe by PCI address, against a fake sysfs', () => {
    function fakeSysfs(): { sys: string; dev: string } {
      const sys = path.join(tmp.dir, `sys-${crypto.randomBytes(4).toString('hex')}`);
      const drivers = path.join(sys, 'bus/pci/drivers');
      fs.mkdirSync(path.join(drivers, 'nvme'), { recursive: true });
      fs.mkdirSync(path.join(drivers, 'vfio-pci'), { recursive: true });
      const devices = path.join(sys, 'bus/pci/devices');
      // A controller on nvme with namespaces 1 and 2, one on vfio-pci, one on no driver.
      const a = path.join(devices, '0000:01:00.0');
      for (const ns of ['nvme0n1', 'nvme0n2']) {
        fs.mkdirSync(path.join(a, 'nvme/nvme0', ns), { recursive: true });
        fs.writeFileSync(path.join(a, 'nvme/nvme0', ns, 'nsid'), `${ns.slice(-1)}\n`);
      }
      fs.symlinkSync('../../../bus/pci/drivers/nvme', path.join(a, 'driver'));
      const b = path.join(devices, '0000:02:00.0');
      fs.mkdirSync(b, { recursive: true });
      fs.symlinkSync('../../../bus/pci/drivers/vfio-pci', path.join(b, 'driver'));
      fs.mkdirSync(path.join(devices, '0000:03:00.0'), { recursive: true });
      const dev = path.join(sys, 'dev');
      fs.mkdirSync(dev);
      return { sys, dev };
    }

    it('parses nvme:// and --image-opts, and resolves a namespace to its block device', () => {
      const { sys, dev } = fakeSysfs();
      expect(parseNvmeUri('nvme://0000:01:00.0/2')).to.deep.equal({ device: '0000:01:00.0', namespace: 2 });
      expect(imageOptsToSpec('driver=nvme,device=0000:01:00.0,namespace=2')).to.deep.equal({ spec: 'nvme://0000:01:00.0/2', format: 'raw' });
      expect(imageOptsToSpec('driver=raw,file.driver=nvme,file.device=0000:01:00.0')).to.deep.equal({ spec: 'nvme://0000:01:00.0/1', format: 'raw' });
      expect(resolveNvme(parseNvmeUri('nvme://0000:01:00.0/1'), sys, dev)).to.equal(path.join(dev, 'nvme0n1'));
      expect(resolveNvme(parseNvmeUri('nvme://0000:01:00.0/2'), sys, dev)).to.equal(path.join(dev, 'nvme0n2'));
    });

    it('refuses, in one line naming what was asked: vfio-pci, a missing namespace, a wrong address, no driver, bad syntax', () => {
      const { sys, dev } = fakeSysfs();
      const msg = (spec: string): string => {
        try {
          resolveNvme(parseNvmeUri(spec), sys, dev);
        } catch (err) {
          return messageOf(err);
        }
        return 'no error';
      };
      expect(msg('nvme://0000:02:00.0/1')).to.match(/^nvme:\/\/0000:02:00\.0\/1: .*vfio-pci.*userspace NVMe driver/);
      expect(msg('nvme://0000:01:00.0/3')).to.equal('nvme://0000:01:00.0/3: namespace 3 not found on 0000:01:00.0 (it has 1, 2)');
      expect(msg('nvme://0000:09:00.0/1')).to.equal('nvme://0000:09:00.0/1: no PCI device 0000:09:00.0');
      expect(msg('nvme://0000:03:00.0/1')).to.match(/bound to no driver/);
      expect(msg('nvme://01:00.0/1')).to.match(/is not a PCI address/);
      expect(msg('nvme://0000:01:00.0/0')).to.match(/not an NVMe namespace number/);
      expect(msg('nvme://0000:01:00.0')).to.match(/expected nvme:\/\/DOMAIN/);
      for (const m of ['nvme://0000:02:00.0/1', 'nvme://0000:01:00.0/3']) expect(msg(m)).not.to.include('\n');
    });

    itLoop('opens the namespace block device it found (a loop device standing in for nvme0n1)', async () => {
      const { sys, dev } = fakeSysfs();
      const file = randomFile('nvme.img', MiB);
      const loop = await loopDevice(file);
      fs.symlinkSync(loop, path.join(dev, 'nvme0n1'));
      const node = await makeNvmeProtocol(sys, dev).open('nvme://0000:01:00.0/1', { readOnly: true, cache: 'writeback' });
      try {
        expect(node.size).to.equal(MiB);
        const buf = Buffer.alloc(4096);
        await node.read(8192, buf);
        expect(buf.equals(fs.readFileSync(file).subarray(8192, 8192 + 4096))).to.equal(true);
      } finally {
        await node.close();
      }
    });

    it('tsmount with a wrong NVMe address fails in one line, quickly', async () => {
      const mp = path.join(tmp.dir, 'mnt-nvme');
      fs.mkdirSync(mp, { recursive: true });
      const r = await tsmount(['nvme://0000:ff:1f.7/1', mp], { timeoutMs: 20_000 });
      expect(r.code).not.to.equal(0);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.include('nvme://0000:ff:1f.7/1: no PCI device 0000:ff:1f.7');
    });
  });

  describe('host drive names of other systems', () => {
    it('parses Windows and macOS names and says they are not supported here', async () => {
      expect(parseForeignHostName('\\\\.\\PhysicalDrive3')).to.deep.equal({ system: 'windows', kind: 'physical-drive', index: 3 });
      expect(parseForeignHostName('d:')).to.deep.equal({ system: 'windows', kind: 'drive-letter', letter: 'D' });
      expect(parseForeignHostName('\\\\.\\E:')).to.deep.equal({ system: 'windows', kind: 'drive-letter', letter: 'E' });
      expect(parseForeignHostName('/dev/rdisk2s1')).to.deep.equal({ system: 'macos', kind: 'disk', index: 2, raw: true, slice: 1 });
      expect(parseForeignHostName('/dev/sda')).to.equal(undefined);
      for (const name of ['\\\\.\\PhysicalDrive0', 'd:', '/dev/disk4']) {
        const err = await protocolFor(name).open(name, { readOnly: true, cache: 'writeback' }).then(() => undefined, (e: unknown) => e);
        expect(messageOf(err)).to.match(/not supported on this platform \(linux\)$/);
      }
    });

    it('tsmount d: fails with one line', async () => {
      const mp = path.join(tmp.dir, 'mnt-win');
      fs.mkdirSync(mp, { recursive: true });
      const r = await run(process.execPath, [path.resolve('dist/mount-helpers/tsmount.js'), 'd:', mp], { timeoutMs: 20_000 });
      expect(r.code).not.to.equal(0);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.include('Windows drive D:');
    });
  });
});
