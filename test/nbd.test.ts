// NBD against real servers on loopback (qemu-nbd, nbdkit) and a misbehaving one,
// judged by qemu-img. Needs qemu-utils and nbdkit.
import { expect } from 'chai';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { BlockNode } from '../drivers/types.js';
import { openImage, type ImageOptions } from '../drivers/open.js';
import { NbdNode } from '../drivers/protocol/nbd/node.js';
import { IoError, TsmountError } from '../drivers/errors.js';
import { NBD_MAGIC, NBD_OPTS_MAGIC, NBD_REP_MAGIC, NBD_OPT, NBD_REP, NBD_INFO, NBD_SIMPLE_REPLY_MAGIC } from '../drivers/protocol/nbd/constants.js';
import { checkImage, createImage, md5File, qemuIo, rawMd5, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { nodeMd5, pattern, testOptions } from './helpers/images.js';
import { freePort, startServer, type RunningServer } from './helpers/servers.js';

const MiB = 1 << 20;

const ro: ImageOptions = testOptions({ metadataCacheBytes: 4 * MiB });
const rw: ImageOptions = { ...ro, readOnly: false };

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; result?: T; error?: unknown }> {
  const t = Date.now();
  try {
    const result = await fn();
    return { ms: Date.now() - t, result };
  } catch (error) {
    return { ms: Date.now() - t, error };
  }
}

