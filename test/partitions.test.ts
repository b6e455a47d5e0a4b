// --partitions through real mounts: disks partitioned by sfdisk (MBR with logical
// partitions) and sgdisk (GPT), each partition file equal to those bytes of the disk;
// an ext4 made through a partition file of a read-write mount, checked by e2fsck -n and
// loop-mounted through that file, then the image judged by qemu-img check.
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { checkImage, run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount, mountpointIn } from './helpers/mount.js';
import { pattern, readBytes } from './helpers/images.js';

const MiB = 1 << 20;
const S = 512;

function md5(b: Uint8Array): string {
  return crypto.createHash('md5').update(b).digest('hex');
}

/** The bytes [start, start+length) of a file, by md5. */
function md5Range(file: string, start: number, length: number): string {
  return md5(readBytes(file, start, length));
}

describe('tsmount --partitions: MBR and GPT partitions as files', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  /** Loop devices and loop mounts a test made, undone even when it fails. */
  const loops: string[] = [];
  const loopMounts: string[] = [];

  before(() => {
    tmp = tempDir('partitions');
  });
  afterEach(async () => {
    for (const m of loopMounts.splice(0)) await run('umount', [m]);
    for (const l of loops.splice(0)) await run('losetup', ['-d', l]);
    await mounts.cleanup();
  });
  after(() => tmp.cleanup());

  const mp = (name: string): string => mountpointIn(tmp.dir, name);

  /** A 64 MiB raw disk with a pattern in each place a partition will be. */
  function patternedDisk(name: string): string {
    const file = path.join(tmp.dir, name);
    const disk = Buffer.alloc(64 * MiB);
    for (let i = 1; i < 64; i++) pattern(MiB, i).copy(disk, i * MiB);
    fs.writeFileSync(file, disk);
    return file;
  }

  it('shows primary and logical MBR partitions (sfdisk), each equal to its bytes of the disk', async function () {
    const raw = patternedDisk('mbr.raw');
    // Primary 1, extended 2 holding logical 5 and 6, primary 3.
    execFileSync('sfdisk', ['-q', raw], {
      input: 'label: dos\nstart=2048, size=20480, type=83\nstart=22528, size=40960, type=5\nstart=24576, size=8192, type=83\nstart=34816, size=8192, type=7\nstart=65536, size=40960, type=83\n',
    });
    const img = path.join(tmp.dir, 'mbr.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
    const dir = mp('mbr');
    await mounts.mount(['-o', 'partitions', img, dir]);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['mbr-p1.raw', 'mbr-p3.raw', 'mbr-p5.raw', 'mbr-p6.raw', 'mbr.raw']);
    const want: [string, number, number][] = [
      ['mbr-p1.raw', 2048, 20480],
      ['mbr-p3.raw', 65536, 40960],
      ['mbr-p5.raw', 24576, 8192],
      ['mbr-p6.raw', 34816, 8192],
    ];
    for (const [name, start, count] of want) {
      const f = path.join(dir, name);
      expect(fs.statSync(f).size, name).to.equal(count * S);
      expect(md5(fs.readFileSync(f)), name).to.equal(md5Range(raw, start * S, count * S));
    }
    // Read-only like the mount.
    expect(() => fs.openSync(path.join(dir, 'mbr-p1.raw'), 'r+')).to.throw(/EROFS|EACCES/);
    await mounts.unmount(dir);
  });

  it('shows GPT partitions (sgdisk), each equal to its bytes of the disk', async function () {
    const raw = patternedDisk('gpt.raw');
    await runOk('sgdisk', ['-n', '1:2048:+8M', '-c', '1:efi', '-n', '2:0:+16M', '-c', '2:root', '-n', '4:0:+4M', raw]);
    const img = path.join(tmp.dir, 'gpt.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
    const dir = mp('gpt');
    await mounts.mount(['--partitions', img, dir]);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['gpt-p1.raw', 'gpt-p2.raw', 'gpt-p4.raw', 'gpt.raw']);
    const table = JSON.parse(execFileSync('sfdisk', ['--json', raw]).toString()) as { partitiontable: { partitions: { node: string; start: number; size: number }[] } };
    for (const p of table.partitiontable.partitions) {
      const n = /(\d+)$/.exec(p.node)![1];
      const f = path.join(dir, `gpt-p${n}.raw`);
      expect(fs.statSync(f).size).to.equal(p.size * S);
      expect(md5(fs.readFileSync(f)), f).to.equal(md5Range(raw, p.start * S, p.size * S));
    }
    await mounts.unmount(dir);

    // The primary GPT header wiped: the same partitions come from sgdisk's backup at the end, with a log line.
    const fd = fs.openSync(raw, 'r+');
    fs.writeSync(fd, Buffer.alloc(S), 0, S, S);
    fs.closeSync(fd);
    const wiped = path.join(tmp.dir, 'gpt-wiped.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, wiped]);
    const log = path.join(tmp.dir, 'gpt-wiped.log');
    await mounts.mount(['--partitions', '--log', log, wiped, dir]);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['gpt-wiped-p1.raw', 'gpt-wiped-p2.raw', 'gpt-wiped-p4.raw', 'gpt-wiped.raw']);
    for (const p of table.partitiontable.partitions) {
      const n = /(\d+)$/.exec(p.node)![1];
      expect(md5(fs.readFileSync(path.join(dir, `gpt-wiped-p${n}.raw`)))).to.equal(md5Range(raw, p.start * S, p.size * S));
    }
    expect(fs.readFileSync(log, 'utf8')).to.match(/primary GPT: no GPT header at LBA 1; read the backup GPT at the end of the disk/);
    await mounts.unmount(dir);
  });

  it('writes an ext4 through a partition file that e2fsck -n and a loop mount accept; qemu-img check stays clean', async function () {
    const img = path.join(tmp.dir, 'fs.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, '128M']);
    const dir = mp('fs');
    // Partition the disk through the mount, then remount so the table is read.
    await mounts.mount(['--rw', img, dir]);
    execFileSync('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', path.join(dir, 'fs.raw')], { input: 'label: dos\nstart=2048, size=61440, type=83\nstart=63488, type=5\nstart=65536, size=40960, type=83\n' });
    await mounts.unmount(dir);
    await mounts.mount(['--rw', '--partitions', img, dir]);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['fs-p1.raw', 'fs-p5.raw', 'fs.raw']);
    const p5 = path.join(dir, 'fs-p5.raw');
    await runOk('mkfs.ext4', ['-q', '-F', '-L', 'logical', p5]);
    await runOk('e2fsck', ['-n', '-f', p5]);
    // A loop device over the partition file, mounted as ext4: write a file through it.
    const loop = (await runOk('losetup', ['--find', '--show', p5])).trim();
    loops.push(loop);
    const inner = mp('inner');
    await runOk('mount', ['-t', 'ext4', loop, inner]);
    loopMounts.push(inner);
    fs.writeFileSync(path.join(inner, 'hello.txt'), 'written through a partition file\n');
    await runOk('umount', [loopMounts.pop()!]);
    await runOk('losetup', ['-d', loops.pop()!]);
    await mounts.unmount(dir);
    expect((await checkImage(img, 'qcow2')).code, 'qemu-img check').to.equal(0);
    // Read back read-only, as a new mount: the file system is whole and holds the file.
    await mounts.mount(['--partitions', img, dir]);
    await runOk('e2fsck', ['-n', '-f', p5]);
    const listing = await runOk('debugfs', ['-R', 'cat /hello.txt', p5]);
    expect(listing).to.equal('written through a partition file\n');
    // Partition 1 was never written: zeros.
    expect(fs.readFileSync(path.join(dir, 'fs-p1.raw')).every((b) => b === 0)).to.equal(true);
    await mounts.unmount(dir);
  });

  it('mounts a disk with a hostile table: only sound partitions shown, the rest named in the log', async function () {
    const raw = path.join(tmp.dir, 'hostile.raw');
    const disk = Buffer.alloc(16 * MiB);
    const entry = (at: number, i: number, type: number, start: number, count: number): void => {
      const o = at + 446 + 16 * i;
      disk[o + 4] = type;
      disk.writeUInt32LE(start, o + 8);
      disk.writeUInt32LE(count, o + 12);
      disk.writeUInt16LE(0xaa55, at + 510);
    };
    entry(0, 0, 0x83, 2048, 4096);
    entry(0, 1, 0x83, 4096, 4096); // overlaps partition 1
    entry(0, 2, 0x83, 16384, 0x7fffffff); // far past the end
    entry(0, 3, 0x05, 10240, 4096); // extended: a chain of EBRs that loops
    entry(10240 * S, 0, 0x83, 1, 100);
    entry(10240 * S, 1, 0x05, 200, 1);
    entry((10240 + 200) * S, 0, 0x83, 1, 100);
    entry((10240 + 200) * S, 1, 0x05, 200, 1); // the second EBR's link: itself
    fs.writeFileSync(raw, disk);
    const dir = mp('hostile');
    const log = path.join(tmp.dir, 'hostile.log');
    await mounts.mount(['--partitions', '--log', log, raw, dir]);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['hostile-p1.raw', 'hostile-p5.raw', 'hostile-p6.raw', 'hostile.raw']);
    const said = fs.readFileSync(log, 'utf8');
    expect(said).to.match(/partition 2 overlaps partition 1/).and.match(/partition 3 reaches past the end/).and.match(/loops back/);
    await mounts.unmount(dir);
  });

  it('refuses --partitions over a regular-file mountpoint with one line', async function () {
    const img = path.join(tmp.dir, 'plain.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    const over = path.join(tmp.dir, 'over.raw');
    fs.writeFileSync(over, '');
    const r = await tsmount(['--partitions', img, over]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    expect(r.stderr).to.match(/--partitions needs a directory/);
  });
});
