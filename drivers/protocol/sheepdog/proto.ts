// The sheep daemon's wire protocol, pure: no I/O. Written from the sheepdog project's
// include/sheepdog_proto.h and QEMU 5.2's block/sheepdog.c (the last QEMU client):
// every request and response is a fixed 48-byte little-endian header, followed by
// data_length bytes (the request's for writes, the response's for reads).
import { ProtocolError, UsageError } from '../../errors.js';

export const SD_PROTO_VER = 0x01;
export const SD_DEFAULT_PORT = 7000;
export const SD_HEADER_SIZE = 48;

export const SD_OP_CREATE_AND_WRITE_OBJ = 0x01;
export const SD_OP_READ_OBJ = 0x02;
export const SD_OP_WRITE_OBJ = 0x03;
export const SD_OP_NEW_VDI = 0x11;
export const SD_OP_LOCK_VDI = 0x12;
export const SD_OP_RELEASE_VDI = 0x13;
export const SD_OP_GET_VDI_INFO = 0x14;
export const SD_OP_FLUSH_VDI = 0x16;
export const SD_OP_GET_CLUSTER_DEFAULT = 0x18;

export const SD_FLAG_CMD_WRITE = 0x01;
export const SD_FLAG_CMD_COW = 0x02;
export const SD_FLAG_CMD_CACHE = 0x04;
export const SD_FLAG_CMD_DIRECT = 0x08;

export const SD_RES_SUCCESS = 0x00;
export const SD_RES_NO_OBJ = 0x02;
export const SD_RES_VDI_EXIST = 0x04;
export const SD_RES_INVALID_PARMS = 0x05;
export const SD_RES_VDI_LOCKED = 0x07;
export const SD_RES_NO_VDI = 0x08;
export const SD_RES_NO_BASE_VDI = 0x09;
export const SD_RES_NO_TAG = 0x0e;
export const SD_RES_VDI_NOT_LOCKED = 0x10;
export const SD_RES_VER_MISMATCH = 0x14;

const RESULT_TEXT: Record<number, string> = {
  0x00: 'Success', 0x01: 'Unknown error', 0x02: 'No object found', 0x03: 'I/O error', 0x04: 'VDI exists already',
  0x05: 'Invalid parameters', 0x06: 'System error', 0x07: 'VDI is already locked', 0x08: 'No vdi found',
  0x09: 'No base VDI found', 0x0a: 'Failed read the requested VDI', 0x0b: 'Failed to write the requested VDI',
  0x0c: 'Failed to read the base VDI', 0x0d: 'Failed to write the base VDI', 0x0e: 'Failed to find the requested tag',
  0x0f: 'The system is still booting', 0x10: "VDI isn't locked", 0x11: 'The system is shutting down',
  0x12: 'Out of memory on the server', 0x13: 'We already have the maximum vdis', 0x14: 'Protocol version mismatch',
  0x15: 'Server has no space for new objects', 0x16: 'Sheepdog is waiting for a format operation',
  0x17: 'Sheepdog is waiting for other nodes joining', 0x18: 'Target node had failed to join sheepdog',
  0x19: 'Sheepdog is stopped serving IO request', 0x1a: 'Object is read-only',
};

/** sd_strerror. */
export function resultText(result: number): string {
  return RESULT_TEXT[result] ?? `Invalid error code ${result}`;
}

export const LOCK_TYPE_NORMAL = 0;
export const SD_MAX_VDI_LEN = 256;
export const SD_MAX_VDI_TAG_LEN = 256;
export const MAX_CHILDREN = 1024;
export const MAX_DATA_OBJS = 1 << 20;
export const SD_DEFAULT_BLOCK_SIZE_SHIFT = 22;
export const SD_NR_VDIS = 1 << 24;
const VDI_BIT = 1n << 63n;

// SheepdogInode: name[256], tag[256], ctime, snap_ctime, vm_clock_nsec, vdi_size,
// vm_state_size (u64 each), copy_policy u16, nr_copies u8, block_size_shift u8,
// snap_id, vdi_id, parent_vdi_id (u32), child_vdi_id[1024], data_vdi_id[2^20] (u32).
export const INODE = {
  name: 0, tag: 256, ctime: 512, snapCtime: 520, vmClockNsec: 528, vdiSize: 536, vmStateSize: 544,
  copyPolicy: 552, nrCopies: 554, blockSizeShift: 555, snapId: 556, vdiId: 560, parentVdiId: 564, childVdiId: 568,
} as const;
/** SD_INODE_HEADER_SIZE: offsetof(SheepdogInode, data_vdi_id). */
export const SD_INODE_HEADER_SIZE = INODE.childVdiId + 4 * MAX_CHILDREN;
export const SD_INODE_SIZE = SD_INODE_HEADER_SIZE + 4 * MAX_DATA_OBJS;

