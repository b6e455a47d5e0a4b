// iSCSI PDUs (RFC 7143 section 11): the 48-byte basic header segment, its optional
// header digest, the data segment padded to 4 bytes and its optional data digest.
// Pure: an encoder and a streaming parser that takes input split anywhere.
import { ProtocolError } from '../../errors.js';
import { crc32cUpdate } from '../../util/crc32c.js';

export const OP = {
  NOP_OUT: 0x00,
  SCSI_CMD: 0x01,
  TASK_MGMT: 0x02,
  LOGIN_REQ: 0x03,
  TEXT_REQ: 0x04,
  DATA_OUT: 0x05,
  LOGOUT_REQ: 0x06,
  NOP_IN: 0x20,
  SCSI_RESP: 0x21,
  TASK_MGMT_RESP: 0x22,
  LOGIN_RESP: 0x23,
  TEXT_RESP: 0x24,
  DATA_IN: 0x25,
  LOGOUT_RESP: 0x26,
  R2T: 0x31,
  ASYNC: 0x32,
  REJECT: 0x3f,
} as const;

export const BHS_LEN = 48;
/** The reserved tag: "no task" (NOP-In pings from the target, unsolicited Data-Out). */
export const RESERVED_TAG = 0xffffffff;
/** A data segment larger than this is refused before it is buffered (we offer 256 KiB as MaxRecvDataSegmentLength). */
export const MAX_DATA_SEGMENT = 1 << 20;

// --- CRC32C (drivers/util/crc32c.ts), the digest of RFC 7143 section 13.1 ------------

export function crc32c(data: Uint8Array, crc = 0): number {
  return (crc32cUpdate(~crc >>> 0, data) ^ 0xffffffff) >>> 0;
}

/** The digest goes on the wire little-endian (the CRC's bit order), RFC 7143 13.1. */
function digestBytes(crc: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, crc, true);
  return b;
}

// --- PDUs -------------------------------------------------------------------------

export interface Pdu {
  /** The 48-byte BHS (any AHS is dropped: none is defined for target PDUs we use). */
  bhs: Uint8Array;
  data: Uint8Array;
}

export interface Digests {
  header: boolean;
  data: boolean;
}

export const opcodeOf = (bhs: Uint8Array): number => bhs[0]! & 0x3f;
export const u32 = (b: Uint8Array, at: number): number => new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(at);
export const dataLengthOf = (bhs: Uint8Array): number => (bhs[5]! << 16) | (bhs[6]! << 8) | bhs[7]!;

/** A BHS with the opcode, immediate bit, flags and data length filled in; the rest zero. */
export function newBhs(opcode: number, flags: number, dataLength: number, immediate = false): Uint8Array {
  const b = new Uint8Array(BHS_LEN);
  b[0] = opcode | (immediate ? 0x40 : 0);
  b[1] = flags;
  if (dataLength > 0xffffff) throw new RangeError(`data segment of ${dataLength} bytes`);
  b[5] = dataLength >>> 16;
  b[6] = (dataLength >>> 8) & 0xff;
  b[7] = dataLength & 0xff;
  return b;
}

export function setU32(b: Uint8Array, at: number, v: number): void {
  new DataView(b.buffer, b.byteOffset, b.byteLength).setUint32(at, v >>> 0);
}

/** An 8-byte LUN field (SAM-2 single level, peripheral or flat addressing). */
export function setLun(b: Uint8Array, at: number, lun: number): void {
  if (lun < 256) {
    b[at] = 0;
    b[at + 1] = lun;
  } else {
    b[at] = 0x40 | ((lun >> 8) & 0x3f);
    b[at + 1] = lun & 0xff;
  }
}

/** The PDU as wire bytes: BHS, header digest, data padded to 4, data digest. */
export function encodePdu(bhs: Uint8Array, data: Uint8Array | undefined, digests: Digests): Uint8Array[] {
  const out: Uint8Array[] = [bhs];
  if (digests.header) out.push(digestBytes(crc32c(bhs)));
  if (data && data.length) {
    out.push(data);
    const pad = (4 - (data.length % 4)) % 4;
    const padding = new Uint8Array(pad);
    if (pad) out.push(padding);
    if (digests.data) out.push(digestBytes(crc32c(padding, crc32c(data))));
  }
  return out;
}