describe('NBD: images on NBD servers', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  const servers: RunningServer[] = [];
  const mounts = new MountTracker();
  let qcow2: string;
  let base: string;
  let top: string;

  const serve = async (cmd: string, args: string[], ready: { port: number } | { path: string }): Promise<RunningServer> => {
    const s = await startServer(cmd, args, ready);
    servers.push(s);
    return s;
  };

  before(async () => {
    tmp = tempDir('nbd');
    qcow2 = path.join(tmp.dir, 'disk.qcow2');
    await createImage(qcow2, 'qcow2', '64M');
    await qemuIo(qcow2, 'qcow2', ['write -P 0x11 0 1M', 'write -P 0x22 5M 3M', 'write -z 20M 1M', 'write -P 0x33 63M 512k']);
    // A chain for the backing test, relative names as users make them.
    const chainDir = path.join(tmp.dir, 'chain');
    fs.mkdirSync(chainDir);
    base = path.join(chainDir, 'base.qcow2');
    top = path.join(chainDir, 'top.qcow2');
    await createImage(base, 'qcow2', '32M');
    await qemuIo(base, 'qcow2', ['write -P 0x44 0 4M', 'write -P 0x45 16M 1M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '32M'], { cwd: chainDir });
    await qemuIo(top, 'qcow2', ['write -P 0x55 2M 1M', 'write -z 16M 64k']);
  });
  afterEach(() => mounts.cleanup());
  after(async () => {
    await Promise.allSettled(servers.map((s) => s.stop()));
    tmp.cleanup();
  });

  it('reads a qcow2 that qemu-nbd serves as raw, byte-identical to qemu-img', async () => {
    const port = await freePort();
    await serve('qemu-nbd', ['-t', '-r', '-x', 'vm', '-f', 'qcow2', '-b', '127.0.0.1', '-p', String(port), qcow2], { port });
    const node = await openImage(`nbd://127.0.0.1:${port}/vm`, ro);
    try {
      expect(node.size).to.equal(64 * MiB);
      expect(await nodeMd5(node, 4 * MiB)).to.equal(await rawMd5(qcow2));
      // qemu-nbd answers base:allocation: holes and zeros are known.
      const ext = await node.blockStatus(0, 64 * MiB);
      expect(ext.find((e) => e.offset <= 1 * MiB && e.offset + e.length > 1 * MiB)?.kind).to.equal('zero');
      expect(ext.find((e) => e.offset <= 5 * MiB && e.offset + e.length > 5 * MiB)?.kind).to.equal('data');
      expect(ext.reduce((n, e) => n + e.length, 0)).to.equal(64 * MiB);
    } finally {
      await node.close();
    }
  });

  it("applies qcow2 to a file's bytes that qemu-nbd serves as-is, over a unix socket with the empty export name, in both URI styles", async () => {
    const sock = path.join(tmp.dir, 'qemu-nbd.sock');
    await serve('qemu-nbd', ['-t', '-r', '-f', 'raw', '-k', sock, qcow2], { path: sock });
    const want = await rawMd5(qcow2);
    for (const spec of [`nbd+unix:///?socket=${sock}`, `nbd:unix:${sock}`]) {
      const node = await openImage(spec, ro);
      try {
        expect(node.size, spec).to.equal(64 * MiB);
        expect(await nodeMd5(node, 4 * MiB), spec).to.equal(want);
      } finally {
        await node.close();
      }
    }
  });

  it('finds a backing file as another export on the same server (nbdkit file dir=)', async () => {
    const sock = path.join(tmp.dir, 'dir.sock');
    await serve('nbdkit', ['-f', '-r', '--exit-with-parent', '-U', sock, 'file', `dir=${path.dirname(top)}`], { path: sock });
    const node = await openImage(`nbd+unix:///top.qcow2?socket=${sock}`, ro);
    try {
      expect(await nodeMd5(node, 4 * MiB)).to.equal(await rawMd5(top));
      expect((node as unknown as { backing?: BlockNode }).backing?.name).to.equal(`nbd+unix:///base.qcow2?socket=${sock}`);
    } finally {
      await node.close();
    }
  });

  it('uses structured replies, multi-conn, writes, zeroes, flush and block status with nbdkit memory', async () => {
    const port = await freePort();
    await serve('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), 'memory', '64M'], { port });
    const logs: string[] = [];
    const node = await NbdNode.open(`nbd://127.0.0.1:${port}/`, { readOnly: false, cache: 'writeback', log: (m) => logs.push(m) });
    try {
      const nbd = node as NbdNode;
      expect(nbd.exportInfo.structuredReplies).to.equal(true);
      expect(nbd.exportInfo.metaContexts.has('base:allocation')).to.equal(true);
      expect(nbd.connections).to.be.greaterThan(1);
      const ref = Buffer.alloc(64 * MiB);
      const writes: [number, number][] = [[0, 4096], [MiB + 17, 100_000], [7 * MiB, 9 * MiB + 3], [63 * MiB, MiB]];
      await Promise.all(writes.map(([off, n], i) => {
        const data = pattern(n, i + 1);
        data.copy(ref, off);
        return node.write(off, data);
      }));
      await node.zero!(8 * MiB, 2 * MiB, true);
      ref.fill(0, 8 * MiB, 10 * MiB);
      await node.flush();
      const got = Buffer.alloc(64 * MiB);
      await node.read(0, got);
      expect(got.equals(ref)).to.equal(true);
      const ext = await node.blockStatus(0, 64 * MiB);
      expect(ext.reduce((n, e) => n + e.length, 0)).to.equal(64 * MiB);
      expect(ext.find((e) => e.offset <= 30 * MiB && e.offset + e.length > 30 * MiB)?.kind).to.equal('zero');
      expect(ext.find((e) => e.offset <= 7 * MiB && e.offset + e.length > 7 * MiB)?.kind).to.equal('data');
    } finally {
      await node.close();
    }
    expect(logs).to.deep.equal([]);
  });

  it('writes a preallocated qcow2 on an nbdkit file export; qemu-img check passes and reads the data back', async () => {
    // An export cannot grow: the clusters must exist already (as with QEMU over NBD).
    const img = path.join(tmp.dir, 'rw.qcow2');
    await createImage(img, 'qcow2', '16M', { preallocation: 'metadata' });
    const port = await freePort();
    await serve('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), 'file', img], { port });
    const node = await openImage(`nbd:127.0.0.1:${port}`, rw);
    try {
      await node.write(3 * MiB, pattern(2 * MiB, 9));
      await node.flush();
    } finally {
      await node.close();
    }
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const flat = path.join(tmp.dir, 'rw.raw');
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, flat]);
    const buf = fs.readFileSync(flat);
    expect(buf.subarray(3 * MiB, 5 * MiB).equals(pattern(2 * MiB, 9))).to.equal(true);
    expect(buf.subarray(0, 3 * MiB).every((b) => b === 0)).to.equal(true);
  });

  it('gives the clusters a punched hole frees back through TRIM (qcow2 over qemu-nbd --discard=unmap)', async () => {
    const img = path.join(tmp.dir, 'trim.qcow2');
    await createImage(img, 'qcow2', '64M');
    await qemuIo(img, 'qcow2', ['write -P 0x66 0 16M']);
    const before = fs.statSync(img).blocks * 512;
    const sock = path.join(tmp.dir, 'trim.sock');
    const server = await serve('qemu-nbd', ['-t', '-f', 'raw', '--discard=unmap', '-k', sock, img], { path: sock });
    const node = await openImage(`nbd+unix:///?socket=${sock}`, rw);
    try {
      await node.zero!(0, 8 * MiB, true);
      await node.flush();
    } finally {
      await node.close();
    }
    await server.stop();
    const after = fs.statSync(img).blocks * 512;
    expect(before - after, `st_blocks ${before} -> ${after}`).to.be.at.least(7 * MiB);
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    await qemuIo(img, 'qcow2', ['read -P 0 0 8M', 'read -P 0x66 8M 8M']);
  });

  it('names exports: the legacy nbd:HOST:PORT:exportname= syntax and a named qemu-nbd export', async () => {
    const port = await freePort();
    await serve('qemu-nbd', ['-t', '-r', '-x', 'named export', '-f', 'qcow2', '-b', '127.0.0.1', '-p', String(port), qcow2], { port });
    const want = await rawMd5(qcow2);
    for (const spec of [`nbd:127.0.0.1:${port}:exportname=named export`, `nbd://127.0.0.1:${port}/named%20export`]) {
      const node = await openImage(spec, ro);
      try {
        expect(await nodeMd5(node, 4 * MiB), spec).to.equal(want);
      } finally {
        await node.close();
      }
    }
  });

  it('refuses wrong hosts, ports, exports and sockets with one line, within seconds', async () => {
    const port = await freePort();
    await serve('qemu-nbd', ['-t', '-r', '-x', 'vm', '-f', 'qcow2', '-b', '127.0.0.1', '-p', String(port), qcow2], { port });
    const closed = await freePort();
    const cases: [string, RegExp][] = [
      [`nbd://127.0.0.1:${port}/nope`, /has no export 'nope'/],
      [`nbd://127.0.0.1:${closed}/vm`, /connection refused/],
      ['nbd://no-such-host.invalid/vm', /unknown host/],
      [`nbd+unix:///vm?socket=${tmp.dir}/absent.sock`, /no such socket/],
      [`nbd://127.0.0.1:${port}/vm`, /read-only/], // opened --rw on a read-only export
    ];
    for (const [i, [spec, msg]] of cases.entries()) {
      const r = await timed(() => openImage(spec, i === cases.length - 1 ? rw : ro));
      expect(r.error, spec).to.be.instanceOf(TsmountError);
      const m = (r.error as Error).message;
      expect(m, spec).to.match(msg);
      expect(m.includes('\n'), spec).to.equal(false);
      expect(r.ms, spec).to.be.lessThan(5000);
    }
  });

  describe('a server that breaks the protocol', () => {
    type Mode = 'good' | 'hang-up' | 'garbage' | 'short-data' | 'silent';
    let server: net.Server;
    let port: number;
    const modes: Mode[] = [];
    const sockets = new Set<net.Socket>();
    const SIZE = 4 * MiB;

    before(async () => {
      port = await freePort();
      server = net.createServer((sock) => fakeServer(sock, modes.shift() ?? 'good'));
      await new Promise<void>((r) => server.listen(port, '127.0.0.1', () => r()));
    });
    after(async () => {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    });

    /** A minimal newstyle server: simple replies only, GO for any name, reads return 0x5a. */
    function fakeServer(sock: net.Socket, mode: Mode): void {
      sockets.add(sock);
      sock.on('close', () => sockets.delete(sock));
      sock.on('error', () => undefined);
      const hdr = Buffer.alloc(18);
      hdr.writeBigUInt64BE(NBD_MAGIC, 0);
      hdr.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
      hdr.writeUInt16BE(3, 16);
      sock.write(hdr);
      let buf = Buffer.alloc(0);
      let phase: 'flags' | 'options' | 'transmission' = 'flags';
      const reply = (opt: number, type: number, data = Buffer.alloc(0)): void => {
        const h = Buffer.alloc(20);
        h.writeBigUInt64BE(NBD_REP_MAGIC, 0);
        h.writeUInt32BE(opt, 8);
        h.writeUInt32BE(type, 12);
        h.writeUInt32BE(data.length, 16);
        sock.write(Buffer.concat([h, data]));
      };
      sock.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        for (;;) {
          if (phase === 'flags') {
            if (buf.length < 4) return;
            buf = buf.subarray(4);
            phase = 'options';
          } else if (phase === 'options') {
            if (buf.length < 16 || buf.length < 16 + buf.readUInt32BE(12)) return;
            const opt = buf.readUInt32BE(8);
            buf = buf.subarray(16 + buf.readUInt32BE(12));
            if (opt === NBD_OPT.GO) {
              const info = Buffer.alloc(12);
              info.writeUInt16BE(NBD_INFO.EXPORT, 0);
              info.writeBigUInt64BE(BigInt(SIZE), 2);
              info.writeUInt16BE(1, 10);
              reply(opt, NBD_REP.INFO, info);
              reply(opt, NBD_REP.ACK);
              phase = 'transmission';
            } else {
              reply(opt, NBD_REP.ERR_UNSUP);
            }
          } else {
            if (buf.length < 28) return;
            const type = buf.readUInt16BE(6);
            const handle = buf.subarray(8, 16);
            const length = buf.readUInt32BE(24);
            buf = buf.subarray(28);
            if (type === 2) return void sock.end();
            if (mode === 'hang-up') return void sock.destroy();
            if (mode === 'silent') continue;
            const r = Buffer.alloc(16);
            r.writeUInt32BE(mode === 'garbage' ? 0xdeadbeef : NBD_SIMPLE_REPLY_MAGIC, 0);
            handle.copy(r, 8);
            if (mode === 'short-data') {
              // Half the data, then silence and a hang-up: the read must not wait forever.
              sock.write(Buffer.concat([r, Buffer.alloc(length >> 1, 0x5a)]));
              setTimeout(() => sock.destroy(), 50);
              return;
            }
            sock.write(Buffer.concat([r, Buffer.alloc(length, 0x5a)]));
          }
        }
      });
    }

    for (const mode of ['hang-up', 'garbage', 'short-data'] as const) {
      it(`retries the affected read on a new connection, with a logged reason, when the server ${mode === 'hang-up' ? 'hangs up mid-request' : mode === 'garbage' ? 'sends a malformed reply' : 'stops in the middle of the data'}`, async () => {
        modes.splice(0, modes.length, 'good', mode, 'good');
        const logs: string[] = [];
        // The first connection is for open; the second one breaks; the third answers.
        const node = await NbdNode.open(`nbd://127.0.0.1:${port}/x`, { readOnly: true, cache: 'writeback', log: (m) => logs.push(m) });
        try {
          const b = new Uint8Array(64 << 10);
          await node.read(0, b);
          expect(b.every((x) => x === 0x5a)).to.equal(true);
          // Kill the first connection from the server's side so the next request reconnects into `mode`.
          for (const s of sockets) s.destroy();
          await new Promise((r) => setTimeout(r, 50));
          logs.length = 0;
          b.fill(0);
          const r = await timed(() => node.read(0, b));
          expect(r.error).to.equal(undefined);
          expect(b.every((x) => x === 0x5a)).to.equal(true);
          expect(logs.join('\n')).to.match(/closed the connection|malformed reply|bad reply magic/);
          expect(logs.join('\n')).to.match(/retrying NBD request at 0/);
          expect(logs.join('\n')).to.match(/reconnected/);
        } finally {
          await node.close();
        }
      });
    }

    it('reconnect-delay: requests wait for a server that is away for a while; open-timeout: the first connect waits for it too', async () => {
      modes.length = 0;
      const logs: string[] = [];
      const node = await NbdNode.open(`nbd://127.0.0.1:${port}/x?reconnect-delay=10`, { readOnly: true, cache: 'writeback', log: (m) => logs.push(m) });
      const away = async (ms: number): Promise<void> => {
        const closed = new Promise((r) => server.close(r));
        for (const s of sockets) s.destroy();
        await closed;
        setTimeout(() => server.listen(port, '127.0.0.1'), ms);
      };
      try {
        await away(2500);
        const b = new Uint8Array(4096);
        await node.read(0, b);
        expect(b.every((x) => x === 0x5a)).to.equal(true);
        expect(logs.join('\n')).to.match(/reconnected/);
      } finally {
        await node.close();
      }
      await away(1500);
      const later = await NbdNode.open(`nbd://127.0.0.1:${port}/x?open-timeout=10`, { readOnly: true, cache: 'writeback', log: () => undefined });
      await later.close();
    });

    it('a request the server never answers fails the connection after TSMOUNT_REMOTE_TIMEOUT and is retried on a new one', async () => {
      modes.splice(0, modes.length, 'good', 'silent', 'good');
      const saved = process.env.TSMOUNT_REMOTE_TIMEOUT;
      process.env.TSMOUNT_REMOTE_TIMEOUT = '1';
      const logs: string[] = [];
      const node = await NbdNode.open(`nbd://127.0.0.1:${port}/x`, { readOnly: true, cache: 'writeback', log: (m) => logs.push(m) });
      try {
        for (const s of sockets) s.destroy();
        await new Promise((r) => setTimeout(r, 50));
        const b = new Uint8Array(4096);
        await node.read(0, b);
        expect(b.every((x) => x === 0x5a)).to.equal(true);
        expect(logs.join('\n')).to.match(/no reply to NBD read at 0 within 1 s/);
      } finally {
        if (saved === undefined) delete process.env.TSMOUNT_REMOTE_TIMEOUT;
        else process.env.TSMOUNT_REMOTE_TIMEOUT = saved;
        await node.close();
      }
    });
  });

  it('mounts an NBD image with tsmount --rw; writes land on the server and unmount flushes', async () => {
    const img = path.join(tmp.dir, 'mounted.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', '-o', 'preallocation=metadata', qcow2, img]);
    const port = await freePort();
    await serve('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), 'file', img], { port });
    const mp = path.join(tmp.dir, 'mnt');
    fs.mkdirSync(mp);
    const want = await rawMd5(img);
    await mounts.mount(['--rw', `nbd://127.0.0.1:${port}/`, mp]);
    const flat = path.join(mp, 'nbd.raw');
    expect(await md5File(flat)).to.equal(want);
    const fd = fs.openSync(flat, 'r+');
    try {
      fs.writeSync(fd, pattern(3 * MiB, 3), 0, 3 * MiB, 40 * MiB + 512);
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(mp);
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const flatOut = path.join(tmp.dir, 'mounted.raw');
    await runOk('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', img, flatOut]);
    const got = fs.readFileSync(flatOut);
    expect(got.subarray(40 * MiB + 512, 43 * MiB + 512).equals(pattern(3 * MiB, 3))).to.equal(true);
  });
});