export function vidToVdiOid(vid: number): bigint {
  return VDI_BIT | (BigInt(vid) << 32n);
}
export function vidToDataOid(vid: number, idx: number): bigint {
  return (BigInt(vid) << 32n) | BigInt(idx);
}
export function isDataOid(oid: bigint): boolean {
  return (oid & VDI_BIT) === 0n;
}
export function oidToVid(oid: bigint): number {
  return Number((oid & ~VDI_BIT) >> 32n) & 0xffffff;
}
export function dataOidToIdx(oid: bigint): number {
  return Number(oid & BigInt(MAX_DATA_OBJS - 1));
}

/** 64-bit FNV-1a, as sheep hashes a VDI name to its first candidate vid. */
export function fnv64a(bytes: Uint8Array): bigint {
  let h = 0xcbf29ce484222325n;
  const mask = (1n << 64n) - 1n;
  for (const b of bytes) {
    h ^= BigInt(b);
    h = (h + (h << 1n) + (h << 4n) + (h << 5n) + (h << 7n) + (h << 8n) + (h << 40n)) & mask;
  }
  return h;
}

/** One request header. Fields not named stay zero; the layout depends on the opcode. */
export interface Request {
  opcode: number;
  flags?: number;
  epoch?: number;
  id: number;
  dataLength: number;
  /** Object requests (SheepdogObjReq). */
  oid?: bigint;
  cowOid?: bigint;
  copies?: number;
  copyPolicy?: number;
  offset?: number;
  /** VDI requests (SheepdogVdiReq). */
  vdiSize?: number;
  baseVdiId?: number;
  blockSizeShift?: number;
  snapid?: number;
  type?: number;
  protoVer?: number;
}

const OBJECT_OPS = new Set([SD_OP_CREATE_AND_WRITE_OBJ, SD_OP_READ_OBJ, SD_OP_WRITE_OBJ, SD_OP_FLUSH_VDI]);

export function isObjectOp(opcode: number): boolean {
  return OBJECT_OPS.has(opcode);
}

/** The 16 bytes every header starts with: proto_ver, opcode, flags, epoch, id, data_length. */
function encodeCommon(r: { protoVer?: number; opcode: number; flags?: number; epoch?: number; id: number; dataLength: number }): Buffer {
  const b = Buffer.alloc(SD_HEADER_SIZE);
  b.writeUInt8(r.protoVer ?? SD_PROTO_VER, 0);
  b.writeUInt8(r.opcode, 1);
  b.writeUInt16LE(r.flags ?? 0, 2);
  b.writeUInt32LE(r.epoch ?? 0, 4);
  b.writeUInt32LE(r.id >>> 0, 8);
  b.writeUInt32LE(r.dataLength, 12);
  return b;
}

export function encodeRequest(r: Request): Buffer {
  const b = encodeCommon(r);
  if (isObjectOp(r.opcode)) {
    b.writeBigUInt64LE(r.oid ?? 0n, 16);
    b.writeBigUInt64LE(r.cowOid ?? 0n, 24);
    b.writeUInt8(r.copies ?? 0, 32);
    b.writeUInt8(r.copyPolicy ?? 0, 33);
    b.writeBigUInt64LE(BigInt(r.offset ?? 0), 40);
  } else {
    b.writeBigUInt64LE(BigInt(r.vdiSize ?? 0), 16);
    b.writeUInt32LE(r.baseVdiId ?? 0, 24);
    b.writeUInt8(r.copies ?? 0, 28);
    b.writeUInt8(r.copyPolicy ?? 0, 29);
    b.writeUInt8(r.blockSizeShift ?? 0, 31);
    b.writeUInt32LE(r.snapid ?? 0, 32);
    b.writeUInt32LE(r.type ?? 0, 36);
  }
  return b;
}

