// SCSI commands the iSCSI node sends (SPC-4, SBC-3, MMC) and the answers it reads:
// CDBs built, INQUIRY / READ CAPACITY / VPD pages parsed (every length capped), sense
// data turned into an errno and a line a person can read.
import { constants as osc } from 'node:os';

const E = osc.errno;

export const SCSI = {
  TEST_UNIT_READY: 0x00,
  INQUIRY: 0x12,
  READ_CAPACITY_10: 0x25,
  READ_10: 0x28,
  WRITE_10: 0x2a,
  SYNCHRONIZE_CACHE_10: 0x35,
  UNMAP: 0x42,
  READ_16: 0x88,
  WRITE_16: 0x8a,
  SYNCHRONIZE_CACHE_16: 0x91,
  WRITE_SAME_16: 0x93,
  SERVICE_ACTION_IN_16: 0x9e,
  READ_12: 0xa8,
} as const;

export const STATUS = { GOOD: 0x00, CHECK_CONDITION: 0x02, BUSY: 0x08, RESERVATION_CONFLICT: 0x18, TASK_SET_FULL: 0x28 } as const;
export const DEVICE_TYPE = { DISK: 0x00, CDROM: 0x05 } as const;

function cdb(op: number): Uint8Array {
  const c = new Uint8Array(16);
  c[0] = op;
  return c;
}

function put(c: Uint8Array, at: number, bytes: number, v: number): void {
  for (let i = bytes - 1; i >= 0; i--) {
    c[at + i] = v % 256;
    v = Math.floor(v / 256);
  }
}

function get(b: Uint8Array, at: number, bytes: number): number {
  let v = 0;
  for (let i = 0; i < bytes; i++) v = v * 256 + b[at + i]!;
  return v;
}

export const testUnitReady = (): Uint8Array => cdb(SCSI.TEST_UNIT_READY);

export function inquiry(page: number | undefined, alloc: number): Uint8Array {
  const c = cdb(SCSI.INQUIRY);
  if (page !== undefined) {
    c[1] = 1;
    c[2] = page;
  }
  put(c, 3, 2, alloc);
  return c;
}

export function readCapacity16(): Uint8Array {
  const c = cdb(SCSI.SERVICE_ACTION_IN_16);
  c[1] = 0x10;
  put(c, 10, 4, 32);
  return c;
}

export const readCapacity10 = (): Uint8Array => cdb(SCSI.READ_CAPACITY_10);

/** READ/WRITE in the size asked: 16 (64-bit LBA), 12 (MMC) or 10. */
export function readWrite(write: boolean, size: 10 | 12 | 16, lba: number, blocks: number, fua = false): Uint8Array {
  if (size === 16) {
    const c = cdb(write ? SCSI.WRITE_16 : SCSI.READ_16);
    if (fua) c[1] = 0x08;
    put(c, 2, 8, lba);
    put(c, 10, 4, blocks);
    return c;
  }
  if (size === 12) {
    const c = cdb(SCSI.READ_12);
    put(c, 2, 4, lba);
    put(c, 6, 4, blocks);
    return c;
  }
  const c = cdb(write ? SCSI.WRITE_10 : SCSI.READ_10);
  if (fua) c[1] = 0x08;
  put(c, 2, 4, lba);
  put(c, 7, 2, blocks);
  return c;
}

export function synchronizeCache(size: 10 | 16): Uint8Array {
  return cdb(size === 16 ? SCSI.SYNCHRONIZE_CACHE_16 : SCSI.SYNCHRONIZE_CACHE_10);
}

/** WRITE SAME(16) of one block (the caller sends zeros), with UNMAP where allowed. */
export function writeSame16(lba: number, blocks: number, unmap: boolean): Uint8Array {
  const c = cdb(SCSI.WRITE_SAME_16);
  if (unmap) c[1] = 0x08;
  put(c, 2, 8, lba);
  put(c, 10, 4, blocks);
  return c;
}

/** UNMAP with one block descriptor: the CDB and its parameter list. */
export function unmap(lba: number, blocks: number): { cdb: Uint8Array; data: Uint8Array } {
  const data = new Uint8Array(24);
  put(data, 0, 2, 22);
  put(data, 2, 2, 16);
  put(data, 8, 8, lba);
  put(data, 16, 4, blocks);
  const c = cdb(SCSI.UNMAP);
  put(c, 7, 2, data.length);
  return { cdb: c, data };
}

// --- answers ------------------------------------------------------------------

export interface StandardInquiry {
  qualifier: number;
  deviceType: number;
  removable: boolean;
  vendor: string;
  product: string;
}

const ascii = (b: Uint8Array, from: number, to: number): string => String.fromCharCode(...b.subarray(from, Math.min(to, b.length))).trim();

export function parseInquiry(b: Uint8Array): StandardInquiry {
  if (b.length < 5) throw new RangeError(`INQUIRY data of ${b.length} bytes`);
  return { qualifier: b[0]! >> 5, deviceType: b[0]! & 0x1f, removable: !!(b[1]! & 0x80), vendor: ascii(b, 8, 16), product: ascii(b, 16, 32) };
}

/** VPD page 0x00: the pages the LUN has. */
export function parseSupportedPages(b: Uint8Array): Set<number> {
  const n = Math.min(b.length - 4, get(b, 2, 2));
  return new Set(b.subarray(4, 4 + Math.max(0, n)));
}

export interface BlockLimits {
  /** In blocks; 0 = no limit given. */
  maxTransfer: number;
  maxUnmapBlocks: number;
  maxUnmapDescriptors: number;
  maxWriteSame: number;
}

