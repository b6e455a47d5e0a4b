// The vmdk text descriptor: probing, createType, extent lines, CID/parentCID and
// parentFileNameHint, read the way QEMU 7.2's block/vmdk.c reads them (strstr and
// sscanf over a C string), so that every descriptor QEMU accepts we accept alike.
import { CorruptImageError, UnsupportedError } from '../../errors.js';

/** The descriptor area QEMU reads for CIDs and the parent hint (DESC_SIZE). */
export const DESC_SIZE = 20 * 512;
/** vmdk_read_desc reads at most this much of a descriptor file. */
export const MAX_DESC_BYTES = (1 << 20) - 1;

const latin1 = new TextDecoder('latin1');

/** The bytes up to the first NUL, as the C code sees its buffer. */
export function cString(buf: Uint8Array): string {
  const nul = buf.indexOf(0);
  return latin1.decode(nul < 0 ? buf : buf.subarray(0, nul));
}

/** vmdk_probe for text: comments and blank lines, then "version=1|2|3". */
export function probeDescriptor(head: Uint8Array): boolean {
  const end = head.length;
  let p = 0;
  const at = (s: string): boolean => {
    if (end - p < s.length) return false;
    for (let i = 0; i < s.length; i++) if (head[p + i] !== s.charCodeAt(i)) return false;
    return true;
  };
  while (p < end) {
    const c = head[p];
    if (c === 0x23 /* # */) {
      while (p < end && head[p] !== 0x0a) p++;
      p++;
      continue;
    }
    if (c === 0x20) {
      while (p < end && head[p] === 0x20) p++;
      if (p < end && head[p] === 0x0d) p++;
      if (p === end || head[p] !== 0x0a) return false;
      p++;
      continue;
    }
    for (const v of ['1', '2', '3']) if (at(`version=${v}\n`) || at(`version=${v}\r\n`)) return true;
    return false;
  }
  return false;
}

export type ExtentType = 'FLAT' | 'SPARSE' | 'VMFS' | 'VMFSSPARSE' | 'SESPARSE';

export interface ExtentLine {
  type: ExtentType;
  sectors: number;
  fileName: string;
  /** Byte offset of the data in a flat extent's file. */
  flatOffset: number;
}