export function decodeRequest(b: Uint8Array): Request {
  const v = Buffer.from(b.buffer, b.byteOffset, SD_HEADER_SIZE);
  const opcode = v.readUInt8(1);
  const base = { protoVer: v.readUInt8(0), opcode, flags: v.readUInt16LE(2), epoch: v.readUInt32LE(4), id: v.readUInt32LE(8), dataLength: v.readUInt32LE(12) };
  if (isObjectOp(opcode)) {
    return { ...base, oid: v.readBigUInt64LE(16), cowOid: v.readBigUInt64LE(24), copies: v.readUInt8(32), copyPolicy: v.readUInt8(33), offset: Number(v.readBigUInt64LE(40)) };
  }
  return { ...base, vdiSize: Number(v.readBigUInt64LE(16)), baseVdiId: v.readUInt32LE(24), copies: v.readUInt8(28), copyPolicy: v.readUInt8(29), blockSizeShift: v.readUInt8(31), snapid: v.readUInt32LE(32), type: v.readUInt32LE(36) };
}

/** One response header: SheepdogRsp with the fields of its variants this client reads. */
export interface Response {
  protoVer?: number;
  opcode: number;
  flags?: number;
  epoch?: number;
  id: number;
  dataLength: number;
  result: number;
  /** SheepdogVdiRsp.vdi_id. */
  vdiId?: number;
  /** SheepdogClusterRsp. */
  nrCopies?: number;
  blockSizeShift?: number;
}

export function encodeResponse(r: Response): Buffer {
  const b = encodeCommon(r);
  b.writeUInt32LE(r.result, 16);
  if (r.opcode === SD_OP_GET_CLUSTER_DEFAULT) {
    b.writeUInt8(r.nrCopies ?? 0, 20);
    b.writeUInt8(r.blockSizeShift ?? 0, 22);
  } else {
    b.writeUInt32LE(r.vdiId ?? 0, 24);
  }
  return b;
}

export function decodeResponse(b: Uint8Array): Response {
  const v = Buffer.from(b.buffer, b.byteOffset, SD_HEADER_SIZE);
  const opcode = v.readUInt8(1);
  return {
    protoVer: v.readUInt8(0),
    opcode,
    flags: v.readUInt16LE(2),
    epoch: v.readUInt32LE(4),
    id: v.readUInt32LE(8),
    dataLength: v.readUInt32LE(12),
    result: v.readUInt32LE(16),
    vdiId: v.readUInt32LE(24),
    nrCopies: v.readUInt8(20),
    blockSizeShift: v.readUInt8(22),
  };
}

/**
 * Splits a byte stream into messages (a header and the data that follows it), however
 * the stream is cut. A response carries data_length bytes; a request only when it
 * writes (SD_FLAG_CMD_WRITE: a read's data_length is what it asks for). `maxData`
 * caps what a header may announce before anything is buffered for it: a bigger one
 * is a broken peer.
 */
export class MessageParser<H extends { dataLength: number; flags?: number }> {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private header: H | undefined;
  private body = 0;

  constructor(
    private readonly decode: (b: Uint8Array) => H,
    private readonly maxData: (h: H) => number,
    private readonly requests = false,
  ) {}

  /** Feed bytes; returns the complete messages they finish. */
  push(data: Uint8Array): { header: H; data: Buffer }[] {
    this.chunks.push(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    this.buffered += data.byteLength;
    const out: { header: H; data: Buffer }[] = [];
    for (;;) {
      if (!this.header) {
        if (this.buffered < SD_HEADER_SIZE) break;
        const h = this.decode(this.take(SD_HEADER_SIZE));
        const body = this.requests && !((h.flags ?? 0) & SD_FLAG_CMD_WRITE) ? 0 : h.dataLength;
        const limit = this.maxData(h);
        if (body > limit) throw new ProtocolError(`sheepdog: message announces ${body} bytes of data, more than the ${limit} expected`);
        this.header = h;
        this.body = body;
      }
      if (this.buffered < this.body) break;
      out.push({ header: this.header, data: this.take(this.body) });
      this.header = undefined;
    }
    return out;
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.buffered);
    const head = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return head;
  }
}

/** The inode header fields the client uses (the table of data_vdi_id is read apart). */
export interface InodeHeader {
  name: string;
  tag: string;
  ctime: bigint;
  snapCtime: bigint;
  vdiSize: number;
  copyPolicy: number;
  nrCopies: number;
  blockSizeShift: number;
  snapId: number;
  vdiId: number;
  parentVdiId: number;
}

