// The FUSE wire format (fs/fuse-codec.ts) without a mount: requests built the way the
// kernel builds them decode to the same values, replies decode back to what was
// encoded, and a message cut short or claiming more than it carries is an error reply,
// never a read of stale bytes. Then one session (fs/fuse-session.ts) served over a
// socket pair instead of /dev/fuse: lookups counted and forgotten, an interrupted
// request answered EINTR once, LSEEK and DESTROY.
import { expect } from 'chai';
import fs from 'node:fs';
import { constants as osc } from 'node:os';
import {
  Attr, BatchForgetIn, DT_DIR, DT_REG, EntryOut, FallocateIn, ForgetIn, ForgetOne, FsyncIn, InHeader, InitIn, InitOut,
  InterruptIn, LseekIn, LseekOut, Op, OpenIn, OpenOut, OutHeader, ReadIn, SetattrIn, StatfsOut, WriteIn, WriteOut,
  decodeAttr, decodeDirents, decodeHeader, decodeIo, decodeOutHeader, decodeRequest, encodeAttrOut, encodeDirents,
  encodeEntryOut, encodeInitOut, encodeLseekOut, encodeOpenOut, encodeOutHeader, encodeRequest, encodeStatfsOut, encodeWriteOut,
  newHeader, newIoRequest, putU64, replyBuffer, u64, type Request,
} from '../fs/fuse-codec.js';
import { Session } from '../fs/fuse-session.js';
import { ROOT_ID, type FsOps, type Stat } from '../fs/fuse.js';
import { readNoBlock, SEEK_DATA, SEEK_HOLE, socketPair } from '../drivers/util/sys.js';
import { ErrnoError, errnoOf } from '../drivers/errors.js';

const E = osc.errno;

function body(size: number, fill: (b: Buffer) => void): Buffer {
  const b = Buffer.alloc(size);
  fill(b);
  return b;
}

