// tsmount --list against live mounts (what is mounted where, the chain, ro/rw, the pid,
// the counters the server publishes, GPT partition names), and --layers: each layer of
// a backing chain as its own read-only file, equal to qemu-img convert of that layer.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { qemuIo, rawMd5, runOk, tempDir, md5File } from './helpers/qemu.js';
import { MountTracker, mountedPid, tsmount, mountpointIn } from './helpers/mount.js';
import { pattern, writeSynced } from './helpers/images.js';
import type { ListedMount } from '../mount-helpers/list.js';

const MiB = 1 << 20;

async function list(): Promise<ListedMount[]> {
  const r = await tsmount(['--list', '--output', 'json']);
  expect(r.code, r.stderr).to.equal(0);
  return JSON.parse(r.stdout) as ListedMount[];
}

describe('tsmount --list and --layers', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let base: string;
  let mid: string;
  let top: string;

  before(async () => {
    tmp = tempDir('list-layers');
    base = path.join(tmp.dir, 'base.qcow2');
    mid = path.join(tmp.dir, 'mid.qcow2');
    top = path.join(tmp.dir, 'top.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', base, '8M']);
    await qemuIo(base, 'qcow2', ['write -P 0x11 0 4M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', mid]);
    await qemuIo(mid, 'qcow2', ['write -P 0x22 1M 2M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', top]);
    await qemuIo(top, 'qcow2', ['write -P 0x33 2M 64k']);
  });
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const mp = (name: string): string => mountpointIn(tmp.dir, name);

  it('--layers shows each layer read-only, equal to qemu-img convert of it', async function () {
    const dir = mp('layers');
    await mounts.mount(['--rw', '-o', 'layers', top, dir]);
    expect(fs.readdirSync(dir).sort()).to.deep.equal(['top.raw', 'top@base.raw', 'top@mid.raw']);
    expect(await md5File(path.join(dir, 'top.raw'))).to.equal(await rawMd5(top, 'qcow2'));
    expect(await md5File(path.join(dir, 'top@mid.raw'))).to.equal(await rawMd5(mid, 'qcow2'));
    expect(await md5File(path.join(dir, 'top@base.raw'))).to.equal(await rawMd5(base, 'qcow2'));
    expect(() => fs.openSync(path.join(dir, 'top@mid.raw'), 'r+')).to.throw(/EROFS|EACCES/);
    await mounts.unmount(dir);
  });

  it('--list names the mount, its chain, ro/rw, the pid and the counters; JSON and human', async function () {
    const dir = mp('listed');
    await mounts.mount(['--rw', '--cache-size', '8M', top, dir]);
    const flat = path.join(dir, 'top.raw');
    writeSynced(flat, 4 * MiB, pattern(MiB, 5));
    fs.readFileSync(flat);
    // The server publishes its counters about once a second.
    let m: ListedMount | undefined;
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      m = (await list()).find((x) => x.mountpoint === dir);
      if (m?.counters && m.counters.bytesWritten >= MiB && m.counters.bytesRead >= 8 * MiB) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    expect(m, 'listed').to.not.equal(undefined);
    expect(m!.pid).to.equal(mountedPid(dir));
    expect(m!.readOnly).to.equal(false);
    expect(m!.source).to.equal(`tsmount#${top}`);
    expect(m!.chains).to.deep.equal([[
      { file: top, format: 'qcow2' },
      { file: mid, format: 'qcow2' },
      { file: base, format: 'qcow2' },
    ]]);
    const c = m!.counters!;
    expect(c.bytesWritten).to.be.at.least(MiB);
    expect(c.bytesRead).to.be.at.least(8 * MiB);
    expect(c.writes).to.be.greaterThan(0);
    expect(c.reads).to.be.greaterThan(0);
    expect(c.errors).to.equal(0);
    expect(c.inFlight).to.equal(0);
    expect(c.cacheHits + c.cacheMisses).to.be.greaterThan(0);
    const human = await tsmount(['--list']);
    expect(human.stdout).to.include(`${dir}: read-write, server pid ${m!.pid}`);
    expect(human.stdout).to.include(`image ${top} (qcow2) <- ${mid} (qcow2) <- ${base} (qcow2)`);
    await mounts.unmount(dir);
    expect((await list()).find((x) => x.mountpoint === dir)).to.equal(undefined);
  });

  it('--list shows GPT partition names of a --partitions mount', async function () {
    const raw = path.join(tmp.dir, 'gpt.raw');
    fs.writeFileSync(raw, Buffer.alloc(32 * MiB));
    await runOk('sgdisk', ['-n', '1:2048:+4M', '-c', '1:EFI system', '-n', '2:0:+8M', raw]);
    const dir = mp('gpt');
    await mounts.mount(['--partitions', raw, dir]);
    const m = (await list()).find((x) => x.mountpoint === dir)!;
    expect(m.readOnly).to.equal(true);
    expect(m.files!.filter((f) => f.partition)).to.deep.equal([
      { name: 'gpt-p1.raw', writable: false, partition: { number: 1, scheme: 'gpt', name: 'EFI system' } },
      { name: 'gpt-p2.raw', writable: false, partition: { number: 2, scheme: 'gpt' } },
    ]);
    const human = await tsmount(['--list']);
    expect(human.stdout).to.include("file gpt-p1.raw (read-only): partition 1 (gpt, 'EFI system')");
    await mounts.unmount(dir);
  });
});
