// Sheepdog: the pure protocol code split at every byte, and the client against the
// protocol-level sheep of test/helpers/sheepdog-server.ts (lookup, lock, read, write,
// create, snapshot, clone), through the API, tsimg create and a mount.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import net from 'node:net';
import {
  decodeInodeHeader,
  decodeRequest,
  decodeResponse,
  encodeInodeHeader,
  encodeRequest,
  encodeResponse,
  formatSheepdogUri,
  MessageParser,
  parseSheepdogUri,
  SD_FLAG_CMD_COW,
  SD_FLAG_CMD_WRITE,
  SD_HEADER_SIZE,
  SD_INODE_HEADER_SIZE,
  SD_OP_CREATE_AND_WRITE_OBJ,
  SD_OP_GET_VDI_INFO,
  SD_OP_LOCK_VDI,
  SD_OP_NEW_VDI,
  SD_OP_READ_OBJ,
  SD_OP_RELEASE_VDI,
  vidToDataOid,
  vidToVdiOid,
  type Request,
  type Response,
} from '../drivers/protocol/sheepdog/proto.js';
import { SheepdogNode } from '../drivers/protocol/sheepdog/node.js';
import { openProtocol } from '../drivers/open.js';
import { createImage } from '../drivers/create.js';
import { imageOptsToSpec } from '../drivers/protocol/remote.js';
import { LockedError, messageOf } from '../drivers/errors.js';
import { startSheep, type SheepServer } from './helpers/sheepdog-server.js';
import { freePort } from './helpers/servers.js';
import { md5File, qemuIo, rawMd5, tempDir } from './helpers/qemu.js';
import { tsimg } from './helpers/images.js';
import { MountTracker } from './helpers/mount.js';

const MiB = 1 << 20;

function md5(b: Uint8Array): string {
  return crypto.createHash('md5').update(b).digest('hex');
}

