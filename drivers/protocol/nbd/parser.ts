// The NBD wire format, without sockets (shared/STYLE.md, "Protocols as explicit state"):
// a byte queue that keeps leftovers between chunks, encoders for what the client sends,
// and the transmission-phase reply parser. Everything here is fed bytes and returns
// values or events; the transport (client.ts) owns the socket.
import { ProtocolError } from '../../errors.js';
import {
  MAX_PAYLOAD,
  NBD_CMD,
  NBD_OPTS_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_BYTES,
  STRUCTURED_HEADER_BYTES,
  type NbdCommand,
} from './constants.js';

/** The server broke the protocol: the connection's state is unknown from here on. */
export class NbdProtocolError extends ProtocolError {}

const TWO_32 = 0x1_0000_0000;

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** A 64-bit big-endian field that must fit a number exactly (sizes, offsets, handles). */
export function getU64(dv: DataView, at: number, what: string): number {
  const hi = dv.getUint32(at);
  const lo = dv.getUint32(at + 4);
  if (hi >= 0x200000) throw new NbdProtocolError(`${what} ${dv.getBigUint64(at)} is beyond 2^53`);
  return hi * TWO_32 + lo;
}

function setU64(dv: DataView, at: number, v: number): void {
  dv.setUint32(at, Math.floor(v / TWO_32));
  dv.setUint32(at + 4, v >>> 0);
}

/** Bytes received but not yet parsed, kept as the chunks they came in. */
export class ByteQueue {
  private chunks: Uint8Array[] = [];
  private head = 0; // bytes of chunks[0] already consumed
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Exactly n bytes (a copy only when they span chunks), or undefined if not all here yet. */
  take(n: number): Uint8Array | undefined {
    if (this.total < n) return undefined;
    const first = this.chunks[0];
    if (n === 0) return new Uint8Array(0);
    if (first && first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, n - filled);
      out.set(c.subarray(this.head, this.head + k), filled);
      filled += k;
      this.advance(k);
    }
    return out;
  }

  /** The next 4 bytes as a big-endian number, without consuming them. */
  peekU32(): number | undefined {
    if (this.total < 4) return undefined;
    let v = 0;
    let c = 0;
    let at = this.head;
    for (let i = 0; i < 4; i++) {
      while (at >= this.chunks[c]!.length) {
        at = 0;
        c++;
      }
      v = v * 256 + this.chunks[c]![at++]!;
    }
    return v;
  }

  /** Up to n bytes from the first chunk, without copying (for streaming payloads). */
  takeSome(n: number): Uint8Array | undefined {
    const first = this.chunks[0];
    if (!first || n === 0) return undefined;
    const k = Math.min(first.length - this.head, n);
    const out = first.subarray(this.head, this.head + k);
    this.advance(k);
    return out;
  }

  /** Everything left, as one array (hands leftovers from one phase to the next). */
  drain(): Uint8Array {
    return this.take(this.total) ?? new Uint8Array(0);
  }

  private advance(n: number): void {
    this.head += n;
    this.total -= n;
    while (this.chunks.length && this.head >= this.chunks[0]!.length) {
      this.head -= this.chunks[0]!.length;
      this.chunks.shift();
    }
  }
}

// ---- encoders --------------------------------------------------------------------

