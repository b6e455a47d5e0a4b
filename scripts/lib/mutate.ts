// Mutations of disk images that know no format: what the corruption test and the
// fuzzer (scripts/fuzz.ts) do to the images qemu-img makes. Formats keep sizes and
// offsets in their headers and tables, so besides bit flips and cuts the mutations
// find the words of an image that look like offsets into it (in bytes or in 512-byte
// sectors, either byte order) and point them elsewhere: at each other, at the header,
// at themselves, past the end of the file, or at absurd places; and where an image
// has a text descriptor (vmdk), its numbers and file names.

/** A deterministic PRNG (xorshift32), so a failure can be replayed from its seed. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** A word of the image that looks like an offset into it. */
export interface PointerSite {
  /** Where the word is. */
  at: number;
  width: 4 | 8;
  le: boolean;
  /** 1 for a byte offset, 512 for a sector number. */
  unit: 1 | 512;
  /** The host offset it names. */
  target: number;
}

/** What the mutations know of one image, found once (pointerSites is a scan). */
export interface Shape {
  size: number;
  pointers: PointerSite[];
  /** Where a text descriptor is (vmdk), as [start, end). */
  text?: [number, number];
}

function readWord(b: Buffer, at: number, width: 4 | 8, le: boolean): number {
  if (width === 4) return le ? b.readUInt32LE(at) : b.readUInt32BE(at);
  return Number(le ? b.readBigUInt64LE(at) : b.readBigUInt64BE(at));
}

function writeWord(b: Buffer, at: number, width: 4 | 8, le: boolean, v: number | bigint): void {
  if (at < 0 || at + width > b.length) return;
  if (width === 4) {
    const n = Number(BigInt.asUintN(32, BigInt(Math.trunc(Number(v)))));
    if (le) b.writeUInt32LE(n, at);
    else b.writeUInt32BE(n, at);
  } else {
    const n = BigInt.asUintN(64, typeof v === 'bigint' ? v : BigInt(Math.trunc(v)));
    if (le) b.writeBigUInt64LE(n, at);
    else b.writeBigUInt64BE(n, at);
  }
}

/**
 * The words in the first `scan` bytes that name a 512-aligned place inside the file
 * (byte offsets) or a sector inside it (sector numbers above 1). At most `max`,
 * spread over the image.
 */
export function pointerSites(b: Buffer, scan = 4 * 1024 * 1024, max = 4096): PointerSite[] {
  const out: PointerSite[] = [];
  const end = Math.min(b.length, scan);
  for (let at = 0; at + 8 <= end; at += 4) {
    for (const le of [true, false]) {
      const v32 = le ? b.readUInt32LE(at) : b.readUInt32BE(at);
      if (v32 >= 512 && v32 % 512 === 0 && v32 < b.length) out.push({ at, width: 4, le, unit: 1, target: v32 });
      else if (v32 > 1 && v32 * 512 < b.length && v32 !== 0x01000000) out.push({ at, width: 4, le, unit: 512, target: v32 * 512 });
      if (at % 8 === 0) {
        const v64 = Number(le ? b.readBigUInt64LE(at) : b.readBigUInt64BE(at));
        // A qcow2 L2/L1 entry carries flags in its top bits: the offset is the middle.
        const off = v64 % 2 ** 56;
        if (off >= 512 && off % 512 === 0 && off < b.length && v64 !== v32) out.push({ at, width: 8, le, unit: 1, target: off });
      }
    }
  }
  if (out.length <= max) return out;
  const step = out.length / max;
  return Array.from({ length: max }, (_, i) => out[Math.floor(i * step)]!);
}

/** Where a plain-text descriptor is: the first run of printable text with a '=' line, at least 64 bytes. */
export function findText(b: Buffer): [number, number] | undefined {
  const i = b.indexOf('# Disk DescriptorFile');
  if (i < 0) return undefined;
  let j = i;
  while (j < b.length && b[j] !== 0) j++;
  return [i, j];
}

export function shapeOf(b: Buffer): Shape {
  return { size: b.length, pointers: pointerSites(b), text: findText(b) };
}

