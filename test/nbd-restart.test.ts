// A --rw mount over a real qemu-nbd that is killed in the middle of a write stream and
// started again (issue 20's reliability table: the NBD row). What a user of the mount
// must see: the writer and readers get EIO within seconds while the server is gone (no hang),
// the mount's server lives on and says why in its log, the mount serves again once the
// NBD server is back, and every write an fsync acknowledged before the kill is in the
// image (qemu-img check and the bytes, read back by qemu-img). Needs qemu-utils.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, convertToRaw, createImage, tempDir } from './helpers/qemu.js';
import { MountTracker, mountedPid, mountpointIn } from './helpers/mount.js';
import { pattern, readBytes } from './helpers/images.js';
import { freePort, startServer, type RunningServer } from './helpers/servers.js';

const MiB = 1 << 20;

/** Write `data` at `offset` of the flat file and fsync it; asynchronous (unlike helpers/images.ts writeSynced), so a mount that hangs meets the test timeout instead of blocking it. */
async function writeFsynced(file: string, offset: number, data: Buffer): Promise<void> {
  const fh = await fs.promises.open(file, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function readAt(file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await fs.promises.open(file, 'r');
  try {
    const b = Buffer.alloc(length);
    const { bytesRead } = await fh.read(b, 0, length, offset);
    return b.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

async function errorOf(p: Promise<unknown>): Promise<NodeJS.ErrnoException | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    return err as NodeJS.ErrnoException;
  }
}

describe('NBD: a mount outlives its server being killed and restarted', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  const mounts = new MountTracker();
  let server: RunningServer | undefined;

  before(() => {
    tmp = tempDir('nbd-restart');
  });
  afterEach(async () => {
    await mounts.cleanup();
    await server?.stop();
    server = undefined;
  });
  after(() => tmp.cleanup());

  it('a --rw mount: EIO within seconds while qemu-nbd is gone, serving again after its restart, every fsynced write kept', async () => {
    const img = path.join(tmp.dir, 'disk.qcow2');
    await createImage(img, 'qcow2', '64M');
    const port = await freePort();
    const nbdArgs = ['-t', '-f', 'qcow2', '-x', 'vm', '-b', '127.0.0.1', '-p', String(port), img];
    server = await startServer('qemu-nbd', nbdArgs, { port });
    const mp = mountpointIn(tmp.dir, 'mp');
    const log = path.join(tmp.dir, 'mount.log');
    await mounts.mount(['--rw', '--log', log, `nbd://127.0.0.1:${port}/vm`, mp]);
    const pid = mountedPid(mp);
    const flat = path.join(mp, 'vm.raw');

    const acknowledged = pattern(8 * MiB, 1);
    await writeFsynced(flat, 0, acknowledged);

    // A writer streams 1 MiB writes from 16 MiB on, 40 MiB and an fsync at a time, over and
    // over until one fails: the server is killed under it. (A single 40 MiB dd could finish
    // before the kill on a fast machine and exit 0: CI saw that once.)
    const ddArgs = `if=/dev/urandom of='${flat}' bs=1M seek=16 count=40 conv=notrunc,fsync status=none`;
    const writer = spawn('sh', ['-c', `while dd ${ddArgs}; do :; done; exit 1`], { stdio: ['ignore', 'ignore', 'pipe'] });
    mounts.trackChild(writer);
    const writerDone = new Promise<number>((resolve) => writer.once('exit', (code) => resolve(code ?? -1)));
    await new Promise((r) => setTimeout(r, 200));
    server.child.kill('SIGKILL');
    await server.stop();

    // While it is gone: the writer fails, and so does a reader, each within seconds.
    const t = Date.now();
    expect(await writerDone, 'dd into the mount while the NBD server is gone').to.not.equal(0);
    const readErr = await errorOf(readAt(flat, 0, MiB));
    expect(readErr?.code).to.equal('EIO');
    expect(Date.now() - t).to.be.below(20_000);
    expect(mountedPid(mp), 'the mount is still served').to.equal(pid);

    // Back again: the mount reconnects (after its back-off) and serves what was acknowledged.
    server = await startServer('qemu-nbd', nbdArgs, { port });
    const deadline = Date.now() + 20_000;
    let back: Buffer | undefined;
    while (!back) {
      back = await readAt(flat, 0, MiB).catch(() => undefined);
      if (back) break;
      if (Date.now() > deadline) throw new Error('no read through the mount succeeded within 20 s of the NBD server restarting');
      await new Promise((r) => setTimeout(r, 250));
    }
    expect(back.equals(acknowledged.subarray(0, MiB))).to.equal(true);

    const later = pattern(4 * MiB, 3);
    await writeFsynced(flat, 32 * MiB, later);
    expect((await readAt(flat, 0, 8 * MiB)).equals(acknowledged)).to.equal(true);
    await mounts.unmount(mp);
    await server.stop();
    server = undefined;

    const lines = fs.readFileSync(log, 'utf8').split('\n');
    expect(lines.some((l) => /the NBD server is unreachable|closed the connection/.test(l)), lines.join('\n')).to.equal(true);
    expect(lines.some((l) => /reconnected to the NBD server/.test(l)), lines.join('\n')).to.equal(true);

    // The image: consistent (a kill mid-allocation may leak clusters, never corrupt), and holding every acknowledged write.
    const c = await checkImage(img, 'qcow2');
    expect(c.corruptions, c.output).to.equal(0);
    const raw = path.join(tmp.dir, 'out.raw');
    await convertToRaw(img, raw, 'qcow2');
    expect(readBytes(raw, 0, 8 * MiB).equals(acknowledged)).to.equal(true);
    expect(readBytes(raw, 32 * MiB, 4 * MiB).equals(later)).to.equal(true);
  });

  it('with reconnect-delay in the URI, a reader of the mount sees no error while qemu-nbd is killed and restarted mid-read', async () => {
    const data = pattern(32 * MiB, 7);
    const port = await freePort();
    const nbdArgs = ['-t', '-r', '-f', 'raw', '-x', 'vm', '-b', '127.0.0.1', '-p', String(port), path.join(tmp.dir, 'data.raw')];
    fs.writeFileSync(path.join(tmp.dir, 'data.raw'), data);
    server = await startServer('qemu-nbd', nbdArgs, { port });
    const mp = mountpointIn(tmp.dir, 'mp-ro');
    const log = path.join(tmp.dir, 'mount-ro.log');
    await mounts.mount(['--log', log, `nbd://127.0.0.1:${port}/vm?reconnect-delay=15`, mp]);
    const flat = path.join(mp, 'vm.raw');

    // 1 MiB at a time; the kernel's readahead runs about a megabyte ahead, so the reads
    // after the kill reach the mount while the server is away and must wait for it.
    const fh = await fs.promises.open(flat, 'r');
    const got = Buffer.alloc(data.length);
    try {
      for (let off = 0; off < data.length; off += MiB) {
        if (off === 8 * MiB) {
          server.child.kill('SIGKILL');
          await server.stop();
          const restarted = (async () => {
            await new Promise((r) => setTimeout(r, 1500));
            server = await startServer('qemu-nbd', nbdArgs, { port });
          })();
          await fh.read(got, off, MiB, off);
          await restarted;
          continue;
        }
        await fh.read(got, off, MiB, off);
      }
    } finally {
      await fh.close();
    }
    expect(got.equals(data)).to.equal(true);
    await mounts.unmount(mp);
    expect(fs.readFileSync(log, 'utf8')).to.match(/reconnected to the NBD server/);
  });
});
