// The NBD wire parser and handshake state machine, without sockets: every server
// stream is also fed split at every byte, and must give the same result.
import { expect } from 'chai';
import {
  NBD_CMD,
  NBD_FLAG,
  NBD_INFO,
  NBD_MAGIC,
  NBD_OPT,
  NBD_OPTS_MAGIC,
  NBD_REP,
  NBD_REP_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_CLISERV_MAGIC,
  type NbdCommand,
} from '../drivers/protocol/nbd/constants.js';
import { Handshake, NbdRefusedError, type ExportInfo } from '../drivers/protocol/nbd/handshake.js';
import { encodeRequest, NbdProtocolError, ReplyParser, type Expectation, type ReplyEvent } from '../drivers/protocol/nbd/parser.js';
import { formatNbdUri, nbdStem, parseNbdSpec, resolveNbdRelative } from '../drivers/protocol/nbd/uri.js';

// ---- building server bytes --------------------------------------------------------

function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
function u16(v: number): Uint8Array {
  const b = new Uint8Array(2);
  new DataView(b.buffer).setUint16(0, v);
  return b;
}
function u32(v: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v);
  return b;
}
function u64(v: bigint | number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(v));
  return b;
}
const text = (s: string): Uint8Array => new TextEncoder().encode(s);

function optReply(opt: number, type: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  return cat(u64(NBD_REP_MAGIC), u32(opt), u32(type), u32(data.length), data);
}
const greeting = (flags = 3): Uint8Array => cat(u64(NBD_MAGIC), u64(NBD_OPTS_MAGIC), u16(flags));
const SIZE = 5 * 2 ** 40 + 512; // beyond 32 bits on purpose
const TFLAGS = NBD_FLAG.HAS_FLAGS | NBD_FLAG.SEND_FLUSH | NBD_FLAG.SEND_FUA | NBD_FLAG.CAN_MULTI_CONN;

const fullNegotiation = cat(
  greeting(),
  optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK),
  optReply(NBD_OPT.SET_META_CONTEXT, NBD_REP.META_CONTEXT, cat(u32(7), text('base:allocation'))),
  optReply(NBD_OPT.SET_META_CONTEXT, NBD_REP.ACK),
  optReply(NBD_OPT.GO, NBD_REP.INFO, cat(u16(NBD_INFO.EXPORT), u64(SIZE), u16(TFLAGS))),
  optReply(NBD_OPT.GO, NBD_REP.INFO, cat(u16(NBD_INFO.BLOCK_SIZE), u32(512), u32(4096), u32(1 << 25))),
  optReply(NBD_OPT.GO, NBD_REP.INFO, cat(u16(NBD_INFO.NAME), text('disk'))),
  optReply(NBD_OPT.GO, NBD_REP.ACK),
);

/** Every way to cut a stream in two, plus byte by byte. */
function splits(stream: Uint8Array): { label: string; pieces: Uint8Array[] }[] {
  const out: { label: string; pieces: Uint8Array[] }[] = [{ label: 'whole', pieces: [stream] }];
  for (let i = 1; i < stream.length; i++) out.push({ label: `split at ${i}`, pieces: [stream.slice(0, i), stream.slice(i)] });
  out.push({ label: 'byte by byte', pieces: Array.from(stream, (b) => Uint8Array.of(b)) });
  return out;
}

function runHandshake(pieces: Uint8Array[], exportName = 'disk'): { hs: Handshake; sent: Uint8Array } {
  const hs = new Handshake({ exportName, structuredReplies: true, metaContexts: ['base:allocation'] });
  const sent: Uint8Array[] = [];
  for (const p of pieces) {
    hs.feed(p);
    sent.push(...hs.takeOutput());
  }
  return { hs, sent: cat(...sent) };
}