const INTERESTING = [0, 1, 0x7f, 0xff, 0x200, 0xfff, 0x1000, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 2 ** 32, 2 ** 40, 2 ** 53 - 1, 2n ** 63n, 2n ** 64n - 1n];

/** Names a hostile descriptor might give: itself, a parent folder, a system file, a device, a long one. */
const HOSTILE_NAMES = ['SELF', '../escape.vmdk', '/etc/shadow', '/dev/zero', '/proc/self/mem', 'x'.repeat(5000), '', '"', 'a/../../b'];

export type MutationKind = 'bitflip' | 'byte' | 'int' | 'pointer-other' | 'pointer-self' | 'pointer-header' | 'pointer-eof' | 'pointer-huge' | 'copy-table' | 'truncate' | 'extend' | 'text-number' | 'text-name' | 'text-line' | 'splice';

export const MUTATION_KINDS: readonly MutationKind[] = ['bitflip', 'byte', 'int', 'pointer-other', 'pointer-self', 'pointer-header', 'pointer-eof', 'pointer-huge', 'copy-table', 'truncate', 'extend', 'text-number', 'text-name', 'text-line', 'splice'];

/** A place to damage: mostly the header, else near a table a pointer names, else anywhere. */
function place(r: () => number, s: Shape, len: number): number {
  const x = r();
  if (x < 0.4 || s.pointers.length === 0) return Math.floor(r() * Math.min(len, 4096));
  if (x < 0.8) {
    const p = s.pointers[Math.floor(r() * s.pointers.length)]!;
    return Math.min(len - 1, r() < 0.5 ? p.at : p.target + Math.floor(r() * 512));
  }
  return Math.floor(r() * len);
}

/**
 * One mutation of `b` (a copy; `b` is not changed), of the kind given or one drawn.
 * `other` is a second input for splicing; `selfName` the file's own name (for
 * descriptors that name themselves).
 */