/** One request of each kind the session serves, as the kernel would send it, and what it decodes to. */
const requests: { name: string; opcode: number; body: Buffer; want: Request }[] = [
  { name: 'LOOKUP', opcode: Op.LOOKUP, body: Buffer.from('disk.raw\0'), want: { kind: 'lookup', name: 'disk.raw' } },
  { name: 'FORGET', opcode: Op.FORGET, body: body(ForgetIn.SIZE, (b) => putU64(b, ForgetIn.nlookup, 3)), want: { kind: 'forget', items: [{ nodeid: 7, nlookup: 3 }] } },
  {
    name: 'BATCH_FORGET',
    opcode: Op.BATCH_FORGET,
    body: body(BatchForgetIn.SIZE + 2 * ForgetOne.SIZE, (b) => {
      b.writeUInt32LE(2, BatchForgetIn.count);
      putU64(b, BatchForgetIn.SIZE + ForgetOne.nodeid, 2);
      putU64(b, BatchForgetIn.SIZE + ForgetOne.nlookup, 1);
      putU64(b, BatchForgetIn.SIZE + ForgetOne.SIZE + ForgetOne.nodeid, 3);
      putU64(b, BatchForgetIn.SIZE + ForgetOne.SIZE + ForgetOne.nlookup, 2 ** 40);
    }),
    want: { kind: 'forget', items: [{ nodeid: 2, nlookup: 1 }, { nodeid: 3, nlookup: 2 ** 40 }] },
  },
  {
    name: 'SETATTR',
    opcode: Op.SETATTR,
    body: body(SetattrIn.SIZE, (b) => {
      b.writeUInt32LE(0b1111, SetattrIn.valid);
      putU64(b, SetattrIn.fh, 9);
      putU64(b, SetattrIn.size, 2 ** 50);
      b.writeUInt32LE(0o100600, SetattrIn.mode);
      b.writeUInt32LE(1000, SetattrIn.uid);
      b.writeUInt32LE(1001, SetattrIn.gid);
    }),
    want: { kind: 'setattr', valid: 0b1111, fh: 9, size: 2 ** 50, mode: 0o100600, uid: 1000, gid: 1001 },
  },
  { name: 'OPEN', opcode: Op.OPEN, body: body(OpenIn.SIZE, (b) => b.writeUInt32LE(0o2, OpenIn.flags)), want: { kind: 'open', flags: 2 } },
  { name: 'FSYNC', opcode: Op.FSYNC, body: body(FsyncIn.SIZE, (b) => (putU64(b, FsyncIn.fh, 5), b.writeUInt32LE(1, FsyncIn.fsync_flags))), want: { kind: 'fsync', fh: 5, datasync: true } },
  {
    name: 'INIT (7.38)',
    opcode: Op.INIT,
    body: body(InitIn.SIZE, (b) => {
      b.writeUInt32LE(7, InitIn.major);
      b.writeUInt32LE(38, InitIn.minor);
      b.writeUInt32LE(131072, InitIn.max_readahead);
      b.writeUInt32LE((1 << 30) | 1, InitIn.flags);
      b.writeUInt32LE(1 << 4, InitIn.flags2);
    }),
    want: { kind: 'init', major: 7, minor: 38, maxReadahead: 131072, flags: (1 << 30) | 1, flags2: 1 << 4 },
  },
  {
    name: 'INIT (7.31, no flags2)',
    opcode: Op.INIT,
    body: body(InitIn.SIZE_OLD, (b) => (b.writeUInt32LE(7, InitIn.major), b.writeUInt32LE(31, InitIn.minor), b.writeUInt32LE(1, InitIn.flags))),
    want: { kind: 'init', major: 7, minor: 31, maxReadahead: 0, flags: 1, flags2: 0 },
  },
  { name: 'READDIR', opcode: Op.READDIR, body: body(ReadIn.SIZE, (b) => (putU64(b, ReadIn.offset, 2), b.writeUInt32LE(4096, ReadIn.size))), want: { kind: 'readdir', fh: 0, offset: 2, size: 4096 } },
  { name: 'INTERRUPT', opcode: Op.INTERRUPT, body: body(InterruptIn.SIZE, (b) => putU64(b, InterruptIn.unique, 2 ** 33 + 4)), want: { kind: 'interrupt', unique: 2 ** 33 + 4 } },
  {
    name: 'FALLOCATE',
    opcode: Op.FALLOCATE,
    body: body(FallocateIn.SIZE, (b) => (putU64(b, FallocateIn.fh, 1), putU64(b, FallocateIn.offset, 4096), putU64(b, FallocateIn.length, 2 ** 45), b.writeUInt32LE(3, FallocateIn.mode))),
    want: { kind: 'fallocate', fh: 1, offset: 4096, length: 2 ** 45, mode: 3 },
  },
  {
    name: 'LSEEK',
    opcode: Op.LSEEK,
    body: body(LseekIn.SIZE, (b) => (putU64(b, LseekIn.fh, 4), putU64(b, LseekIn.offset, 2 ** 52 + 512), b.writeUInt32LE(SEEK_HOLE, LseekIn.whence))),
    want: { kind: 'lseek', fh: 4, offset: 2 ** 52 + 512, whence: SEEK_HOLE },
  },
  { name: 'GETATTR', opcode: Op.GETATTR, body: Buffer.alloc(16), want: { kind: 'getattr' } },
  { name: 'DESTROY', opcode: Op.DESTROY, body: Buffer.alloc(0), want: { kind: 'destroy' } },
  { name: 'MKDIR', opcode: Op.MKDIR, body: Buffer.from('\0\0\0\0\0\0\0\0sub\0'), want: { kind: 'changesNames', opcode: Op.MKDIR } },
  { name: 'COPY_FILE_RANGE', opcode: Op.COPY_FILE_RANGE, body: Buffer.alloc(56), want: { kind: 'unsupported', opcode: Op.COPY_FILE_RANGE } },
];

/** The message as read from /dev/fuse into a pooled buffer that holds stale bytes after it. */
function inPool(msg: Buffer): { buf: Buffer; n: number } {
  const buf = Buffer.alloc(msg.length + 4096, 0xa5);
  msg.copy(buf);
  return { buf, n: msg.length };
}