describe('NBD handshake state machine (no sockets)', () => {
  it('negotiates structured replies, base:allocation and GO, however the server bytes are split', () => {
    const reference = runHandshake([fullNegotiation]);
    expect(reference.hs.state).to.equal('READY');
    const info = reference.hs.export as ExportInfo;
    expect(info.size).to.equal(SIZE);
    expect(info.flags).to.equal(TFLAGS);
    expect(info.structuredReplies).to.equal(true);
    expect([...info.metaContexts]).to.deep.equal([['base:allocation', 7]]);
    expect([info.minBlock, info.preferredBlock, info.maxBlock]).to.deep.equal([512, 4096, 1 << 25]);
    for (const { label, pieces } of splits(fullNegotiation)) {
      const r = runHandshake(pieces);
      expect(r.hs.export, label).to.deep.equal(info);
      expect(Buffer.from(r.sent).equals(Buffer.from(reference.sent)), label).to.equal(true);
    }
  });

  it('sends client flags, then STRUCTURED_REPLY, SET_META_CONTEXT and GO in that order', () => {
    const { sent } = runHandshake([fullNegotiation]);
    const dv = new DataView(sent.buffer, sent.byteOffset, sent.byteLength);
    expect(dv.getUint32(0)).to.equal(3); // fixed newstyle + no zeroes
    const options: number[] = [];
    for (let at = 4; at < sent.length; ) {
      expect(dv.getBigUint64(at)).to.equal(NBD_OPTS_MAGIC);
      options.push(dv.getUint32(at + 8));
      at += 16 + dv.getUint32(at + 12);
    }
    expect(options).to.deep.equal([NBD_OPT.STRUCTURED_REPLY, NBD_OPT.SET_META_CONTEXT, NBD_OPT.GO]);
  });

  it('keeps bytes that arrive after READY for the transmission phase', () => {
    const extra = Uint8Array.of(1, 2, 3);
    const { hs } = runHandshake([cat(fullNegotiation, extra)]);
    expect([...hs.leftover()]).to.deep.equal([1, 2, 3]);
  });

  it('does without structured replies and meta contexts when the server refuses them', () => {
    const stream = cat(
      greeting(),
      optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_UNSUP),
      optReply(NBD_OPT.GO, NBD_REP.INFO, cat(u16(NBD_INFO.EXPORT), u64(1 << 20), u16(1))),
      optReply(NBD_OPT.GO, NBD_REP.ACK),
    );
    for (const { label, pieces } of splits(stream)) {
      const { hs } = runHandshake(pieces);
      expect(hs.export?.structuredReplies, label).to.equal(false);
      expect(hs.export?.metaContexts.size, label).to.equal(0);
      expect(hs.export?.size, label).to.equal(1 << 20);
    }
  });

  it('falls back to NBD_OPT_EXPORT_NAME when the server lacks GO', () => {
    for (const noZeroes of [true, false]) {
      const stream = cat(
        greeting(noZeroes ? 3 : 1),
        optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_UNSUP),
        optReply(NBD_OPT.GO, NBD_REP.ERR_UNSUP),
        u64(3 << 20),
        u16(NBD_FLAG.HAS_FLAGS | NBD_FLAG.READ_ONLY),
        noZeroes ? new Uint8Array(0) : new Uint8Array(124),
      );
      for (const { label, pieces } of splits(stream)) {
        const { hs } = runHandshake(pieces);
        expect(hs.state, label).to.equal('READY');
        expect(hs.export?.size).to.equal(3 << 20);
        expect(hs.export?.flags).to.equal(NBD_FLAG.HAS_FLAGS | NBD_FLAG.READ_ONLY);
      }
    }
  });

  const refusals: [string, Uint8Array, RegExp][] = [
    ['an unknown export', optReply(NBD_OPT.GO, NBD_REP.ERR_UNKNOWN, text('no such export')), /has no export 'disk': no such export/],
    ['TLS required', optReply(NBD_OPT.GO, NBD_REP.ERR_TLS_REQD), /requires TLS/],
    ['a policy refusal', optReply(NBD_OPT.GO, NBD_REP.ERR_POLICY), /refused export 'disk' by policy/],
  ];
  for (const [what, reply, message] of refusals) {
    it(`refuses with one line for ${what}`, () => {
      const stream = cat(greeting(), optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_UNSUP), reply);
      expect(() => runHandshake([stream])).to.throw(NbdRefusedError, message);
    });
  }

  const broken: [string, Uint8Array, new (message: string) => Error][] = [
    ['a greeting that is not NBDMAGIC', cat(u64(0x1234n), u64(NBD_OPTS_MAGIC), u16(3)), NbdProtocolError],
    ['oldstyle negotiation', cat(u64(NBD_MAGIC), u64(NBD_CLISERV_MAGIC)), NbdRefusedError],
    ['a server without fixed newstyle', greeting(0), NbdRefusedError],
    ['a reply to another option', cat(greeting(), optReply(NBD_OPT.GO, NBD_REP.ACK)), NbdProtocolError],
    ['a huge option reply', cat(greeting(), u64(NBD_REP_MAGIC), u32(NBD_OPT.STRUCTURED_REPLY), u32(NBD_REP.ACK), u32(1 << 30)), NbdProtocolError],
    [
      'GO without NBD_INFO_EXPORT',
      cat(greeting(), optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_UNSUP), optReply(NBD_OPT.GO, NBD_REP.ACK)),
      NbdProtocolError,
    ],
    [
      'block sizes that are not powers of two',
      cat(greeting(), optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_UNSUP), optReply(NBD_OPT.GO, NBD_REP.INFO, cat(u16(NBD_INFO.BLOCK_SIZE), u32(3), u32(4096), u32(1 << 20)))),
      NbdProtocolError,
    ],
  ];
  for (const [what, stream, kind] of broken) {
    it(`rejects ${what}`, () => {
      expect(() => runHandshake([stream])).to.throw(kind);
    });
  }
});