function cString(b: Buffer, at: number, len: number): string {
  const s = b.subarray(at, at + len);
  const nul = s.indexOf(0);
  return s.subarray(0, nul < 0 ? len : nul).toString('utf8');
}

export function decodeInodeHeader(b: Buffer): InodeHeader {
  if (b.length < INODE.childVdiId) throw new ProtocolError(`sheepdog: inode header of ${b.length} bytes is short`);
  return {
    name: cString(b, INODE.name, SD_MAX_VDI_LEN),
    tag: cString(b, INODE.tag, SD_MAX_VDI_TAG_LEN),
    ctime: b.readBigUInt64LE(INODE.ctime),
    snapCtime: b.readBigUInt64LE(INODE.snapCtime),
    vdiSize: Number(b.readBigUInt64LE(INODE.vdiSize)),
    copyPolicy: b.readUInt16LE(INODE.copyPolicy),
    nrCopies: b.readUInt8(INODE.nrCopies),
    blockSizeShift: b.readUInt8(INODE.blockSizeShift),
    snapId: b.readUInt32LE(INODE.snapId),
    vdiId: b.readUInt32LE(INODE.vdiId),
    parentVdiId: b.readUInt32LE(INODE.parentVdiId),
  };
}

/** Writes the fields into an inode header buffer (at least SD_INODE_HEADER_SIZE bytes). */
export function encodeInodeHeader(h: InodeHeader, b: Buffer = Buffer.alloc(SD_INODE_HEADER_SIZE)): Buffer {
  b.fill(0, INODE.name, INODE.tag + SD_MAX_VDI_TAG_LEN);
  b.write(h.name, INODE.name, SD_MAX_VDI_LEN - 1, 'utf8');
  b.write(h.tag, INODE.tag, SD_MAX_VDI_TAG_LEN - 1, 'utf8');
  b.writeBigUInt64LE(h.ctime, INODE.ctime);
  b.writeBigUInt64LE(h.snapCtime, INODE.snapCtime);
  b.writeBigUInt64LE(BigInt(h.vdiSize), INODE.vdiSize);
  b.writeUInt16LE(h.copyPolicy, INODE.copyPolicy);
  b.writeUInt8(h.nrCopies, INODE.nrCopies);
  b.writeUInt8(h.blockSizeShift, INODE.blockSizeShift);
  b.writeUInt32LE(h.snapId, INODE.snapId);
  b.writeUInt32LE(h.vdiId, INODE.vdiId);
  b.writeUInt32LE(h.parentVdiId, INODE.parentVdiId);
  return b;
}

/** A VDI name and a tag, NUL-padded to 256 bytes each: the data of a lookup. */
export function nameTagData(name: string, tag: string, withTag = true): Buffer {
  const b = Buffer.alloc(SD_MAX_VDI_LEN + (withTag ? SD_MAX_VDI_TAG_LEN : 0));
  b.write(name, 0, SD_MAX_VDI_LEN - 1, 'utf8');
  if (withTag) b.write(tag, SD_MAX_VDI_LEN, SD_MAX_VDI_TAG_LEN - 1, 'utf8');
  return b;
}

export function parseNameTag(b: Buffer): { name: string; tag: string } {
  return { name: cString(b, 0, Math.min(b.length, SD_MAX_VDI_LEN)), tag: b.length > SD_MAX_VDI_LEN ? cString(b, SD_MAX_VDI_LEN, Math.min(SD_MAX_VDI_TAG_LEN, b.length - SD_MAX_VDI_LEN)) : '' };
}

/** Where a sheepdog: name points. */
export interface SheepdogTarget {
  address: { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };
  vdi: string;
  /** A snapshot by tag ('' for none) or by id (0 for the current VDI). */
  tag: string;
  snapId: number;
}

export function isSheepdogSpec(spec: string): boolean {
  return /^sheepdog(\+tcp|\+unix)?:/i.test(spec);
}

/**
 * sheepdog:///VDI[#TAG], sheepdog[+tcp]://HOST[:PORT]/VDI[#TAG],
 * sheepdog+unix:///VDI?socket=PATH[#TAG], and the old sheepdog:[HOST:PORT:]VDI[:TAG].
 * A numeric tag is a snapshot id (sd_parse_snapid_or_tag).
 */