export function mutate(b: Buffer, s: Shape, r: () => number, o: { kind?: MutationKind; other?: Buffer; selfName?: string } = {}): { out: Buffer; kind: MutationKind } {
  let kind = o.kind ?? MUTATION_KINDS[Math.floor(r() * MUTATION_KINDS.length)]!;
  if (kind.startsWith('text-') && !(s.text && s.text[1] <= b.length)) kind = 'int';
  if ((kind.startsWith('pointer-') || kind === 'copy-table') && s.pointers.length === 0) kind = 'int';
  if (kind === 'splice' && !o.other) kind = 'bitflip';
  if (b.length === 0) return { out: Buffer.alloc(512, Math.floor(r() * 256)), kind: 'extend' };
  let out = Buffer.from(b);
  const pick = (): PointerSite => s.pointers[Math.floor(r() * s.pointers.length)]!;
  const setPointer = (p: PointerSite, host: number | bigint): void => {
    const v = typeof host === 'bigint' ? host : p.unit === 512 ? Math.floor(host / 512) : host;
    if (p.at + p.width <= out.length) writeWord(out, p.at, p.width, p.le, v);
  };
  switch (kind) {
    case 'bitflip':
      for (let k = 0, n = 1 + Math.floor(r() * 8); k < n; k++) {
        const at = place(r, s, out.length);
        out[at]! ^= 1 << Math.floor(r() * 8);
      }
      break;
    case 'byte':
      for (let k = 0, n = 1 + Math.floor(r() * 8); k < n; k++) out[place(r, s, out.length)] = Math.floor(r() * 256);
      break;
    case 'int': {
      const at = place(r, s, out.length) & ~3;
      const v = INTERESTING[Math.floor(r() * INTERESTING.length)]!;
      writeWord(out, at, r() < 0.5 ? 4 : 8, r() < 0.5, v);
      break;
    }
    case 'pointer-other': {
      // A table entry naming another table (or data): two owners of one place.
      const p = pick();
      setPointer(p, pick().target);
      break;
    }
    case 'pointer-self': {
      const p = pick();
      setPointer(p, p.at - (p.at % 512));
      break;
    }
    case 'pointer-header':
      setPointer(pick(), r() < 0.5 ? 0 : 512);
      break;
    case 'pointer-eof': {
      const p = pick();
      setPointer(p, Math.ceil(out.length / 512) * 512 + Math.floor(r() * 16) * 65536);
      break;
    }
    case 'pointer-huge': {
      const p = pick();
      setPointer(p, [2n ** 62n, 2n ** 56n - 512n, 2n ** 32n - 1n, 2n ** 31n][Math.floor(r() * 4)]!);
      break;
    }
    case 'copy-table': {
      // One table's bytes over another's (tables pointing where the other's point).
      const a = pick().target;
      const d = pick().target;
      const n = 512 * (1 + Math.floor(r() * 8));
      if (a < out.length && d < out.length) out.copy(out, d, a, Math.min(out.length, a + n));
      break;
    }
    case 'truncate': {
      // Mostly just after a table or header starts, else anywhere.
      const cut = r() < 0.5 && s.pointers.length ? pick().target + Math.floor(r() * 1024) : Math.floor(r() * out.length);
      out = out.subarray(0, Math.min(out.length, cut));
      break;
    }
    case 'extend':
      out = Buffer.concat([out, Buffer.alloc(512 * (1 + Math.floor(r() * 128)), r() < 0.5 ? 0 : 0xff)]);
      break;
    case 'text-number':
    case 'text-name':
    case 'text-line': {
      const [a, e] = s.text!;
      let t = out.subarray(a, e).toString('latin1');
      const lines = t.split('\n');
      const li = Math.floor(r() * lines.length);
      if (kind === 'text-number') {
        const nums = [...lines[li]!.matchAll(/\d+/g)];
        if (nums.length) {
          const m = nums[Math.floor(r() * nums.length)]!;
          const v = ['0', '1', '4294967295', '18446744073709551615', '9007199254740993', '-1', '99999999999999999999999', String(2 ** 31)][Math.floor(r() * 8)]!;
          lines[li] = lines[li]!.slice(0, m.index) + v + lines[li]!.slice(m.index! + m[0].length);
        }
      } else if (kind === 'text-name') {
        // A quoted name (extent file, parentFileNameHint) becomes a hostile one.
        const quoted = lines.map((l, i) => [l, i] as const).filter(([l]) => /"[^"]*"/.test(l));
        if (quoted.length) {
          const [l, i] = quoted[Math.floor(r() * quoted.length)]!;
          let name = HOSTILE_NAMES[Math.floor(r() * HOSTILE_NAMES.length)]!;
          if (name === 'SELF') name = o.selfName ?? 'self.vmdk';
          lines[i] = l.replace(/"[^"]*"/, `"${name}"`);
        }
      } else {
        // An extent list that repeats a line (many times), loses one, or gets one it cannot parse.
        const x = r();
        if (x < 0.4) lines.splice(li, 0, ...Array.from({ length: 1 + Math.floor(r() * 200) }, () => lines[li]!));
        else if (x < 0.7) lines.splice(li, 1);
        else lines.splice(li, 0, ['RW 99999999999 SPARSE "x"', 'RW 0 FLAT "SELF" 0', 'createType="vmfsSparse"', 'ddb.geometry.cylinders = "-5"', '\x01\x02\x03'][Math.floor(r() * 5)]!);
      }
      t = lines.join('\n');
      const bytes = Buffer.from(t, 'latin1');
      // In place where it fits (an embedded descriptor has a fixed room), else the file grows or shrinks.
      if (bytes.length <= e - a) {
        out.fill(0, a, e);
        bytes.copy(out, a);
      } else out = Buffer.concat([out.subarray(0, a), bytes, out.subarray(e)]);
      break;
    }
    case 'splice': {
      const at = Math.floor(r() * Math.min(out.length, o.other!.length));
      const n = Math.min(out.length - at, 1 + Math.floor(r() * 4096));
      o.other!.copy(out, at, at, at + n);
      break;
    }
  }
  return { out, kind };
}

export { readWord };