// ---- transmission replies --------------------------------------------------------------

function simple(handle: number, errno = 0, data?: Uint8Array): Uint8Array {
  return cat(u32(NBD_SIMPLE_REPLY_MAGIC), u32(errno), u64(handle), data ?? new Uint8Array(0));
}
function chunk(handle: number, type: number, payload: Uint8Array, done = false): Uint8Array {
  return cat(u32(NBD_STRUCTURED_REPLY_MAGIC), u16(done ? NBD_REPLY_FLAG_DONE : 0), u16(type), u64(handle), u32(payload.length), payload);
}
const pattern = (n: number, seed: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);

interface Outcome {
  reads: Map<number, number[]>;
  status: Map<number, { contextId: number; extents: { length: number; flags: number }[] }>;
  errors: Map<number, string>;
  done: number[];
}

function parseAll(structured: boolean, requests: [number, Expectation][], pieces: Uint8Array[]): Outcome {
  const p = new ReplyParser(structured);
  for (const [h, e] of requests) p.expect(h, e);
  const bufs = new Map<number, Uint8Array>(requests.filter(([, e]) => e.cmd === NBD_CMD.READ).map(([h, e]) => [h, new Uint8Array(e.length).fill(0xee)]));
  const out: Outcome = { reads: new Map(), status: new Map(), errors: new Map(), done: [] };
  const emit = (ev: ReplyEvent): void => {
    const e = requests.find(([h]) => h === ev.handle)![1];
    if (ev.kind === 'data') bufs.get(ev.handle)!.set(ev.bytes, ev.offset - e.offset);
    else if (ev.kind === 'hole') bufs.get(ev.handle)!.fill(0, ev.offset - e.offset, ev.offset - e.offset + ev.length);
    else if (ev.kind === 'block-status') out.status.set(ev.handle, { contextId: ev.contextId, extents: ev.extents });
    else if (ev.kind === 'error') out.errors.set(ev.handle, `${ev.errno} ${ev.message}`);
    else out.done.push(ev.handle);
  };
  for (const piece of pieces) p.feed(piece, emit);
  for (const [h, b] of bufs) out.reads.set(h, [...b]);
  return out;
}

const req = (cmd: NbdCommand, offset: number, length: number): Expectation => ({ cmd, offset, length });