function decodeAll(buf: Buffer, n: number): { h: ReturnType<typeof newHeader>; req: Request | 'io' } | undefined {
  const h = newHeader();
  if (!decodeHeader(buf, n, h)) return undefined;
  const b = buf.subarray(InHeader.SIZE, n);
  if (h.opcode === Op.READ || h.opcode === Op.WRITE) {
    decodeIo(h.opcode, b, 1 << 20, newIoRequest());
    return { h, req: 'io' };
  }
  return { h, req: decodeRequest(h.opcode, h.nodeid, b) };
}

const errno = (fn: () => unknown): number => {
  try {
    fn();
  } catch (err) {
    expect(err, String(err)).to.be.instanceOf(ErrnoError);
    return errnoOf(err);
  }
  return 0;
};

describe('FUSE codec: requests', () => {
  for (const r of requests) {
    it(`decodes ${r.name} as the kernel sends it`, () => {
      const msg = encodeRequest({ opcode: r.opcode, unique: 2 ** 40 + 2, nodeid: 7, uid: 1000, gid: 100, pid: 42 }, r.body);
      const { buf, n } = inPool(msg);
      const got = decodeAll(buf, n)!;
      expect(got.h).to.deep.equal({ len: msg.length, opcode: r.opcode, unique: 2 ** 40 + 2, nodeid: 7, uid: 1000, gid: 100, pid: 42 });
      expect(got.req).to.deep.equal(r.want);
    });
  }

  it('decodes READ and WRITE into one reused record, the data where the kernel put it', () => {
    const io = newIoRequest();
    const read = body(ReadIn.SIZE, (b) => (putU64(b, ReadIn.fh, 3), putU64(b, ReadIn.offset, 2 ** 53 - 4096), b.writeUInt32LE(65536, ReadIn.size)));
    decodeIo(Op.READ, read, 1 << 20, io);
    expect(io).to.deep.equal({ fh: 3, offset: 2 ** 53 - 4096, size: 65536 });
    const data = Buffer.from('hello, disk');
    const write = Buffer.concat([body(WriteIn.SIZE, (b) => (putU64(b, WriteIn.offset, 512), b.writeUInt32LE(data.length, WriteIn.size))), data]);
    decodeIo(Op.WRITE, write, 1 << 20, io);
    expect(io).to.deep.equal({ fh: 0, offset: 512, size: data.length });
    expect(write.subarray(WriteIn.SIZE, WriteIn.SIZE + io.size).toString()).to.equal('hello, disk');
  });

  it('cut at every byte: no header is no answer, a short message is EIO, never a read past it', () => {
    const all = [
      ...requests,
      { name: 'READ', opcode: Op.READ, body: Buffer.alloc(ReadIn.SIZE) },
      { name: 'WRITE', opcode: Op.WRITE, body: body(WriteIn.SIZE + 100, (b) => b.writeUInt32LE(100, WriteIn.size)) },
    ];
    for (const r of all) {
      const msg = encodeRequest({ opcode: r.opcode, unique: 10, nodeid: 2 }, r.body);
      for (let cut = 0; cut < msg.length; cut++) {
        // As read: fewer bytes than the header says.
        const { buf, n } = inPool(msg.subarray(0, cut));
        if (cut < InHeader.SIZE) {
          expect(decodeAll(buf, n), `${r.name} cut at ${cut}`).to.equal(undefined);
          continue;
        }
        expect(errno(() => decodeAll(buf, n)), `${r.name} cut at ${cut}`).to.equal(E.EIO);
        // Consistent length, short body: the struct is not all there. (Bodies that
        // need nothing, and names cut before their NUL, are the exceptions.)
        const short = Buffer.from(msg.subarray(0, cut));
        short.writeUInt32LE(cut, InHeader.len);
        const p = inPool(short);
        const e = errno(() => decodeAll(p.buf, p.n));
        if (e !== 0) expect(e, `${r.name} body cut at ${cut - InHeader.SIZE}`).to.equal(E.EIO);
        else expect([Op.GETATTR, Op.DESTROY, Op.MKDIR, Op.COPY_FILE_RANGE, Op.INIT], `${r.name} body cut at ${cut - InHeader.SIZE} decoded`).to.include(r.opcode);
      }
    }
  });

  it('refuses messages that claim more than they carry', () => {
    const msg = encodeRequest({ opcode: Op.GETATTR, unique: 4, nodeid: 1 }, Buffer.alloc(16));
    msg.writeUInt32LE(msg.length + 1, InHeader.len);
    const h = newHeader();
    const { buf, n } = inPool(msg);
    expect(errno(() => decodeHeader(buf, n, h))).to.equal(E.EIO);
    // The header was read: the error can be answered to the right request.
    expect(h.unique).to.equal(4);

    // A WRITE whose size is more (or less) than the data that follows.
    const write = body(WriteIn.SIZE + 10, (b) => b.writeUInt32LE(11, WriteIn.size));
    expect(errno(() => decodeIo(Op.WRITE, write, 1 << 20, newIoRequest()))).to.equal(E.EIO);
    write.writeUInt32LE(9, WriteIn.size);
    expect(errno(() => decodeIo(Op.WRITE, write, 1 << 20, newIoRequest()))).to.equal(E.EIO);
    // A READ larger than what INIT negotiated.
    const read = body(ReadIn.SIZE, (b) => b.writeUInt32LE((1 << 20) + 1, ReadIn.size));
    expect(errno(() => decodeIo(Op.READ, read, 1 << 20, newIoRequest()))).to.equal(E.EINVAL);
    // BATCH_FORGET with a count its body cannot hold: refused before allocating.
    const forget = body(BatchForgetIn.SIZE + ForgetOne.SIZE, (b) => b.writeUInt32LE(0xffffffff, BatchForgetIn.count));
    expect(errno(() => decodeRequest(Op.BATCH_FORGET, 0, forget))).to.equal(E.EIO);
    // Names: not NUL-terminated, empty, too long.
    expect(errno(() => decodeRequest(Op.LOOKUP, 1, Buffer.from('disk.raw')))).to.equal(E.EIO);
    expect(errno(() => decodeRequest(Op.LOOKUP, 1, Buffer.from('\0')))).to.equal(E.ENOENT);
    expect(errno(() => decodeRequest(Op.LOOKUP, 1, Buffer.from(`${'x'.repeat(2000)}\0`)))).to.equal(E.ENAMETOOLONG);
  });
});