/** An option request: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(16 + data.length);
  const dv = view(out);
  dv.setBigUint64(0, NBD_OPTS_MAGIC);
  dv.setUint32(8, option);
  dv.setUint32(12, data.length);
  out.set(data, 16);
  return out;
}

const utf8 = new TextEncoder();

/** Concatenated length-prefixed strings and 16/32-bit fields, for option payloads. */
export function encodeFields(fields: ({ u16: number } | { u32: number } | { str: string } | { raw: Uint8Array })[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const f of fields) {
    if ('u16' in f) {
      const b = new Uint8Array(2);
      view(b).setUint16(0, f.u16);
      parts.push(b);
    } else if ('u32' in f) {
      const b = new Uint8Array(4);
      view(b).setUint32(0, f.u32);
      parts.push(b);
    } else if ('str' in f) {
      const s = utf8.encode(f.str);
      const b = new Uint8Array(4 + s.length);
      view(b).setUint32(0, s.length);
      b.set(s, 4);
      parts.push(b);
    } else {
      parts.push(f.raw);
    }
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A transmission request header (the payload of a write follows it on the wire). */
export function encodeRequest(flags: number, cmd: NbdCommand, handle: number, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(REQUEST_HEADER_BYTES);
  const dv = view(out);
  dv.setUint32(0, NBD_REQUEST_MAGIC);
  dv.setUint16(4, flags);
  dv.setUint16(6, cmd);
  setU64(dv, 8, handle);
  setU64(dv, 16, offset);
  dv.setUint32(24, length);
  return out;
}

// ---- transmission replies ----------------------------------------------------------

/** What the parser must know about a request to frame its reply. */
export interface Expectation {
  cmd: NbdCommand;
  offset: number;
  length: number;
}

export type ReplyEvent =
  /** Bytes of a read, at an absolute offset inside the request's range. */
  | { kind: 'data'; handle: number; offset: number; bytes: Uint8Array }
  /** A read range that is all zeros. */
  | { kind: 'hole'; handle: number; offset: number; length: number }
  | { kind: 'block-status'; handle: number; contextId: number; extents: { length: number; flags: number }[] }
  /** The server says this request failed (more chunks may follow until done). */
  | { kind: 'error'; handle: number; errno: number; message: string }
  /** The request's last reply: it is answered. */
  | { kind: 'done'; handle: number };

type ReplyState =
  | { s: 'magic' }
  | { s: 'simple-data'; handle: number; offset: number; left: number }
  | { s: 'chunk-payload'; handle: number; flags: number; type: number; length: number }
  | { s: 'data-offset'; handle: number; flags: number; dataLength: number }
  | { s: 'chunk-data'; handle: number; flags: number; offset: number; left: number };

/** A BLOCK_STATUS chunk carries at most this many bytes of descriptors (8 bytes each). */
const MAX_STATUS_PAYLOAD = 1 << 20;
/** An error chunk: errno, message length, a message of at most 4096 bytes, maybe an offset. */
const MAX_ERROR_PAYLOAD = 6 + 4096 + 8;

/**
 * The transmission phase's reply stream: simple and structured replies, framed with
 * what was asked. Malformed input throws NbdProtocolError; after that the parser (and
 * the connection) is unusable.
 */
export class ReplyParser {
  private readonly q = new ByteQueue();
  private state: ReplyState = { s: 'magic' };
  private readonly expected = new Map<number, Expectation>();

  constructor(private readonly structured: boolean) {}

  /** Tell the parser about a request before it is sent. */
  expect(handle: number, e: Expectation): void {
    this.expected.set(handle, e);
  }

  /** Requests sent and not yet fully answered. */
  pending(): number[] {
    return [...this.expected.keys()];
  }

  /** True between replies (nothing half-read). */
  get idle(): boolean {
    return this.state.s === 'magic' && this.q.length === 0;
  }

  feed(chunk: Uint8Array, emit: (ev: ReplyEvent) => void): void {
    this.q.push(chunk);
    for (;;) {
      const st = this.state;
      switch (st.s) {
        case 'magic': {
          const magic = this.q.peekU32();
          if (magic === undefined) return;
          if (magic === NBD_SIMPLE_REPLY_MAGIC) {
            const h = this.q.take(SIMPLE_REPLY_BYTES);
            if (!h) return;
            this.simple(h, emit);
          } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
            if (!this.structured) throw new NbdProtocolError('structured reply that was not negotiated');
            const h = this.q.take(STRUCTURED_HEADER_BYTES);
            if (!h) return;
            this.chunkHeader(h, emit);
          } else {
            throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
          }
          break;
        }
        case 'simple-data':
        case 'chunk-data': {
          const bytes = this.q.takeSome(st.left);
          if (!bytes) return;
          emit({ kind: 'data', handle: st.handle, offset: st.offset, bytes });
          st.offset += bytes.length;
          st.left -= bytes.length;
          if (st.left === 0) {
            this.state = { s: 'magic' };
            if (st.s === 'simple-data' || st.flags & NBD_REPLY_FLAG_DONE) this.finish(st.handle, emit);
          }
          break;
        }
        case 'data-offset': {
          const b = this.q.take(8);
          if (!b) return;
          const offset = getU64(view(b), 0, 'data chunk offset');
          const e = this.expected.get(st.handle)!;
          if (offset < e.offset || offset + st.dataLength > e.offset + e.length) {
            throw new NbdProtocolError(`data chunk [${offset}, +${st.dataLength}) outside the read [${e.offset}, +${e.length})`);
          }
          if (st.dataLength > 0) {
            this.state = { s: 'chunk-data', handle: st.handle, flags: st.flags, offset, left: st.dataLength };
          } else {
            this.state = { s: 'magic' };
            if (st.flags & NBD_REPLY_FLAG_DONE) this.finish(st.handle, emit);
          }
          break;
        }
        case 'chunk-payload': {
          // Fixed-size chunk payloads are parsed whole (they are small and capped).
          const payload = this.q.take(st.length);
          if (!payload) return;
          this.state = { s: 'magic' };
          this.chunkPayload(st.handle, st.type, payload, emit);
          if (st.flags & NBD_REPLY_FLAG_DONE) this.finish(st.handle, emit);
          break;
        }
      }
    }
  }

  private lookup(handle: number): Expectation {
    const e = this.expected.get(handle);
    if (!e) throw new NbdProtocolError(`reply for unknown handle ${handle}`);
    return e;
  }

  private simple(h: Uint8Array, emit: (ev: ReplyEvent) => void): void {
    const dv = view(h);
    const errno = dv.getUint32(4);
    const handle = getU64(dv, 8, 'reply handle');
    const e = this.lookup(handle);
    if (errno !== 0) {
      emit({ kind: 'error', handle, errno, message: '' });
      this.finish(handle, emit);
    } else if (e.cmd === NBD_CMD.READ && e.length > 0) {
      this.state = { s: 'simple-data', handle, offset: e.offset, left: e.length };
    } else if (e.cmd === NBD_CMD.BLOCK_STATUS) {
      throw new NbdProtocolError('simple reply to a block status request');
    } else {
      this.finish(handle, emit);
    }
  }

  private chunkHeader(h: Uint8Array, emit: (ev: ReplyEvent) => void): void {
    const dv = view(h);
    const flags = dv.getUint16(4);
    const type = dv.getUint16(6);
    const handle = getU64(dv, 8, 'reply handle');
    const length = dv.getUint32(16);
    const e = this.lookup(handle);
    switch (type) {
      case NBD_REPLY_TYPE.OFFSET_DATA:
        if (e.cmd !== NBD_CMD.READ) throw new NbdProtocolError('data chunk in reply to a request that is not a read');
        if (length < 8 || length - 8 > e.length) throw new NbdProtocolError(`data chunk of ${length} bytes for a read of ${e.length}`);
        this.state = { s: 'data-offset', handle, flags, dataLength: length - 8 };
        return;
      case NBD_REPLY_TYPE.NONE:
        if (length !== 0) throw new NbdProtocolError(`NONE chunk with ${length} bytes of payload`);
        if (!(flags & NBD_REPLY_FLAG_DONE)) throw new NbdProtocolError('NONE chunk without the DONE flag');
        this.finish(handle, emit);
        return;
      case NBD_REPLY_TYPE.OFFSET_HOLE:
        if (e.cmd !== NBD_CMD.READ) throw new NbdProtocolError('hole chunk in reply to a request that is not a read');
        if (length !== 12) throw new NbdProtocolError(`hole chunk of ${length} bytes`);
        break;
      case NBD_REPLY_TYPE.BLOCK_STATUS:
        if (e.cmd !== NBD_CMD.BLOCK_STATUS) throw new NbdProtocolError('block status chunk in reply to another request');
        if (length < 12 || (length - 4) % 8 !== 0 || length > MAX_STATUS_PAYLOAD) throw new NbdProtocolError(`block status chunk of ${length} bytes`);
        break;
      default:
        if (!(type & NBD_REPLY_TYPE_ERROR_BIT)) throw new NbdProtocolError(`unknown reply chunk type ${type}`);
        if (length < 6 || length > MAX_ERROR_PAYLOAD) throw new NbdProtocolError(`error chunk of ${length} bytes`);
    }
    this.state = { s: 'chunk-payload', handle, flags, type, length };
  }

  private chunkPayload(handle: number, type: number, p: Uint8Array, emit: (ev: ReplyEvent) => void): void {
    const dv = view(p);
    const e = this.expected.get(handle)!;
    if (type === NBD_REPLY_TYPE.OFFSET_HOLE) {
      const offset = getU64(dv, 0, 'hole chunk offset');
      const length = dv.getUint32(8);
      if (length === 0 || offset < e.offset || offset + length > e.offset + e.length) {
        throw new NbdProtocolError(`hole chunk [${offset}, +${length}) outside the read [${e.offset}, +${e.length})`);
      }
      emit({ kind: 'hole', handle, offset, length });
    } else if (type === NBD_REPLY_TYPE.BLOCK_STATUS) {
      const contextId = dv.getUint32(0);
      const extents: { length: number; flags: number }[] = [];
      for (let at = 4; at < p.length; at += 8) extents.push({ length: dv.getUint32(at), flags: dv.getUint32(at + 4) });
      emit({ kind: 'block-status', handle, contextId, extents });
    } else {
      const errno = dv.getUint32(0);
      const mlen = dv.getUint16(4);
      if (6 + mlen > p.length) throw new NbdProtocolError(`error chunk message of ${mlen} bytes in ${p.length}`);
      if (type === NBD_REPLY_TYPE.ERROR_OFFSET && p.length !== 6 + mlen + 8) throw new NbdProtocolError('error-offset chunk of the wrong size');
      const message = new TextDecoder().decode(p.subarray(6, 6 + mlen));
      // proto.md: an error chunk with errno 0 is a protocol violation; count it as EIO.
      emit({ kind: 'error', handle, errno: errno || 5, message });
    }
  }

  private finish(handle: number, emit: (ev: ReplyEvent) => void): void {
    this.expected.delete(handle);
    emit({ kind: 'done', handle });
  }
}

/** Errno numbers from the wire, as the name a person reads. */
export function nbdErrnoName(errno: number): string {
  const names: Record<number, string> = { 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN' };
  return names[errno] ?? `errno ${errno}`;
}

export { MAX_PAYLOAD };