/**
 * Splits the target's byte stream into PDUs. `digests` may change between PDUs (after
 * login); the parser reads it at each PDU boundary. Throws ProtocolError on a bad
 * digest, an AHS or data segment beyond the caps.
 */
export class PduParser {
  private buf: Uint8Array = new Uint8Array(0);
  digests: Digests = { header: false, data: false };

  feed(chunk: Uint8Array, emit: (pdu: Pdu) => void): void {
    // Views, never copies: no one writes into a chunk once it is fed (sockets give fresh ones).
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    let pos = 0;
    for (;;) {
      const avail = this.buf.length - pos;
      if (avail < BHS_LEN) break;
      const bhs = this.buf.subarray(pos, pos + BHS_LEN);
      const ahs = bhs[4]! * 4;
      const dlen = dataLengthOf(bhs);
      if (dlen > MAX_DATA_SEGMENT) throw new ProtocolError(`a data segment of ${dlen} bytes (more than ${MAX_DATA_SEGMENT})`);
      const hd = this.digests.header ? 4 : 0;
      const padded = (dlen + 3) & ~3;
      const dd = this.digests.data && dlen ? 4 : 0;
      const total = BHS_LEN + ahs + hd + padded + dd;
      if (avail < total) break;
      if (hd) {
        const want = crc32c(this.buf.subarray(pos, pos + BHS_LEN + ahs));
        const got = new DataView(this.buf.buffer, this.buf.byteOffset + pos + BHS_LEN + ahs, 4).getUint32(0, true);
        if (want !== got) throw new ProtocolError(`header digest mismatch (opcode 0x${opcodeOf(bhs).toString(16)})`);
      }
      const dstart = pos + BHS_LEN + ahs + hd;
      if (dd) {
        const want = crc32c(this.buf.subarray(dstart, dstart + padded));
        const got = new DataView(this.buf.buffer, this.buf.byteOffset + dstart + padded, 4).getUint32(0, true);
        if (want !== got) throw new ProtocolError(`data digest mismatch (opcode 0x${opcodeOf(bhs).toString(16)})`);
      }
      emit({ bhs, data: this.buf.subarray(dstart, dstart + dlen) });
      pos += total;
    }
    this.buf = this.buf.subarray(pos);
  }

  /** Bytes received but not yet a whole PDU. */
  get pending(): number {
    return this.buf.length;
  }
}

// --- text keys (RFC 7143 section 6) -----------------------------------------------

/** key=value pairs, each NUL-terminated. */
export function encodeKeys(keys: [string, string][]): Uint8Array {
  return new TextEncoder().encode(keys.map(([k, v]) => `${k}=${v}\0`).join(''));
}

/** The reverse; a key given twice keeps the last. Throws ProtocolError on a pair without '='. */
export function decodeKeys(data: Uint8Array): Map<string, string> {
  const out = new Map<string, string>();
  const text = new TextDecoder().decode(data);
  for (const item of text.split('\0')) {
    if (!item) continue;
    const eq = item.indexOf('=');
    if (eq <= 0) throw new ProtocolError(`text key without a value: '${item.slice(0, 64)}'`);
    out.set(item.slice(0, eq), item.slice(eq + 1));
  }
  return out;
}

// --- the fields of target PDUs we read --------------------------------------------

export interface TargetPdu {
  opcode: number;
  flags: number;
  itt: number;
  ttt: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

/** The fields common to target PDUs (RFC 7143 11.x: bytes 16-35 where present). */
export function targetFields(bhs: Uint8Array): TargetPdu {
  return {
    opcode: opcodeOf(bhs),
    flags: bhs[1]!,
    itt: u32(bhs, 16),
    ttt: u32(bhs, 20),
    statSN: u32(bhs, 24),
    expCmdSN: u32(bhs, 28),
    maxCmdSN: u32(bhs, 32),
  };
}

/** Serial number arithmetic (RFC 1982, 32 bits): a < b. */
export function snLess(a: number, b: number): boolean {
  return a !== b && ((a < b && b - a < 0x80000000) || (a > b && a - b > 0x80000000));
}