describe('FUSE codec: replies', () => {
  const st: Stat = {
    mode: 0o100644, size: 2 ** 52 + 4096, uid: 1000, gid: 1001, nlink: 1, blocks: 2 ** 43, blksize: 4096,
    atime: new Date(1_700_000_000_123), mtime: new Date(1_600_000_000_456), ctime: new Date(1_500_000_000_789),
  };

  it('round-trips attributes through fuse_attr_out and fuse_entry_out', () => {
    const out = replyBuffer(EntryOut.SIZE);
    expect(encodeAttrOut(out, 5, st, 1)).to.equal(OutHeader.SIZE + 104);
    expect(decodeAttr(out, OutHeader.SIZE + 16)).to.deep.equal({ ino: 5, ...st });
    expect(encodeEntryOut(out, 6, st, 1)).to.equal(OutHeader.SIZE + EntryOut.SIZE);
    expect(u64(out, OutHeader.SIZE + EntryOut.nodeid)).to.equal(6);
    expect(decodeAttr(out, OutHeader.SIZE + EntryOut.attr)).to.deep.equal({ ino: 6, ...st });
    expect(Attr.SIZE).to.equal(88);
  });

  it('round-trips the small replies: open, write, lseek, statfs, init', () => {
    const out = replyBuffer(StatfsOut.SIZE);
    expect(encodeOpenOut(out, 2 ** 35, 3)).to.equal(OutHeader.SIZE + OpenOut.SIZE);
    expect([u64(out, OutHeader.SIZE + OpenOut.fh), out.readUInt32LE(OutHeader.SIZE + OpenOut.open_flags)]).to.deep.equal([2 ** 35, 3]);
    expect(encodeWriteOut(out, 1 << 20)).to.equal(OutHeader.SIZE + WriteOut.SIZE);
    expect(out.readUInt32LE(OutHeader.SIZE + WriteOut.size)).to.equal(1 << 20);
    expect(encodeLseekOut(out, 2 ** 52)).to.equal(OutHeader.SIZE + LseekOut.SIZE);
    expect(u64(out, OutHeader.SIZE + LseekOut.offset)).to.equal(2 ** 52);
    const s = { blocks: 2 ** 40, bfree: 1, bavail: 2, files: 3, ffree: 4, bsize: 4096, namelen: 255, frsize: 512 };
    expect(encodeStatfsOut(out, s)).to.equal(OutHeader.SIZE + StatfsOut.SIZE);
    expect(u64(out, OutHeader.SIZE + StatfsOut.blocks)).to.equal(2 ** 40);
    expect(out.readUInt32LE(OutHeader.SIZE + StatfsOut.frsize)).to.equal(512);
    const init = { major: 7, minor: 38, maxReadahead: 1 << 20, flags: (1 << 30) | (1 << 22), maxBackground: 16, congestionThreshold: 12, maxWrite: 1 << 20, timeGran: 1, maxPages: 256, flags2: 16 };
    expect(encodeInitOut(out, init, 38)).to.equal(OutHeader.SIZE + 64);
    expect(encodeInitOut(out, init, 22)).to.equal(OutHeader.SIZE + 24);
    expect(out.readUInt16LE(OutHeader.SIZE + InitOut.max_pages)).to.equal(256);
    expect(out.readUInt32LE(OutHeader.SIZE + InitOut.flags)).to.equal(((1 << 30) | (1 << 22)) >>> 0);
    expect(out.readUInt32LE(OutHeader.SIZE + InitOut.max_stack_depth)).to.equal(0);
    // FUSE passthrough (7.40): the stack depth in INIT, the backing id in OPEN.
    encodeInitOut(out, { ...init, flags2: 16 | 32, maxStackDepth: 1 }, 45);
    expect(out.readUInt32LE(OutHeader.SIZE + InitOut.max_stack_depth)).to.equal(1);
    expect(out.readUInt32LE(OutHeader.SIZE + InitOut.flags2)).to.equal(48);
    expect(encodeOpenOut(out, 7, 1 << 7, 5)).to.equal(OutHeader.SIZE + OpenOut.SIZE);
    expect([out.readUInt32LE(OutHeader.SIZE + OpenOut.open_flags), out.readInt32LE(OutHeader.SIZE + OpenOut.backing_id)]).to.deep.equal([1 << 7, 5]);
  });

  it('packs directory entries as far as they fit, each pointing at the next', () => {
    const entries = [
      { name: '.', ino: 1, type: DT_DIR },
      { name: '..', ino: 1, type: DT_DIR },
      ...Array.from({ length: 50 }, (_, i) => ({ name: `disk-${i}-${'é'.repeat(i % 7)}.raw`, ino: i + 2, type: DT_REG })),
    ];
    const seen: typeof entries = [];
    let offset = 0;
    while (offset < entries.length) {
      const out = Buffer.alloc(OutHeader.SIZE + 512);
      const len = encodeDirents(out, entries, offset);
      const got = decodeDirents(out, len);
      expect(got.length, 'a page holds at least one entry').to.be.greaterThan(0);
      for (const d of got) seen.push({ name: d.name, ino: d.ino, type: d.type });
      offset = got[got.length - 1]!.off;
    }
    expect(seen).to.deep.equal(entries);
  });

  it('writes an error as the negative errno in fuse_out_header', () => {
    const out = replyBuffer(0);
    encodeOutHeader(out, OutHeader.SIZE, E.ENOENT, 2 ** 40 + 6);
    expect(out.readInt32LE(OutHeader.error)).to.equal(-E.ENOENT);
    expect(decodeOutHeader(out)).to.deep.equal({ len: OutHeader.SIZE, error: E.ENOENT, unique: 2 ** 40 + 6 });
  });
});