describe('NBD reply parser (no sockets)', () => {
  const BIG = 2 ** 40; // offsets past 32 bits
  const requests: [number, Expectation][] = [
    [1, req(NBD_CMD.WRITE, 0, 512)],
    [2, req(NBD_CMD.READ, BIG, 64)],
    [2 ** 33 + 3, req(NBD_CMD.READ, 4096, 96)],
    [4, req(NBD_CMD.BLOCK_STATUS, 0, 1 << 20)],
    [5, req(NBD_CMD.READ, 0, 16)],
    [6, req(NBD_CMD.FLUSH, 0, 0)],
  ];
  const structuredStream = cat(
    simple(1),
    // Handle 2: data in two chunks out of order, then NONE.
    chunk(2, NBD_REPLY_TYPE.OFFSET_DATA, cat(u64(BIG + 32), pattern(32, 1))),
    chunk(2 ** 33 + 3, NBD_REPLY_TYPE.OFFSET_HOLE, cat(u64(4096), u32(32))),
    chunk(2, NBD_REPLY_TYPE.OFFSET_DATA, cat(u64(BIG), pattern(32, 2))),
    chunk(4, NBD_REPLY_TYPE.BLOCK_STATUS, cat(u32(1), u32(65536), u32(0), u32(983040), u32(3)), true),
    chunk(2, NBD_REPLY_TYPE.NONE, new Uint8Array(0), true),
    // Handle 2^33+3: data, then data with DONE.
    chunk(2 ** 33 + 3, NBD_REPLY_TYPE.OFFSET_DATA, cat(u64(4096 + 32), pattern(32, 3))),
    chunk(2 ** 33 + 3, NBD_REPLY_TYPE.OFFSET_DATA, cat(u64(4096 + 64), pattern(32, 4)), true),
    // Handle 5: an error with a message, then DONE.
    chunk(5, NBD_REPLY_TYPE.ERROR, cat(u32(5), u16(4), text('oops'))),
    chunk(5, NBD_REPLY_TYPE.NONE, new Uint8Array(0), true),
    simple(6, 28),
  );

  it('frames simple and structured replies however the bytes are split', () => {
    const reference = parseAll(true, requests, [structuredStream]);
    expect(reference.done).to.deep.equal([1, 4, 2, 2 ** 33 + 3, 5, 6]);
    expect(reference.reads.get(2)).to.deep.equal([...pattern(32, 2), ...pattern(32, 1)]);
    expect(reference.reads.get(2 ** 33 + 3)).to.deep.equal([...new Uint8Array(32), ...pattern(32, 3), ...pattern(32, 4)]);
    expect(reference.status.get(4)).to.deep.equal({ contextId: 1, extents: [{ length: 65536, flags: 0 }, { length: 983040, flags: 3 }] });
    expect(reference.errors.get(5)).to.equal('5 oops');
    expect(reference.errors.get(6)).to.equal('28 ');
    for (const { label, pieces } of splits(structuredStream)) {
      expect(parseAll(true, requests, pieces), label).to.deep.equal(reference);
    }
  });

  it('reads a simple reply with its data however the bytes are split', () => {
    const reqs: [number, Expectation][] = [[9, req(NBD_CMD.READ, 512, 40)], [10, req(NBD_CMD.WRITE, 0, 4)]];
    const stream = cat(simple(9, 0, pattern(40, 9)), simple(10));
    for (const { label, pieces } of splits(stream)) {
      const o = parseAll(false, reqs, pieces);
      expect(o.reads.get(9), label).to.deep.equal([...pattern(40, 9)]);
      expect(o.done, label).to.deep.equal([9, 10]);
    }
  });

  const malformed: [string, boolean, [number, Expectation][], Uint8Array][] = [
    ['a bad magic', true, [[1, req(NBD_CMD.READ, 0, 8)]], cat(u32(0xdeadbeef), new Uint8Array(12))],
    ['a reply to an unknown handle', true, [[1, req(NBD_CMD.READ, 0, 8)]], simple(2)],
    ['a structured reply that was not negotiated', false, [[1, req(NBD_CMD.READ, 0, 8)]], chunk(1, NBD_REPLY_TYPE.NONE, new Uint8Array(0), true)],
    ['data outside the read', true, [[1, req(NBD_CMD.READ, 0, 8)]], chunk(1, NBD_REPLY_TYPE.OFFSET_DATA, cat(u64(4), pattern(8, 0)), true)],
    ['a hole outside the read', true, [[1, req(NBD_CMD.READ, 0, 8)]], chunk(1, NBD_REPLY_TYPE.OFFSET_HOLE, cat(u64(0), u32(9)), true)],
    ['data in reply to a write', true, [[1, req(NBD_CMD.WRITE, 0, 8)]], chunk(1, NBD_REPLY_TYPE.OFFSET_DATA, cat(u64(0), pattern(8, 0)), true)],
    ['an unknown chunk type', true, [[1, req(NBD_CMD.READ, 0, 8)]], chunk(1, 77, new Uint8Array(0), true)],
    ['a NONE chunk without DONE', true, [[1, req(NBD_CMD.READ, 0, 8)]], chunk(1, NBD_REPLY_TYPE.NONE, new Uint8Array(0))],
    ['a block status chunk of odd size', true, [[1, req(NBD_CMD.BLOCK_STATUS, 0, 8)]], chunk(1, NBD_REPLY_TYPE.BLOCK_STATUS, cat(u32(1), u32(8)), true)],
    ['a simple reply to block status', true, [[1, req(NBD_CMD.BLOCK_STATUS, 0, 8)]], simple(1)],
    ['an error message longer than its chunk', true, [[1, req(NBD_CMD.READ, 0, 8)]], chunk(1, NBD_REPLY_TYPE.ERROR, cat(u32(5), u16(100), text('x')), true)],
    ['a handle beyond 2^53', true, [[1, req(NBD_CMD.READ, 0, 8)]], cat(u32(NBD_SIMPLE_REPLY_MAGIC), u32(0), u64(2n ** 60n))],
  ];
  for (const [what, structured, reqs, stream] of malformed) {
    it(`rejects ${what}`, () => {
      expect(() => parseAll(structured, reqs, [stream])).to.throw(NbdProtocolError);
    });
  }

  it('encodes a request header with 64-bit handle and offset', () => {
    const h = encodeRequest(1, NBD_CMD.WRITE, 2 ** 40 + 5, 2 ** 45 + 512, 4096);
    const dv = new DataView(h.buffer);
    expect(dv.getUint32(0)).to.equal(0x25609513);
    expect(dv.getUint16(4)).to.equal(1);
    expect(dv.getUint16(6)).to.equal(NBD_CMD.WRITE);
    expect(dv.getBigUint64(8)).to.equal(2n ** 40n + 5n);
    expect(dv.getBigUint64(16)).to.equal(2n ** 45n + 512n);
    expect(dv.getUint32(24)).to.equal(4096);
  });
});

