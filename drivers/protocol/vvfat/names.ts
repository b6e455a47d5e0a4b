// Directory entries of FAT: 8.3 short names with numeric tails, VFAT long-name (LFN)
// entries, and the DOS date and time (Microsoft's FAT specification, "Directory
// Structure" and "Long File Name Implementation").

export const DIRENT = 32;
export const ATTR_READ_ONLY = 0x01;
export const ATTR_VOLUME_ID = 0x08;
export const ATTR_DIRECTORY = 0x10;
export const ATTR_ARCHIVE = 0x20;
export const ATTR_LFN = 0x0f;
/** Characters in one LFN entry. */
const LFN_CHARS = 13;
/** Where an LFN entry keeps its 13 UTF-16 characters. */
const LFN_OFFSETS = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30] as const;
const LFN_MAX = 255;

/** Characters a short name may hold besides A-Z and 0-9 (QEMU's to_valid_short_char). */
const SHORT_EXTRA = "$%'-_@~`!(){}^#&";
/** For each ASCII code: the short-name character it becomes (upper case), or 0 where none. */
const SHORT_CHAR = new Uint8Array(128);
for (let c = 0; c < 128; c++) {
  const ch = String.fromCharCode(c).toUpperCase();
  if ((ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'Z') || SHORT_EXTRA.includes(ch)) SHORT_CHAR[c] = ch.charCodeAt(0);
}

/** A name character's short-name form; anything beyond ASCII has none (QEMU's rule). */
function shortChar(code: number): string | undefined {
  const v = code < 128 ? SHORT_CHAR[code]! : 0;
  return v ? String.fromCharCode(v) : undefined;
}

/** Why a host name cannot be a FAT long name, or undefined when it can. */
export function badLongName(name: string): string | undefined {
  if (/[\x00-\x1f"*/:<>?\\|\x7f]/.test(name)) return 'has a character FAT names cannot hold';
  if (/[. ]$/.test(name)) return 'ends in a dot or a space, which FAT drops';
  if (name.length > LFN_MAX) return `is longer than ${LFN_MAX} UTF-16 characters`;
  return undefined;
}

/** The basis of a short name: 8 + 3 characters, space padded, and whether it lost anything. */
export function shortBasis(name: string): { base: string; ext: string; lossy: boolean } {
  let lossy = false;
  const dot = name.lastIndexOf('.');
  const hasExt = dot > 0;
  const stem = hasExt ? name.slice(0, dot) : name;
  let base = '';
  for (let i = 0; i < stem.length; i++) {
    const v = shortChar(stem.charCodeAt(i));
    if (v !== undefined && base.length < 8) base += v;
    else lossy = true;
  }
  let ext = '';
  if (hasExt) {
    for (let i = dot + 1; i < name.length; i++) {
      const v = shortChar(name.charCodeAt(i));
      if (v !== undefined && ext.length < 3) ext += v;
      else lossy = true;
    }
  }
  if (base === '') lossy = true;
  return { base, ext, lossy };
}

/** The 11 bytes of a short name entry, as a latin1 string (space padded). */
export function shortBytes(base: string, ext: string): string {
  return base.padEnd(8, ' ') + ext.padEnd(3, ' ');
}

/** `BASE~N`, the tail replacing the end of the base where it would not fit. */
export function withTail(base: string, n: number): string {
  const tail = `~${n}`;
  return base.slice(0, Math.min(base.length, 8 - tail.length)) + tail;
}

/** The short name as a person (and a long-name comparison) reads it: `BASE.EXT`. */
export function shortText(s: string): string {
  const base = s.slice(0, 8).trimEnd();
  const ext = s.slice(8, 11).trimEnd();
  return ext ? `${base}.${ext}` : base;
}

/** The checksum of a short name that its LFN entries carry (FAT spec, ChkSum). */
export function lfnChecksum(short: string): number {
  let sum = 0;
  for (let i = 0; i < 11; i++) sum = (((sum & 1) << 7) + (sum >> 1) + short.charCodeAt(i)) & 0xff;
  return sum;
}

/** How many LFN entries a name takes. */
export function lfnCount(name: string): number {
  return Math.ceil(name.length / LFN_CHARS);
}

/** Write the LFN entries of `name` (last part first, as on disk) at `at`. */
export function writeLfn(dst: Buffer, at: number, name: string, checksum: number): number {
  const n = lfnCount(name);
  for (let k = 0; k < n; k++) {
    const seq = n - k; // entries go from the last part to the first
    const e = at + k * DIRENT;
    dst.fill(0, e, e + DIRENT);
    dst[e] = seq | (k === 0 ? 0x40 : 0);
    dst[e + 11] = ATTR_LFN;
    dst[e + 13] = checksum;
    for (let i = 0; i < LFN_CHARS; i++) {
      const pos = (seq - 1) * LFN_CHARS + i;
      // After the name: one 0x0000, then 0xFFFF padding.
      const unit = pos < name.length ? name.charCodeAt(pos) : pos === name.length ? 0 : 0xffff;
      dst.writeUInt16LE(unit, e + LFN_OFFSETS[i]!);
    }
  }
  return at + n * DIRENT;
}

/** Read the characters of one LFN entry (up to its terminator). */
export function lfnPart(src: Uint8Array, at: number): string {
  let s = '';
  for (const off of LFN_OFFSETS) {
    const u = src[at + off]! | (src[at + off + 1]! << 8);
    if (u === 0 || u === 0xffff) break;
    s += String.fromCharCode(u);
  }
  return s;
}

const MIN_DOS = new Date(1980, 0, 1).getTime();
const MAX_DOS = new Date(2107, 11, 31, 23, 59, 58).getTime();

/**
 * Local time changes by whole quarter hours (every zone offset is a multiple of 15
 * minutes), so one Date per quarter hour serves every timestamp inside it: a scan of
 * many files made together computes few dates.
 */
const QUARTER = 15 * 60 * 1000;
const quarters = new Map<number, { date: number; hour: number; minute: number }>();

function quarterOf(q: number): { date: number; hour: number; minute: number } {
  let v = quarters.get(q);
  if (!v) {
    if (quarters.size > 4096) quarters.clear();
    const d = new Date(q * QUARTER);
    v = { date: ((d.getFullYear() - 1980) << 9) | ((d.getMonth() + 1) << 5) | d.getDate(), hour: d.getHours(), minute: d.getMinutes() };
    quarters.set(q, v);
  }
  return v;
}

/** DOS date and time in local time (as QEMU's fat_datetime and every FAT driver), clamped to 1980..2107. */
export function dosDateTime(ms: number): { date: number; time: number; tenths: number } {
  const t = Math.min(MAX_DOS, Math.max(MIN_DOS, Math.floor(ms)));
  const q = Math.floor(t / QUARTER);
  const { date, hour, minute } = quarterOf(q);
  const inQuarter = t - q * QUARTER;
  const sec = Math.floor(inQuarter / 1000);
  return {
    date,
    time: (hour << 11) | ((minute + Math.floor(sec / 60)) << 5) | ((sec % 60) >> 1),
    tenths: ((sec % 60) & 1) * 100 + Math.floor((inQuarter % 1000) / 10),
  };
}

/** Milliseconds since the epoch of a DOS date and time (local time). */
export function fromDosDateTime(date: number, time: number): number {
  return new Date(1980 + (date >> 9), ((date >> 5) & 15) - 1, date & 31, time >> 11, (time >> 5) & 63, (time & 31) * 2).getTime();
}