export function parseSheepdogUri(spec: string): SheepdogTarget {
  const bad = (why: string): never => {
    throw new UsageError(`${spec}: ${why}`);
  };
  if (!spec.includes('://')) {
    // The old syntax: [host:port:]vdi[:tag], turned into a URI as QEMU's parse_vdiname does.
    const rest = spec.replace(/^sheepdog:/i, '');
    const parts = rest.split(':');
    let host = '';
    if (parts.length >= 3) host = `${parts.shift()}:${parts.shift()}`;
    const [vdi = '', tag] = parts;
    return parseSheepdogUri(`sheepdog://${host}/${encodeURIComponent(vdi)}${tag !== undefined ? `#${encodeURIComponent(tag)}` : ''}`);
  }
  const m = /^(sheepdog(?:\+tcp|\+unix)?):\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?(?:#(.*))?$/i.exec(spec);
  if (!m) return bad('not a sheepdog URI (sheepdog://[HOST[:PORT]]/VDI[#TAG])');
  const [, scheme, authority, rawPath, query, fragment] = m;
  const unix = scheme!.toLowerCase() === 'sheepdog+unix';
  const decode = (s: string): string => {
    try {
      return decodeURIComponent(s);
    } catch {
      return bad(`bad percent-encoding in '${s}'`);
    }
  };
  if (!rawPath || rawPath === '/') bad('missing VDI name in URI');
  const vdi = decode(rawPath!.slice(1));
  if (Buffer.byteLength(vdi) >= SD_MAX_VDI_LEN) bad('VDI name is too long');
  if (vdi.includes('\0')) bad('VDI name contains a NUL');
  const params = new URLSearchParams(query ?? '');
  let address: SheepdogTarget['address'];
  if (unix) {
    if (authority) bad(`URI scheme ${scheme} doesn't accept a server address`);
    const keys = [...params.keys()];
    if (keys.length !== 1 || keys[0] !== 'socket') bad(`URI scheme ${scheme} requires query parameter 'socket' (and no other)`);
    address = { kind: 'unix', path: params.get('socket')! };
  } else {
    if ([...params.keys()].length) bad('unexpected query parameters');
    const hp = /^(?:\[([^\]]+)\]|([^:]*))(?::(\d*))?$/.exec(authority!);
    if (!hp) return bad(`bad server address '${authority}'`);
    const host = hp[1] ?? hp[2] ?? '';
    const port = hp[3] ? Number(hp[3]) : SD_DEFAULT_PORT;
    if (!Number.isInteger(port) || port < 1 || port > 65535) bad(`bad port '${hp[3]}'`);
    address = { kind: 'tcp', host: host || 'localhost', port };
  }
  let tag = '';
  let snapId = 0;
  if (fragment !== undefined) {
    const f = decode(fragment);
    if (/^\d+$/.test(f)) {
      snapId = Number(f);
      if (snapId < 1 || snapId > 0xffffffff) bad(`'${f}' is not a valid snapshot ID`);
    } else {
      if (!f || Buffer.byteLength(f) >= SD_MAX_VDI_TAG_LEN) bad(`'${f}' is not a valid snapshot tag`);
      tag = f;
    }
  }
  return { address, vdi, tag, snapId };
}

export function formatSheepdogUri(t: SheepdogTarget): string {
  const frag = t.tag ? `#${encodeURIComponent(t.tag)}` : t.snapId ? `#${t.snapId}` : '';
  if (t.address.kind === 'unix') return `sheepdog+unix:///${encodeURIComponent(t.vdi)}?socket=${encodeURIComponent(t.address.path).replace(/%2F/gi, '/')}${frag}`;
  const a = t.address;
  const host = a.host.includes(':') ? `[${a.host}]` : a.host;
  return `sheepdog://${host}:${a.port}/${encodeURIComponent(t.vdi)}${frag}`;
}

/** The object size of an inode: 2^block_size_shift (0 in inodes older than the field: 4 MiB). */
export function objectSizeOf(h: InodeHeader): number {
  const shift = h.blockSizeShift || SD_DEFAULT_BLOCK_SIZE_SHIFT;
  if (shift < 20 || shift > 31) throw new ProtocolError(`sheepdog: VDI '${h.name}' has an object size of 2^${shift}, outside 2^20..2^31`);
  return 2 ** shift;
}