describe('NBD image names', () => {
  const table: [string, ReturnType<typeof parseNbdSpec>][] = [
    ['nbd://example.org/disk', { address: { kind: 'tcp', host: 'example.org', port: 10809 }, exportName: 'disk' }],
    ['nbd://example.org:1234/', { address: { kind: 'tcp', host: 'example.org', port: 1234 }, exportName: '' }],
    ['nbd://example.org', { address: { kind: 'tcp', host: 'example.org', port: 10809 }, exportName: '' }],
    ['nbd+tcp://[::1]:99/a%20b/c.qcow2', { address: { kind: 'tcp', host: '::1', port: 99 }, exportName: 'a b/c.qcow2' }],
    ['nbd+unix:///exp?socket=/run/nbd.sock', { address: { kind: 'unix', path: '/run/nbd.sock' }, exportName: 'exp' }],
    ['nbd+unix:///?socket=/tmp/s', { address: { kind: 'unix', path: '/tmp/s' }, exportName: '' }],
    ['nbd:localhost:10809', { address: { kind: 'tcp', host: 'localhost', port: 10809 }, exportName: '' }],
    ['nbd:localhost:4321:exportname=vm', { address: { kind: 'tcp', host: 'localhost', port: 4321 }, exportName: 'vm' }],
    ['nbd:unix:/tmp/nbd.sock', { address: { kind: 'unix', path: '/tmp/nbd.sock' }, exportName: '' }],
    ['nbd:unix:/tmp/nbd.sock:exportname=a:b', { address: { kind: 'unix', path: '/tmp/nbd.sock' }, exportName: 'a:b' }],
  ];
  for (const [spec, want] of table) {
    it(`parses ${spec}`, () => {
      expect(parseNbdSpec(spec)).to.deep.equal(want);
      // The URI form names the same target.
      expect(parseNbdSpec(formatNbdUri(want))).to.deep.equal(want);
    });
  }
  for (const bad of ['nbd+unix:///x', 'nbd+unix://host/x?socket=/s', 'nbd://host:0/x', 'nbd://host:99999/', 'nbd://:10809/x', 'nbd://h/x?socket=/s', 'nbd:unix:']) {
    it(`refuses ${bad}`, () => expect(() => parseNbdSpec(bad)).to.throw(/nbd|NBD|port/));
  }
  it('resolves a backing file to another export on the same server', () => {
    expect(resolveNbdRelative('nbd://h:5/dir/top.qcow2', 'base.qcow2')).to.equal('nbd://h:5/dir/base.qcow2');
    expect(resolveNbdRelative('nbd+unix:///top?socket=/s', 'base')).to.equal('nbd+unix:///base?socket=/s');
    expect(resolveNbdRelative('nbd:unix:/s:exportname=top', 'base')).to.equal('nbd+unix:///base?socket=/s');
  });
  it('names the flat file after the export', () => {
    expect(nbdStem('nbd://h/dir/disk.qcow2')).to.equal('disk');
    expect(nbdStem('nbd://h/')).to.equal('nbd');
  });
});