/** Create types QEMU opens from a text descriptor (vmdk_open_desc_file). */
const DESC_CREATE_TYPES = ['monolithicFlat', 'vmfs', 'vmfsSparse', 'seSparse', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'];

const isSpace = (c: string | undefined): boolean => c !== undefined && ' \t\n\v\f\r'.includes(c);

/**
 * A small sscanf for "%10s %lld %10s \"%511[^\n\r\"]\" %lld": whitespace in the
 * format skips any whitespace, newlines included, exactly as glibc does.
 */
class Scanner {
  constructor(private readonly s: string, public p: number) {}
  ws(): void {
    while (isSpace(this.s[this.p])) this.p++;
  }
  word(max: number): string | undefined {
    this.ws();
    const start = this.p;
    while (this.p < this.s.length && this.p - start < max && !isSpace(this.s[this.p])) this.p++;
    return this.p > start ? this.s.slice(start, this.p) : undefined;
  }
  int(): bigint | undefined {
    this.ws();
    const m = /^[+-]?\d+/.exec(this.s.slice(this.p, this.p + 40));
    if (!m) return undefined;
    this.p += m[0].length;
    // A longer run of digits still belongs to the number.
    while (/\d/.test(this.s[this.p] ?? '')) this.p++;
    return BigInt(m[0]);
  }
  lit(c: string): boolean {
    if (this.s[this.p] !== c) return false;
    this.p++;
    return true;
  }
  quoted(max: number): string | undefined {
    const start = this.p;
    while (this.p < this.s.length && this.p - start < max && !'\n\r"'.includes(this.s[this.p]!)) this.p++;
    return this.p > start ? this.s.slice(start, this.p) : undefined;
  }
}

function scanExtentLine(desc: string, p: number): { matches: number; access?: string; sectors?: bigint; type?: string; fname?: string; flat?: bigint } {
  const sc = new Scanner(desc, p);
  const access = sc.word(10);
  if (access === undefined) return { matches: 0 };
  const sectors = sc.int();
  if (sectors === undefined) return { matches: 1, access };
  const type = sc.word(10);
  if (type === undefined) return { matches: 2, access, sectors };
  sc.ws();
  if (!sc.lit('"')) return { matches: 3, access, sectors, type };
  const fname = sc.quoted(511);
  if (fname === undefined) return { matches: 3, access, sectors, type };
  if (!sc.lit('"')) return { matches: 4, access, sectors, type, fname };
  const flat = sc.int();
  if (flat === undefined) return { matches: 4, access, sectors, type, fname };
  return { matches: 5, access, sectors, type, fname, flat };
}

/** vmdk_parse_description: the value after `name="`, up to the next quote. */
export function descriptionValue(desc: string, name: string): string | undefined {
  const at = desc.indexOf(name);
  if (at < 0) return undefined;
  const start = at + name.length + 2;
  if (start >= desc.length) return undefined;
  const end = desc.indexOf('"', start);
  return end < 0 ? undefined : desc.slice(start, end);
}

export interface Descriptor {
  createType: string;
  extents: ExtentLine[];
}

/** vmdk_open_desc_file + vmdk_parse_extents; lines that are not RW extents are skipped, as in QEMU. */
export function parseDescriptor(desc: string, name: string): Descriptor {
  const createType = descriptionValue(desc, 'createType');
  if (createType === undefined || createType.length > 127) throw new CorruptImageError(`${name}: invalid VMDK image descriptor (no createType)`);
  if (!DESC_CREATE_TYPES.includes(createType)) throw new UnsupportedError(`${name}: unsupported VMDK image type '${createType}'`);
  const extents: ExtentLine[] = [];
  for (let p = 0; p < desc.length; ) {
    const nl = desc.indexOf('\n', p);
    const next = nl < 0 ? desc.length : nl + 1;
    const line = desc.slice(p, nl < 0 ? desc.length : nl);
    const r = scanExtentLine(desc, p);
    p = next;
    if (r.matches < 4 || r.access !== 'RW') continue;
    let flat = r.flat ?? -1n;
    const invalid = (): CorruptImageError => new CorruptImageError(`${name}: invalid extent line: ${line}`);
    if (r.type === 'FLAT') {
      if (r.matches !== 5 || flat < 0n) throw invalid();
    } else if (r.type === 'VMFS') {
      if (r.matches !== 4) throw invalid();
      flat = 0n;
    } else if (r.matches !== 4) {
      throw invalid();
    }
    const sectors = r.sectors!;
    if (sectors <= 0n || !['FLAT', 'SPARSE', 'VMFS', 'VMFSSPARSE', 'SESPARSE'].includes(r.type!)) continue;
    if (sectors * 512n > BigInt(Number.MAX_SAFE_INTEGER) || flat * 512n > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new CorruptImageError(`${name}: extent too large: ${line}`);
    }
    extents.push({ type: r.type as ExtentType, sectors: Number(sectors), fileName: r.fname!, flatOffset: Number(flat) * 512 });
  }
  return { createType, extents };
}

/** sscanf("%x") after `CID=`: hex digits, an optional 0x, truncated to 32 bits. */
function scanHex(s: string): number | undefined {
  const m = /^\s*([+-]?)(?:0[xX])?([0-9a-fA-F]+)/.exec(s);
  if (!m) return undefined;
  let v = BigInt(`0x${m[2]}`);
  if (v > 0xffffffffffffffffn) v = 0xffffffffffffffffn;
  if (m[1] === '-') v = -v;
  return Number(BigInt.asUintN(32, v));
}

/** vmdk_read_cid over the descriptor area (DESC_SIZE bytes from the descriptor offset). */
export function readCid(area: Uint8Array, parent: boolean): number | undefined {
  const desc = cString(area.subarray(0, DESC_SIZE - 1));
  const key = parent ? 'parentCID' : 'CID';
  const at = desc.indexOf(key);
  if (at < 0) return undefined;
  return scanHex(desc.slice(at + key.length + 1));
}

/** vmdk_parent_open: the parentFileNameHint, or undefined; throws on an unterminated one. */
export function parentHint(area: Uint8Array, name: string): string | undefined {
  const desc = cString(area.subarray(0, DESC_SIZE));
  const at = desc.indexOf('parentFileNameHint');
  if (at < 0) return undefined;
  const start = at + 'parentFileNameHint'.length + 2;
  const end = desc.indexOf('"', start);
  if (start > desc.length || end < 0 || end - start > 4095) throw new CorruptImageError(`${name}: invalid parentFileNameHint in the VMDK descriptor`);
  return desc.slice(start, end);
}

/**
 * vmdk_write_cid: the descriptor area with "CID=<new>\n" put between CID= and
 * parentCID; bytes after the new string's NUL stay as they were, as in QEMU.
 */
export function rewriteCid(area: Uint8Array, cid: number): Uint8Array | undefined {
  const buf = Uint8Array.from(area);
  buf[buf.length - 1] = 0;
  const desc = cString(buf);
  const pAt = desc.indexOf('parentCID');
  if (pAt < 0) return undefined;
  const tail = desc.slice(pAt);
  const cAt = desc.indexOf('CID');
  const at = cAt + 4;
  const text = `${cid.toString(16)}\n${tail}`;
  const room = buf.length - 1 - at;
  if (room <= 0) return buf;
  const n = Math.min(text.length, room);
  for (let i = 0; i < n; i++) buf[at + i] = text.charCodeAt(i) & 0xff;
  buf[at + n] = 0;
  return buf;
}

export interface DescriptorText {
  cid: number;
  parentCid: number;
  createType: string;
  parentFileNameHint?: string;
  /** Extent lines, already formatted. */
  extentLines: string[];
  hwVersion: string;
  cylinders: bigint;
  heads: number;
  adapterType: string;
  toolsVersion: string;
}

/** vmdk_co_do_create's template, byte for byte. */
export function formatDescriptor(d: DescriptorText): string {
  return (
    '# Disk DescriptorFile\n' +
    'version=1\n' +
    `CID=${d.cid.toString(16)}\n` +
    `parentCID=${d.parentCid.toString(16)}\n` +
    `createType="${d.createType}"\n` +
    (d.parentFileNameHint !== undefined ? `parentFileNameHint="${d.parentFileNameHint}"` : '') +
    '\n' +
    '# Extent description\n' +
    d.extentLines.join('') +
    '\n' +
    '# The Disk Data Base\n' +
    '#DDB\n' +
    '\n' +
    `ddb.virtualHWVersion = "${d.hwVersion}"\n` +
    `ddb.geometry.cylinders = "${d.cylinders}"\n` +
    `ddb.geometry.heads = "${d.heads}"\n` +
    'ddb.geometry.sectors = "63"\n' +
    `ddb.adapterType = "${d.adapterType}"\n` +
    `ddb.toolsVersion = "${d.toolsVersion}"\n`
  );
}