describe('sheepdog', function () {
  this.timeout(120_000);

  describe('the wire format (pure)', () => {
    it('request headers are 48 bytes and round-trip, object and VDI layouts', () => {
      const obj: Request = { protoVer: 1, opcode: SD_OP_CREATE_AND_WRITE_OBJ, flags: SD_FLAG_CMD_WRITE | SD_FLAG_CMD_COW, epoch: 7, id: 0xfffffffe, dataLength: 4096, oid: vidToDataOid(0xabcdef, 5), cowOid: vidToDataOid(0x123, 5), copies: 3, copyPolicy: 0x21, offset: 2 ** 40 };
      const b = encodeRequest(obj);
      expect(b.length).to.equal(SD_HEADER_SIZE);
      expect(b.readBigUInt64LE(16)).to.equal(0xabcdef00000005n);
      expect(decodeRequest(b)).to.deep.equal(obj);
      const vdi: Request = { protoVer: 1, opcode: SD_OP_NEW_VDI, flags: 1, epoch: 0, id: 3, dataLength: 256, vdiSize: 8 * MiB, baseVdiId: 0x7c2b25, copies: 3, copyPolicy: 0, blockSizeShift: 22, snapid: 1, type: 0 };
      expect(decodeRequest(encodeRequest(vdi))).to.deep.equal(vdi);
      expect(vidToVdiOid(0x7c2b25)).to.equal(0x807c2b2500000000n);
    });

    it('the message parser gives the same messages however the stream is split', () => {
      const msgs: { h: Response; data: Buffer }[] = [
        { h: { opcode: SD_OP_GET_VDI_INFO, id: 1, dataLength: 0, result: 0, vdiId: 0x42 }, data: Buffer.alloc(0) },
        { h: { opcode: SD_OP_READ_OBJ, id: 2, dataLength: 37, result: 0 }, data: crypto.randomBytes(37) },
        { h: { opcode: SD_OP_LOCK_VDI, id: 3, dataLength: 0, result: 7 }, data: Buffer.alloc(0) },
        { h: { opcode: SD_OP_READ_OBJ, id: 4, dataLength: 5, result: 0 }, data: crypto.randomBytes(5) },
      ];
      const stream = Buffer.concat(msgs.flatMap((m) => [encodeResponse(m.h), m.data]));
      const expected = msgs.map((m) => ({ id: m.h.id, result: m.h.result, data: m.data.toString('hex') }));
      const summary = (out: { header: Response; data: Buffer }[]) => out.map((o) => ({ id: o.header.id, result: o.header.result, data: o.data.toString('hex') }));
      for (let cut = 0; cut <= stream.length; cut++) {
        for (const cut2 of [cut, Math.min(stream.length, cut + 49)]) {
          const p = new MessageParser(decodeResponse, () => 1 << 20);
          const out = [...p.push(stream.subarray(0, cut)), ...p.push(stream.subarray(cut, cut2)), ...p.push(stream.subarray(cut2))];
          expect(summary(out), `split at ${cut}/${cut2}`).to.deep.equal(expected);
        }
      }
      // Byte by byte.
      const p = new MessageParser(decodeResponse, () => 1 << 20);
      const out = [];
      for (const byte of stream) out.push(...p.push(Buffer.from([byte])));
      expect(summary(out)).to.deep.equal(expected);
      expect(decodeResponse(encodeResponse(msgs[0]!.h)).vdiId).to.equal(0x42);
    });

    it('requests split at every byte: data follows only a write (the data_length of a read is what it asks for)', () => {
      const w = crypto.randomBytes(33);
      const reqs: [Request, Buffer][] = [
        [{ opcode: SD_OP_READ_OBJ, id: 1, dataLength: 4096, oid: vidToDataOid(5, 1), offset: 512 }, Buffer.alloc(0)],
        [{ opcode: SD_OP_CREATE_AND_WRITE_OBJ, flags: SD_FLAG_CMD_WRITE, id: 2, dataLength: w.length, oid: vidToDataOid(5, 2) }, w],
        [{ opcode: SD_OP_RELEASE_VDI, flags: SD_FLAG_CMD_WRITE, id: 3, dataLength: 3 }, Buffer.from('vm\0')],
      ];
      const stream = Buffer.concat(reqs.flatMap(([r, d]) => [encodeRequest(r), d]));
      const expected = reqs.map(([r, d]) => ({ id: r.id, opcode: r.opcode, data: d.toString('hex') }));
      for (let cut = 0; cut <= stream.length; cut++) {
        const p = new MessageParser(decodeRequest, () => 1 << 20, true);
        const out = [...p.push(stream.subarray(0, cut)), ...p.push(stream.subarray(cut))];
        expect(out.map((o) => ({ id: o.header.id, opcode: o.header.opcode, data: o.data.toString('hex') })), `split at ${cut}`).to.deep.equal(expected);
      }
    });

    it('a header announcing more data than was asked for is a protocol error, before any is buffered', () => {
      const p = new MessageParser(decodeResponse, () => 4096);
      expect(() => p.push(encodeResponse({ opcode: SD_OP_READ_OBJ, id: 1, dataLength: 0xffffffff, result: 0 }))).to.throw(/announces 4294967295 bytes/);
    });

    it('inode headers round-trip at the offsets of SheepdogInode', () => {
      const h = { name: 'vm', tag: 'before', ctime: 123n << 32n, snapCtime: 9n, vdiSize: 12 * MiB, copyPolicy: 0, nrCopies: 3, blockSizeShift: 22, snapId: 2, vdiId: 0x7c2b25, parentVdiId: 0x7c2b24 };
      const b = encodeInodeHeader(h);
      expect(b.length).to.equal(SD_INODE_HEADER_SIZE);
      expect(SD_INODE_HEADER_SIZE).to.equal(4664);
      expect(b.readBigUInt64LE(536)).to.equal(BigInt(12 * MiB));
      expect(b.readUInt32LE(560)).to.equal(0x7c2b25);
      expect(decodeInodeHeader(b)).to.deep.equal(h);
    });

    it('parses every URI form and the old syntax; refuses bad ones in one line', () => {
      const tcp = (host: string, port: number) => ({ kind: 'tcp', host, port });
      expect(parseSheepdogUri('sheepdog:///vm')).to.deep.equal({ address: tcp('localhost', 7000), vdi: 'vm', tag: '', snapId: 0 });
      expect(parseSheepdogUri('sheepdog:///vm#snap1')).to.deep.equal({ address: tcp('localhost', 7000), vdi: 'vm', tag: 'snap1', snapId: 0 });
      expect(parseSheepdogUri('sheepdog://h.example:7001/vm#3')).to.deep.equal({ address: tcp('h.example', 7001), vdi: 'vm', tag: '', snapId: 3 });
      expect(parseSheepdogUri('sheepdog+tcp://[::1]:7002/a%20b')).to.deep.equal({ address: tcp('::1', 7002), vdi: 'a b', tag: '', snapId: 0 });
      expect(parseSheepdogUri('sheepdog+unix:///vm?socket=/run/sheep.sock#t')).to.deep.equal({ address: { kind: 'unix', path: '/run/sheep.sock' }, vdi: 'vm', tag: 't', snapId: 0 });
      expect(parseSheepdogUri('sheepdog:vm:t')).to.deep.equal({ address: tcp('localhost', 7000), vdi: 'vm', tag: 't', snapId: 0 });
      expect(parseSheepdogUri('sheepdog:host:7003:vm')).to.deep.equal({ address: tcp('host', 7003), vdi: 'vm', tag: '', snapId: 0 });
      for (const s of ['sheepdog://h/vm', 'sheepdog+unix:///vm?socket=/s', 'sheepdog://[::1]:1/x#tag']) expect(formatSheepdogUri(parseSheepdogUri(s))).to.equal(s.replace('//h/', '//h:7000/'));
      for (const [bad, why] of [
        ['sheepdog:///', /missing VDI name/],
        ['sheepdog+unix:///vm', /requires query parameter 'socket'/],
        ['sheepdog+unix://h/vm?socket=/s', /doesn't accept a server address/],
        ['sheepdog:///vm?x=1', /unexpected query parameters/],
        ['sheepdog://h:99999/vm', /bad port/],
        ['sheepdog:///vm#0', /not a valid snapshot ID/],
        [`sheepdog:///${'x'.repeat(256)}`, /too long/],
      ] as const) {
        expect(() => parseSheepdogUri(bad), bad).to.throw(why);
      }
      expect(imageOptsToSpec('driver=sheepdog,server.host=h,server.port=7001,vdi=vm,tag=t')).to.deep.equal({ spec: 'sheepdog://h:7001/vm#t', format: 'raw' });
      expect(imageOptsToSpec('driver=sheepdog,server.type=unix,server.path=/s,vdi=vm')).to.deep.equal({ spec: 'sheepdog+unix:///vm?socket=/s', format: 'raw' });
    });
  });

  describe('against the test sheep', () => {
    let sheep: SheepServer;
    let base: string;
    let tmp: { dir: string; cleanup: () => void };
    const mounts = new MountTracker();
    before(async () => {
      tmp = tempDir('sheep');
      sheep = await startSheep();
      base = `sheepdog://127.0.0.1:${sheep.port}`;
    });
    after(async () => {
      await mounts.cleanup();
      await sheep.close();
      tmp.cleanup();
    });

    const quiet = { format: 'raw', options: [], quiet: true };

    it('creates a VDI, writes across object boundaries, reads back byte-exact after a reopen', async () => {
      await createImage(`${base}/vm1`, '12M', quiet);
      const expected = Buffer.alloc(12 * MiB);
      const node = await openProtocol(`${base}/vm1`, { readOnly: false, cache: 'writeback' });
      try {
        expect(node.size).to.equal(12 * MiB);
        for (const [off, len] of [[0, 4096], [4 * MiB - 100, 300], [5 * MiB + 7, 3 * MiB + 11], [12 * MiB - 1, 1]] as const) {
          const data = crypto.randomBytes(len);
          await node.write(off, data);
          data.copy(expected, off);
        }
        const got = Buffer.alloc(12 * MiB);
        await node.read(0, got);
        expect(md5(got)).to.equal(md5(expected));
        expect(await node.blockStatus(0, 12 * MiB)).to.deep.equal([{ offset: 0, length: 12 * MiB, kind: 'data' }]);
      } finally {
        await node.close();
      }
      const again = await openProtocol(`${base}/vm1`, { readOnly: true, cache: 'writeback' });
      try {
        const got = Buffer.alloc(12 * MiB);
        await again.read(0, got);
        expect(md5(got)).to.equal(md5(expected));
      } finally {
        await again.close();
      }
      expect(sheep.ops).to.include.members([SD_OP_NEW_VDI, SD_OP_LOCK_VDI, SD_OP_RELEASE_VDI, SD_OP_CREATE_AND_WRITE_OBJ]);
    });

    it('a second writer, or a reader, is refused the VDI lock in one line; after the first closes it gets in', async () => {
      await createImage(`${base}/locked`, '4M', quiet);
      const first = await SheepdogNode.open(`${base}/locked`, { readOnly: false });
      const t0 = Date.now();
      const err = await SheepdogNode.open(`${base}/locked`, { readOnly: false }).then(() => undefined, (e: unknown) => e);
      expect(err).to.be.instanceOf(LockedError);
      expect(messageOf(err)).to.equal(`${base}/locked: VDI 'locked' is locked by another client (open it read-only, or stop the other one)`);
      expect(Date.now() - t0).to.be.below(5000);
      // A reader takes the lock too, as QEMU's sd_open does.
      const readErr = await SheepdogNode.open(`${base}/locked`, { readOnly: true }).then(() => undefined, (e: unknown) => e);
      expect(readErr).to.be.instanceOf(LockedError);
      await first.close();
      const second = await SheepdogNode.open(`${base}/locked`, { readOnly: false });
      await second.close();
    });

    it('snapshots: the tagged snapshot keeps its bytes, the VDI goes on with copy-on-write objects', async () => {
      await createImage(`${base}/snappy`, '8M', quiet);
      const a = crypto.randomBytes(6 * MiB);
      const node = await SheepdogNode.open(`${base}/snappy`, { readOnly: false });
      let snapVid: number;
      try {
        await node.write(MiB, a);
        snapVid = node.vdiId;
        await node.createSnapshot('before');
        expect(node.vdiId).not.to.equal(snapVid);
        const b = crypto.randomBytes(4096);
        await node.write(2 * MiB, b);
        const cur = Buffer.alloc(4096);
        await node.read(2 * MiB, cur);
        expect(cur.equals(b)).to.equal(true);
        // The written object was copied from the snapshot's, not zero-filled.
        const around = Buffer.alloc(8192);
        await node.read(2 * MiB - 8192, around);
        expect(around.equals(a.subarray(MiB - 8192, MiB))).to.equal(true);
      } finally {
        await node.close();
      }
      for (const spec of [`${base}/snappy#before`, `${base}/snappy#1`]) {
        const snap = await openProtocol(spec, { readOnly: true, cache: 'writeback' });
        try {
          const got = Buffer.alloc(6 * MiB);
          await snap.read(MiB, got);
          expect(md5(got), spec).to.equal(md5(a));
        } finally {
          await snap.close();
        }
      }
      expect(sheep.objects.has(vidToDataOid(snapVid!, 0))).to.equal(true);
      const writeSnap = await SheepdogNode.open(`${base}/snappy#before`, { readOnly: false }).then(() => undefined, (e: unknown) => e);
      expect(messageOf(writeSnap)).to.match(/a snapshot is read-only; clone it/);
    });

    it('tsimg snapshot -c takes a snapshot, tsimg create -b clones it; the clone reads the snapshot, writes stay in the clone', async () => {
      await createImage(`${base}/gold`, '4M', quiet);
      const pattern = crypto.randomBytes(4 * MiB);
      const g = await SheepdogNode.open(`${base}/gold`, { readOnly: false });
      await g.write(0, pattern);
      await g.close();
      const taken = await tsimg(['snapshot', '-c', 'v1', `${base}/gold`]);
      expect(taken.code, taken.stderr).to.equal(0);
      const del = await tsimg(['snapshot', '-d', 'v1', `${base}/gold`]);
      expect(del.code).to.equal(1);
      expect(del.stderr.trim().split('\n')).to.have.length(1);
      expect(del.stderr).to.match(/does not delete Sheepdog snapshots/);
      const r = await tsimg(['create', '-f', 'raw', '-b', `${base}/gold#v1`, `${base}/clone`]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.include(`Formatting '${base}/clone', fmt=raw size=${4 * MiB}`);
      const c = await SheepdogNode.open(`${base}/clone`, { readOnly: false });
      try {
        const got = Buffer.alloc(4 * MiB);
        await c.read(0, got);
        expect(md5(got)).to.equal(md5(pattern));
        await c.write(0, Buffer.alloc(512, 0xee));
      } finally {
        await c.close();
      }
      const snap = await SheepdogNode.open(`${base}/gold#v1`, { readOnly: true });
      const first = Buffer.alloc(512);
      await snap.read(0, first);
      await snap.close();
      expect(first.equals(pattern.subarray(0, 512))).to.equal(true);
      const notSnap = await tsimg(['create', '-f', 'raw', '-b', `${base}/gold`, `${base}/clone2`]);
      expect(notSnap.code).not.to.equal(0);
      expect(notSnap.stderr.trim()).to.match(/cannot clone from a non snapshot vdi/);
      expect(notSnap.stderr.trim().split('\n')).to.have.length(1);
    });

    it('tsimg convert imports an image into a new VDI, as the man page shows', async () => {
      const src = path.join(tmp.dir, 'src.qcow2');
      await createImage(src, '6M', { format: 'qcow2', options: [], quiet: true });
      await qemuIo(src, 'qcow2', ['write -P 0x5a 1M 2M', 'write -P 0x11 5M 4k']);
      const r = await tsimg(['convert', '-O', 'raw', src, `${base}/imported`]);
      expect(r.code, r.stderr).to.equal(0);
      const node = await SheepdogNode.open(`${base}/imported`, { readOnly: true });
      try {
        const got = Buffer.alloc(node.size);
        await node.read(0, got);
        expect(md5(got)).to.equal(await rawMd5(src, 'qcow2'));
      } finally {
        await node.close();
      }
    });

    it('one-line errors within seconds: no server, a missing tag, a missing VDI, an existing name', async () => {
      const port = await freePort();
      const cases: [string, RegExp][] = [
        [`sheepdog://127.0.0.1:${port}/vm`, new RegExp(`cannot connect to sheep at 127.0.0.1:${port}: ECONNREFUSED`)],
        [`${base}/vm1#nosuch`, /VDI 'vm1' has no snapshot tagged 'nosuch'/],
        [`${base}/nosuch`, /no VDI named 'nosuch'/],
      ];
      for (const [spec, why] of cases) {
        const t0 = Date.now();
        const r = await tsimg(['info', spec]);
        expect(r.code, spec).not.to.equal(0);
        expect(r.stderr.trim().split('\n'), r.stderr).to.have.length(1);
        expect(r.stderr).to.match(why);
        expect(Date.now() - t0).to.be.below(10_000);
      }
      const exists = await tsimg(['create', '-f', 'raw', `${base}/vm1`, '1M']);
      expect(exists.stderr.trim()).to.match(/a VDI named 'vm1' exists already$/);
    });

    it('a sheep that accepts and never answers: EIO in one line after TSMOUNT_REMOTE_TIMEOUT, not a hang', async () => {
      const port = await freePort();
      const silent = net.createServer(() => undefined);
      await new Promise<void>((r) => silent.listen(port, '127.0.0.1', r));
      const before = process.env.TSMOUNT_REMOTE_TIMEOUT;
      process.env.TSMOUNT_REMOTE_TIMEOUT = '1';
      try {
        const err = await SheepdogNode.open(`sheepdog://127.0.0.1:${port}/vm`, { readOnly: true }).then(() => undefined, (e: unknown) => e);
        expect(messageOf(err)).to.match(/sheep did not answer within 1 s/);
      } finally {
        if (before === undefined) delete process.env.TSMOUNT_REMOTE_TIMEOUT;
        else process.env.TSMOUNT_REMOTE_TIMEOUT = before;
        silent.close();
      }
    });

    it('over a Unix socket, and mounted read-write through tsmount', async () => {
      const sock = path.join(tmp.dir, 'sheep.sock');
      const unixSheep = await startSheep({ socketPath: sock });
      try {
        const spec = `sheepdog+unix:///disk?socket=${sock}`;
        await createImage(spec, '8M', quiet);
        const mp = path.join(tmp.dir, 'mnt');
        fs.mkdirSync(mp);
        await mounts.mount(['--rw', spec, mp]);
        // Only asynchronous calls on the mount: the sheep it talks to runs in this process.
        const flat = path.join(mp, (await fs.promises.readdir(mp))[0]!);
        const data = crypto.randomBytes(MiB);
        const fh = await fs.promises.open(flat, 'r+');
        await fh.write(data, 0, data.length, 3 * MiB + 512);
        await fh.sync();
        await fh.close();
        const expected = Buffer.alloc(8 * MiB);
        data.copy(expected, 3 * MiB + 512);
        expect(await md5File(flat)).to.equal(md5(expected));
        await mounts.unmount(mp);
        const node = await SheepdogNode.open(spec, { readOnly: true });
        const got = Buffer.alloc(8 * MiB);
        await node.read(0, got);
        await node.close();
        expect(md5(got)).to.equal(md5(expected));
      } finally {
        await mounts.cleanup();
        await unixSheep.close();
      }
    });
  });
});