/** VPD page 0xb0 (SBC-3 6.6.4). */
export function parseBlockLimits(b: Uint8Array): BlockLimits {
  const at = (o: number, n: number): number => (b.length >= o + n ? get(b, o, n) : 0);
  return { maxTransfer: at(8, 4), maxUnmapBlocks: at(20, 4), maxUnmapDescriptors: at(24, 4), maxWriteSame: at(36, 8) };
}

export interface Provisioning {
  unmap: boolean;
  writeSame16Unmap: boolean;
  /** Unmapped blocks read as zeros. */
  zeroAfterUnmap: boolean;
}

/** VPD page 0xb2 (logical block provisioning). */
export function parseProvisioning(b: Uint8Array): Provisioning {
  const f = b.length > 5 ? b[5]! : 0;
  return { unmap: !!(f & 0x80), writeSame16Unmap: !!(f & 0x40), zeroAfterUnmap: !!(f & 0x04) };
}

export interface Capacity {
  blocks: number;
  blockSize: number;
  /** READ CAPACITY(16) only: logical block provisioning enabled, unmapped reads zero. */
  lbpme: boolean;
  lbprz: boolean;
}

export function parseCapacity16(b: Uint8Array): Capacity {
  if (b.length < 12) throw new RangeError(`READ CAPACITY(16) data of ${b.length} bytes`);
  return { blocks: get(b, 0, 8) + 1, blockSize: get(b, 8, 4), lbpme: b.length > 14 && !!(b[14]! & 0x80), lbprz: b.length > 14 && !!(b[14]! & 0x40) };
}

export function parseCapacity10(b: Uint8Array): Capacity {
  if (b.length < 8) throw new RangeError(`READ CAPACITY(10) data of ${b.length} bytes`);
  return { blocks: get(b, 0, 4) + 1, blockSize: get(b, 4, 4), lbpme: false, lbprz: false };
}

// --- sense ----------------------------------------------------------------------

export interface Sense {
  key: number;
  asc: number;
  ascq: number;
}

export const SENSE_KEY = { NO_SENSE: 0, RECOVERED: 1, NOT_READY: 2, MEDIUM_ERROR: 3, HARDWARE_ERROR: 4, ILLEGAL_REQUEST: 5, UNIT_ATTENTION: 6, DATA_PROTECT: 7, ABORTED_COMMAND: 0x0b } as const;

/** The sense in a SCSI Response's data segment (2-byte length, then fixed or descriptor format). */
export function parseSense(data: Uint8Array): Sense | undefined {
  if (data.length < 2) return undefined;
  const len = Math.min(get(data, 0, 2), data.length - 2);
  const s = data.subarray(2, 2 + len);
  if (s.length < 1) return undefined;
  const code = s[0]! & 0x7f;
  if ((code === 0x70 || code === 0x71) && s.length >= 14) return { key: s[2]! & 0x0f, asc: s[12]!, ascq: s[13]! };
  if ((code === 0x72 || code === 0x73) && s.length >= 4) return { key: s[1]! & 0x0f, asc: s[2]!, ascq: s[3]! };
  if ((code === 0x70 || code === 0x71) && s.length >= 3) return { key: s[2]! & 0x0f, asc: 0, ascq: 0 };
  return undefined;
}

const KEY_NAMES = ['no sense', 'recovered error', 'not ready', 'medium error', 'hardware error', 'illegal request', 'unit attention', 'data protect', 'blank check', 'vendor specific', 'copy aborted', 'aborted command', '(0xc)', 'volume overflow', 'miscompare', '(0xf)'];

const ASC_NAMES: Record<number, string> = {
  0x0400: 'logical unit not ready',
  0x1100: 'unrecovered read error',
  0x2000: 'invalid command operation code',
  0x2100: 'logical block address out of range',
  0x2400: 'invalid field in CDB',
  0x2500: 'logical unit not supported',
  0x2600: 'invalid field in parameter list',
  0x2700: 'write protected',
  0x2707: 'space allocation failed write protect',
  0x2800: 'not ready to ready change, medium may have changed',
  0x2900: 'power on, reset, or bus device reset occurred',
  0x3a00: 'medium not present',
};

export function describeSense(s: Sense): string {
  const code = (s.asc << 8) | s.ascq;
  const asc = ASC_NAMES[code] ?? ASC_NAMES[s.asc << 8] ?? `ASC 0x${s.asc.toString(16).padStart(2, '0')} ASCQ 0x${s.ascq.toString(16).padStart(2, '0')}`;
  return `${KEY_NAMES[s.key]}: ${asc}`;
}

/** The errno a command that ended with this sense comes to. */
export function senseErrno(s: Sense): number {
  switch (s.key) {
    case SENSE_KEY.NOT_READY:
      return s.asc === 0x3a ? 123 /* ENOMEDIUM (Linux) */ : E.EIO;
    case SENSE_KEY.ILLEGAL_REQUEST:
      if (s.asc === 0x20) return E.ENOTSUP;
      if (s.asc === 0x25) return E.ENXIO;
      return E.EINVAL;
    case SENSE_KEY.DATA_PROTECT:
      return s.asc === 0x27 && s.ascq === 0x07 ? E.ENOSPC : E.EROFS;
    case SENSE_KEY.ABORTED_COMMAND:
      return E.ECANCELED;
    default:
      return E.EIO;
  }
}

/** A command worth sending again as it is: the LUN reports a change or is busy for now. */
export function senseRetryable(s: Sense): boolean {
  return s.key === SENSE_KEY.UNIT_ATTENTION || s.key === SENSE_KEY.ABORTED_COMMAND || (s.key === SENSE_KEY.NOT_READY && s.asc === 0x04 && s.ascq === 0x01);
}