// ---- one session over a socket pair -------------------------------------------------

/** The kernel's end of a session: send requests, collect replies by unique. */
class FakeKernel {
  readonly replies = new Map<number, { error: number; body: Buffer }[]>();
  private readonly buf = Buffer.alloc(1 << 21);
  private nextUnique = 2;

  constructor(readonly fd: number) {}

  send(opcode: number, nodeid: number, body?: Buffer): number {
    const unique = this.nextUnique;
    this.nextUnique += 2;
    fs.writeSync(this.fd, encodeRequest({ opcode, unique, nodeid }, body));
    return unique;
  }

  /** Collect replies until `until` holds (or time runs out). */
  async poll(until: () => boolean, ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    for (;;) {
      for (;;) {
        const n = readNoBlock(this.fd, this.buf);
        if (n <= 0) break;
        const h = decodeOutHeader(this.buf);
        expect(h.len).to.equal(n);
        const list = this.replies.get(h.unique) ?? [];
        list.push({ error: h.error, body: Buffer.from(this.buf.subarray(OutHeader.SIZE, n)) });
        this.replies.set(h.unique, list);
      }
      if (until() || Date.now() > deadline) return;
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  async reply(unique: number): Promise<{ error: number; body: Buffer }> {
    await this.poll(() => this.replies.has(unique));
    const r = this.replies.get(unique);
    if (!r) throw new Error(`no reply to ${unique}`);
    return r[0]!;
  }
}

describe('FUSE session over a socket pair', () => {
  let kernelFd: number;
  let serverFd: number;
  let session: Session;
  let kernel: FakeKernel;
  const forgotten: number[] = [];
  let destroyed = 0;
  let releaseRead: (() => void) | undefined;
  const file: Stat = { mode: 0o100444, size: 1 << 20, uid: 0, gid: 0, nlink: 1, blocks: 8, atime: new Date(0), mtime: new Date(0), ctime: new Date(0) };
  const ops: FsOps = {
    lookup: async (parent, name) => {
      if (parent !== ROOT_ID || name !== 'disk.raw') throw new ErrnoError(name, E.ENOENT);
      return { ino: 2, attr: file };
    },
    forget: (ino) => void forgotten.push(ino),
    getattr: async () => file,
    readdir: async () => [{ name: 'disk.raw', ino: 2, dir: false }],
    open: async () => ({ fh: 1, writable: false, size: file.size }),
    release: async () => {},
    read: async (_ino, _fh, buf, length, position) => {
      // A read at 512 KiB waits until the test lets it go.
      if (position === 512 * 1024) await new Promise<void>((r) => (releaseRead = r));
      buf.fill(position >> 16, 0, length);
      return length;
    },
    write: async () => 0,
    truncate: async () => {},
    flush: async () => {},
    fsync: async () => {},
    lseek: async (_ino, _fh, offset, whence) => (whence === SEEK_DATA ? Math.max(offset, 65536) : file.size),
    statfs: async () => ({}),
    utimens: async () => {},
    chmod: async () => {},
    chown: async () => {},
    destroy: async () => void destroyed++,
  };

  before(() => {
    [kernelFd, serverFd] = socketPair(true);
    session = new Session('/nowhere', serverFd, ops, { maxWrite: 1 << 20, maxReadahead: 1 << 20, pageCache: 'auto', interruptGraceMs: 300 });
    kernel = new FakeKernel(kernelFd);
  });
  after(() => {
    session.close();
    fs.closeSync(kernelFd);
  });

  const readIn = (offset: number, size: number): Buffer => body(ReadIn.SIZE, (b) => (putU64(b, ReadIn.fh, 1), putU64(b, ReadIn.offset, offset), b.writeUInt32LE(size, ReadIn.size)));

  it('counts lookups and forgets a node when the kernel gives all of them back', async () => {
    for (let i = 0; i < 3; i++) expect((await kernel.reply(kernel.send(Op.LOOKUP, ROOT_ID, Buffer.from('disk.raw\0')))).error).to.equal(0);
    expect(session.lookupCount(2)).to.equal(3);
    expect((await kernel.reply(kernel.send(Op.LOOKUP, ROOT_ID, Buffer.from('other.raw\0')))).error).to.equal(E.ENOENT);
    kernel.send(Op.FORGET, 2, body(ForgetIn.SIZE, (b) => putU64(b, ForgetIn.nlookup, 1)));
    const batch = body(BatchForgetIn.SIZE + ForgetOne.SIZE, (b) => (b.writeUInt32LE(1, BatchForgetIn.count), putU64(b, BatchForgetIn.SIZE + ForgetOne.nodeid, 2), putU64(b, BatchForgetIn.SIZE + ForgetOne.nlookup, 2)));
    kernel.send(Op.BATCH_FORGET, 0, batch);
    // FORGET has no reply: a GETATTR after it shows it was handled (requests are served in order).
    expect((await kernel.reply(kernel.send(Op.GETATTR, 2, Buffer.alloc(16)))).error).to.equal(0);
    expect(session.lookupCount(2)).to.equal(0);
    expect(forgotten).to.deep.equal([2]);
  });

  const interruptIn = (unique: number): Buffer => body(InterruptIn.SIZE, (b) => putU64(b, InterruptIn.unique, unique));

  it('answers an interrupted request normally when it finishes within the grace period', async () => {
    const slow = kernel.send(Op.READ, 2, readIn(512 * 1024, 4096));
    await kernel.poll(() => releaseRead !== undefined);
    kernel.send(Op.INTERRUPT, 0, interruptIn(slow));
    await kernel.poll(() => false, 50);
    releaseRead!();
    releaseRead = undefined;
    expect((await kernel.reply(slow)).error).to.equal(0);
    await kernel.poll(() => false, 500);
    expect(kernel.replies.get(slow)).to.have.length(1);
  });

  it('answers a request still running after the grace period EINTR once, and drops its late answer', async () => {
    const slow = kernel.send(Op.READ, 2, readIn(512 * 1024, 4096));
    const fast = kernel.send(Op.READ, 2, readIn(0, 4096));
    expect((await kernel.reply(fast)).error).to.equal(0);
    kernel.send(Op.INTERRUPT, 0, interruptIn(slow));
    const started = Date.now();
    expect((await kernel.reply(slow)).error).to.equal(E.EINTR);
    expect(Date.now() - started).to.be.at.least(250);
    releaseRead!();
    releaseRead = undefined;
    // Anything after it is answered; the slow read's own answer never comes.
    expect((await kernel.reply(kernel.send(Op.GETATTR, 2, Buffer.alloc(16)))).error).to.equal(0);
    await kernel.poll(() => false, 100);
    expect(kernel.replies.get(slow)).to.have.length(1);
    // (An interrupt for a request already answered: the kernel refuses our EINTR with
    // ENOENT and nothing is remembered. A socket cannot refuse, so that is untested.)
  });

  it('answers LSEEK from the file tree, and a READ of a whole message', async () => {
    const r = await kernel.reply(kernel.send(Op.LSEEK, 2, body(LseekIn.SIZE, (b) => (putU64(b, LseekIn.offset, 10), b.writeUInt32LE(SEEK_DATA, LseekIn.whence)))));
    expect(r.error).to.equal(0);
    expect(u64(r.body, LseekOut.offset)).to.equal(65536);
    // SEEK_SET and the like are the kernel's own business.
    const set = await kernel.reply(kernel.send(Op.LSEEK, 2, body(LseekIn.SIZE, (b) => b.writeUInt32LE(0, LseekIn.whence))));
    expect(set.error).to.equal(E.ENOSYS);
    // (Replies larger than the socket's buffer cannot be sent over it: 64 KiB.)
    const read = await kernel.reply(kernel.send(Op.READ, 2, readIn(3 << 16, 65536)));
    expect(read.body.length).to.equal(65536);
    expect(read.body[0]).to.equal(3);
  });

  it('answers a malformed request EIO and keeps serving', async () => {
    const u = kernel.send(Op.OPEN, 2, Buffer.alloc(3));
    expect((await kernel.reply(u)).error).to.equal(E.EIO);
    const w = kernel.send(Op.WRITE, 2, body(WriteIn.SIZE, (b) => b.writeUInt32LE(4096, WriteIn.size)));
    expect((await kernel.reply(w)).error).to.equal(E.EIO);
    expect((await kernel.reply(kernel.send(Op.GETATTR, 2, Buffer.alloc(16)))).error).to.equal(0);
  });

  it('writes everything out on DESTROY before answering', async () => {
    expect((await kernel.reply(kernel.send(Op.DESTROY, 0))).error).to.equal(0);
    expect(destroyed).to.equal(1);
  });
});
