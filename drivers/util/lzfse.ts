// An LZFSE decoder, written from Apple's published reference (github.com/lzfse/lzfse:
// lzfse_decode_base.c, lzfse_fse.c/.h, lzvn_decode_base.c, lzfse_internal.h). dmg's
// ULFO chunks are LZFSE streams: a sequence of blocks, each raw ("bvx-"), LZVN
// ("bvxn"), or LZFSE proper with its tables stored plainly ("bvx1") or packed
// ("bvx2"), ending with "bvx$". The whole output is one buffer of a size known
// beforehand, so unlike the reference this decoder never pauses for more room: a
// stream that would write past the end, read past its input, or reach back before
// the start of the output is corrupt, and every such case throws LzfseError.

export class LzfseError extends Error {}

const MAGIC_END = 0x24787662; // bvx$
const MAGIC_RAW = 0x2d787662; // bvx-
const MAGIC_V1 = 0x31787662; // bvx1
const MAGIC_V2 = 0x32787662; // bvx2
const MAGIC_LZVN = 0x6e787662; // bvxn

const L_SYMBOLS = 20;
const M_SYMBOLS = 20;
const D_SYMBOLS = 64;
const LITERAL_SYMBOLS = 256;
const L_STATES = 64;
const M_STATES = 64;
const D_STATES = 256;
const LITERAL_STATES = 1024;
const MATCHES_PER_BLOCK = 10000;
const LITERALS_PER_BLOCK = 4 * MATCHES_PER_BLOCK;
/** sizeof(lzfse_compressed_block_header_v1): 770 bytes of fields, padded to 4. */
const V1_HEADER_SIZE = 772;
/** offsetof(lzfse_compressed_block_header_v2, freq). */
const V2_FIXED_SIZE = 32;

const L_EXTRA_BITS = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 5, 8];
const L_BASE = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 28, 60];
const M_EXTRA_BITS = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 5, 8, 11];
const M_BASE = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 56, 312];
const D_EXTRA_BITS = [
  0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11, 12,
  12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15,
];
const D_BASE = [
  0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 36, 44, 52, 60, 76, 92, 108, 124, 156, 188, 220, 252, 316, 380, 444, 508, 636, 764, 892, 1020, 1276, 1532, 1788,
  2044, 2556, 3068, 3580, 4092, 5116, 6140, 7164, 8188, 10236, 12284, 14332, 16380, 20476, 24572, 28668, 32764, 40956, 49148, 57340, 65532, 81916, 98300,
  114684, 131068, 163836, 196604, 229372,
];

/** The v2 header's packed frequency codes: bits used and value, by the low 5 bits. */
const FREQ_NBITS = [2, 3, 2, 5, 2, 3, 2, 8, 2, 3, 2, 5, 2, 3, 2, 14, 2, 3, 2, 5, 2, 3, 2, 8, 2, 3, 2, 5, 2, 3, 2, 14];
const FREQ_VALUE = [0, 2, 1, 4, 0, 3, 1, -1, 0, 2, 1, 5, 0, 3, 1, -1, 0, 2, 1, 6, 0, 3, 1, -1, 0, 2, 1, 7, 0, 3, 1, -1];

function fail(why: string): never {
  throw new LzfseError(why);
}

/**
 * An FSE bit stream, read backwards: the bytes before `end` taken as one
 * little-endian number whose top bits are consumed first. `pos` counts the bits
 * not yet consumed, from the start of the whole input (so a stream may, as in the
 * reference, reach back into the bytes before its own payload, never before the input).
 */
class BackwardBits {
  private pos: number;
  constructor(private readonly buf: Uint8Array, end: number, padBits: number) {
    // padBits is the reference's accum_nbits adjustment (-7..0): that many top bits of the last byte are padding.
    if (padBits > 0 || padBits < -7) fail('bad bit count in a block header');
    if (end < 1 || end > buf.length) fail('bit stream outside its block');
    this.pos = end * 8 + padBits;
    if (padBits < 0 && buf[end - 1]! >> (8 + padBits) !== 0) fail('nonzero padding bits');
  }

  pull(n: number): number {
    if (n === 0) return 0;
    const start = this.pos - n;
    if (start < 0) fail('bit stream runs past the start of the input');
    this.pos = start;
    const byte = start >>> 3;
    const shift = start & 7;
    const b = this.buf;
    // n <= 26 here, so the bits are inside 5 bytes.
    const lo = (b[byte] ?? 0) | ((b[byte + 1] ?? 0) << 8) | ((b[byte + 2] ?? 0) << 16);
    const hi = (b[byte + 3] ?? 0) | ((b[byte + 4] ?? 0) << 8);
    const v = lo + hi * 0x1000000;
    return Math.floor(v / 2 ** shift) % 2 ** n;
  }
}

/** A literal decoder table (fse_init_decoder_table): per state, bits to read, symbol, next-state base. */
interface SymbolTable {
  k: Uint8Array;
  symbol: Uint8Array;
  delta: Int32Array;
}

/** A value decoder table (fse_init_value_decoder_table). */
interface ValueTable {
  totalBits: Uint8Array;
  valueBits: Uint8Array;
  delta: Int32Array;
  vbase: Int32Array;
}

function clz32(x: number): number {
  return Math.clz32(x);
}

function checkFreq(freq: Uint16Array, from: number, n: number, states: number, what: string): void {
  let sum = 0;
  for (let i = 0; i < n; i++) sum += freq[from + i]!;
  if (sum > states) fail(`${what} frequencies add up to more than ${states}`);
}

/**
 * The states of an FSE table (fse_init_decoder_table): symbol i owns freq[i]
 * consecutive states; each state reads `k` bits and adds them to `delta` for the next.
 */
function spreadStates(states: number, freq: Uint16Array, from: number, n: number, set: (state: number, symbol: number, k: number, delta: number) => void): void {
  const nClz = clz32(states);
  let at = 0;
  for (let i = 0; i < n; i++) {
    const f = freq[from + i]!;
    if (f === 0) continue;
    const k = clz32(f) - nClz;
    const j0 = ((2 * states) >> k) - f;
    for (let j = 0; j < f; j++, at++) {
      if (j < j0) set(at, i, k, ((f + j) << k) - states);
      else set(at, i, k - 1, (j - j0) << (k - 1));
    }
  }
}

function symbolTable(states: number, freq: Uint16Array, from: number, n: number): SymbolTable {
  const t: SymbolTable = { k: new Uint8Array(states), symbol: new Uint8Array(states), delta: new Int32Array(states) };
  spreadStates(states, freq, from, n, (at, symbol, k, delta) => {
    t.symbol[at] = symbol;
    t.k[at] = k;
    t.delta[at] = delta;
  });
  return t;
}

/** A value table (fse_init_value_decoder_table): each state also reads its symbol's extra bits, added to the symbol's base. */
function valueTable(states: number, freq: Uint16Array, from: number, n: number, vbits: number[], vbase: number[]): ValueTable {
  const t: ValueTable = { totalBits: new Uint8Array(states), valueBits: new Uint8Array(states), delta: new Int32Array(states), vbase: new Int32Array(states) };
  spreadStates(states, freq, from, n, (at, symbol, k, delta) => {
    t.valueBits[at] = vbits[symbol]!;
    t.vbase[at] = vbase[symbol]!;
    t.totalBits[at] = k + vbits[symbol]!;
    t.delta[at] = delta;
  });
  return t;
}

/** The fields of an LZFSE block header, v1 or v2 decoded to v1's shape. */
export interface BlockHeader {
  headerSize: number;
  nLiterals: number;
  nMatches: number;
  nLiteralPayload: number;
  nLmdPayload: number;
  literalBits: number;
  literalState: [number, number, number, number];
  lmdBits: number;
  lState: number;
  mState: number;
  dState: number;
  /** l, m, d, literal frequencies in that order (20 + 20 + 64 + 256). */
  freq: Uint16Array;
}

const FREQ_COUNT = L_SYMBOLS + M_SYMBOLS + D_SYMBOLS + LITERAL_SYMBOLS;

function readV1Header(src: Uint8Array, at: number): BlockHeader {
  if (at + V1_HEADER_SIZE > src.length) fail('block header cut off');
  const dv = new DataView(src.buffer, src.byteOffset + at, V1_HEADER_SIZE);
  const freq = new Uint16Array(FREQ_COUNT);
  for (let i = 0; i < FREQ_COUNT; i++) freq[i] = dv.getUint16(50 + 2 * i, true);
  return {
    headerSize: V1_HEADER_SIZE,
    nLiterals: dv.getUint32(12, true),
    nMatches: dv.getUint32(16, true),
    nLiteralPayload: dv.getUint32(20, true),
    nLmdPayload: dv.getUint32(24, true),
    literalBits: dv.getInt32(28, true),
    literalState: [dv.getUint16(32, true), dv.getUint16(34, true), dv.getUint16(36, true), dv.getUint16(38, true)],
    lmdBits: dv.getInt32(40, true),
    lState: dv.getUint16(44, true),
    mState: dv.getUint16(46, true),
    dState: dv.getUint16(48, true),
    freq,
  };
}

/** The v2 ("bvx2") block header at `at`, unpacked (exported for the tests, which rewrite blocks as v1). */
export function readV2Header(src: Uint8Array, at: number): BlockHeader {
  if (at + V2_FIXED_SIZE > src.length) fail('block header cut off');
  const dv = new DataView(src.buffer, src.byteOffset + at, V2_FIXED_SIZE);
  const v0 = dv.getBigUint64(8, true);
  const v1 = dv.getBigUint64(16, true);
  const v2 = dv.getBigUint64(24, true);
  const field = (v: bigint, offset: number, bits: number): number => Number((v >> BigInt(offset)) & ((1n << BigInt(bits)) - 1n));
  const headerSize = field(v2, 0, 32);
  if (headerSize < V2_FIXED_SIZE || at + headerSize > src.length) fail('block header cut off');
  const freq = new Uint16Array(FREQ_COUNT);
  // The frequency tables, unless omitted: variable-length codes, least significant bit first.
  let p = at + V2_FIXED_SIZE;
  const end = at + headerSize;
  if (p !== end) {
    let accum = 0;
    let nbits = 0;
    for (let i = 0; i < FREQ_COUNT; i++) {
      while (p < end && nbits + 8 <= 32) {
        accum = (accum | (src[p]! << nbits)) >>> 0;
        nbits += 8;
        p++;
      }
      const b = accum & 31;
      const n = FREQ_NBITS[b]!;
      const value = n === 8 ? 8 + ((accum >>> 4) & 0xf) : n === 14 ? 24 + ((accum >>> 4) & 0x3ff) : FREQ_VALUE[b]!;
      if (n > nbits) fail('frequency table cut off');
      freq[i] = value;
      accum >>>= n;
      nbits -= n;
    }
    if (nbits >= 8 || p !== end) fail('frequency table does not fill its header');
  }
  return {
    headerSize,
    nLiterals: field(v0, 0, 20),
    nLiteralPayload: field(v0, 20, 20),
    nMatches: field(v0, 40, 20),
    literalBits: field(v0, 60, 3) - 7,
    literalState: [field(v1, 0, 10), field(v1, 10, 10), field(v1, 20, 10), field(v1, 30, 10)],
    nLmdPayload: field(v1, 40, 20),
    lmdBits: field(v1, 60, 3) - 7,
    lState: field(v2, 32, 10),
    mState: field(v2, 42, 10),
    dState: field(v2, 52, 10),
    freq,
  };
}

/** lzfse_check_block_header_v1. */
function checkHeader(h: BlockHeader): void {
  if (h.nLiterals > LITERALS_PER_BLOCK) fail('too many literals in a block');
  if (h.nMatches > MATCHES_PER_BLOCK) fail('too many matches in a block');
  if (h.literalState.some((s) => s >= LITERAL_STATES)) fail('bad literal state');
  if (h.lState >= L_STATES || h.mState >= M_STATES || h.dState >= D_STATES) fail('bad L, M or D state');
  checkFreq(h.freq, 0, L_SYMBOLS, L_STATES, 'L');
  checkFreq(h.freq, L_SYMBOLS, M_SYMBOLS, M_STATES, 'M');
  checkFreq(h.freq, L_SYMBOLS + M_SYMBOLS, D_SYMBOLS, D_STATES, 'D');
  checkFreq(h.freq, L_SYMBOLS + M_SYMBOLS + D_SYMBOLS, LITERAL_SYMBOLS, LITERAL_STATES, 'literal');
}

/** Copy `n` bytes from `dst[from...]` to `dst[to...]` byte by byte (an overlapping match repeats its start). */
function copyMatch(dst: Uint8Array, to: number, from: number, n: number): void {
  if (to - from >= n) {
    dst.copyWithin(to, from, from + n);
    return;
  }
  for (let i = 0; i < n; i++) dst[to + i] = dst[from + i]!;
}

/** Decode one LZFSE block (v1 or v2) whose header starts at `at`; returns the input and output positions after it. */
function decodeLzfseBlock(src: Uint8Array, at: number, h: BlockHeader, dst: Uint8Array, out: number): { at: number; out: number } {
  checkHeader(h);
  const payload = at + h.headerSize;
  if (payload + h.nLiteralPayload + h.nLmdPayload > src.length) fail('block payload cut off');
  const f = h.freq;
  const literalTable = symbolTable(LITERAL_STATES, f, L_SYMBOLS + M_SYMBOLS + D_SYMBOLS, LITERAL_SYMBOLS);
  const lTable = valueTable(L_STATES, f, 0, L_SYMBOLS, L_EXTRA_BITS, L_BASE);
  const mTable = valueTable(M_STATES, f, L_SYMBOLS, M_SYMBOLS, M_EXTRA_BITS, M_BASE);
  const dTable = valueTable(D_STATES, f, L_SYMBOLS + M_SYMBOLS, D_SYMBOLS, D_EXTRA_BITS, D_BASE);

  // Literals: four interleaved FSE states over one stream read backwards from the end of the literal payload.
  const literals = new Uint8Array(h.nLiterals + 4);
  {
    const bits = new BackwardBits(src, payload + h.nLiteralPayload, h.literalBits);
    const states = [...h.literalState];
    for (let i = 0; i < h.nLiterals; i += 4) {
      for (let j = 0; j < 4; j++) {
        const s = states[j]!;
        literals[i + j] = literalTable.symbol[s]!;
        states[j] = (literalTable.delta[s]! + bits.pull(literalTable.k[s]!)) & (LITERAL_STATES - 1);
      }
    }
  }

  // L, M, D triplets: a second stream, read backwards from the end of the block.
  const lmdStart = payload + h.nLiteralPayload;
  const bits = new BackwardBits(src, lmdStart + h.nLmdPayload, h.lmdBits);
  let l = h.lState;
  let m = h.mState;
  let d = h.dState;
  let lit = 0;
  let D = -1;
  const value = (t: ValueTable, state: number, states: number): [number, number] => {
    const vb = t.valueBits[state]!;
    const v = bits.pull(t.totalBits[state]!);
    const high = Math.floor(v / 2 ** vb);
    return [(t.delta[state]! + high) & (states - 1), t.vbase[state]! + (v - high * 2 ** vb)];
  };
  for (let n = 0; n < h.nMatches; n++) {
    let L: number;
    let M: number;
    let newD: number;
    [l, L] = value(lTable, l, L_STATES);
    [m, M] = value(mTable, m, M_STATES);
    [d, newD] = value(dTable, d, D_STATES);
    if (newD !== 0) D = newD;
    if (lit + L > h.nLiterals) fail('literal run past the literals of its block');
    if (out + L + M > dst.length) fail('stream decodes to more than its chunk');
    dst.set(literals.subarray(lit, lit + L), out);
    out += L;
    lit += L;
    if (M > 0) {
      if (D <= 0 || D > out) fail('match reaches before the start of the output');
      copyMatch(dst, out, out - D, M);
      out += M;
    }
  }
  return { at: lmdStart + h.nLmdPayload, out };
}

/** Decode one LZVN block (lzvn_decode): `srcEnd` and `dstEnd` bound its payload and its output. */
function decodeLzvn(src: Uint8Array, at: number, srcEnd: number, dst: Uint8Array, out: number, dstEnd: number): { at: number; out: number } {
  let D = 0;
  let p = at;
  const literal = (L: number, opLen: number): void => {
    // The literal and at least one byte of the next opcode must be in the payload.
    if (srcEnd - p <= opLen + L) fail('LZVN payload cut off');
    if (out + L > dstEnd) fail('LZVN block decodes to more than it says');
    p += opLen;
    dst.set(src.subarray(p, p + L), out);
    p += L;
    out += L;
  };
  const match = (M: number): void => {
    if (D <= 0 || D > out) fail('LZVN match reaches before the start of the output');
    if (out + M > dstEnd) fail('LZVN block decodes to more than it says');
    copyMatch(dst, out, out - D, M);
    out += M;
  };
  for (;;) {
    if (p >= srcEnd) fail('LZVN payload ends without an end-of-stream opcode');
    const opc = src[p]!;
    const low = opc & 7;
    const row = opc >> 3;
    if (opc >= 0xf0) {
      // Match only, with the previous distance: 1111MMMM, or 11110000 MMMMMMMM (16..271).
      let M: number;
      if (opc === 0xf0) {
        if (srcEnd - p <= 2) fail('LZVN payload cut off');
        M = src[p + 1]! + 16;
        p += 2;
      } else {
        if (srcEnd - p <= 1) fail('LZVN payload cut off');
        M = opc & 15;
        p += 1;
      }
      match(M);
    } else if (opc >= 0xe0) {
      // Literal only: 1110LLLL, or 11100000 LLLLLLLL (16..271).
      if (opc === 0xe0) {
        if (srcEnd - p <= 2) fail('LZVN payload cut off');
        literal(src[p + 1]! + 16, 2);
      } else literal(opc & 15, 1);
    } else if (opc >= 0xa0 && opc < 0xc0) {
      // Medium distance: 101LLMMM DDDDDDMM DDDDDDDD.
      const L = (opc >> 3) & 3;
      if (srcEnd - p <= 3 + L) fail('LZVN payload cut off');
      const opc23 = src[p + 1]! | (src[p + 2]! << 8);
      const M = (((opc & 7) << 2) | (opc23 & 3)) + 3;
      D = opc23 >> 2;
      literal(L, 3);
      match(M);
    } else if ((row >= 14 && row <= 15) || (row >= 26 && row <= 27)) {
      fail(`LZVN opcode 0x${opc.toString(16)} is undefined`);
    } else if (low === 6 && row < 8) {
      if (row === 0) {
        // End of stream: the opcode and 7 bytes of padding.
        if (srcEnd - p < 8) fail('LZVN payload cut off');
        return { at: p + 8, out };
      }
      if (row === 1 || row === 2) {
        if (srcEnd - p <= 1) fail('LZVN payload cut off');
        p += 1; // nop
      } else fail(`LZVN opcode 0x${opc.toString(16)} is undefined`);
    } else {
      const L = opc >> 6;
      const M = ((opc >> 3) & 7) + 3;
      if (low === 7) {
        // Large distance: LLMMM111 DDDDDDDD DDDDDDDD.
        if (srcEnd - p <= 3 + L) fail('LZVN payload cut off');
        D = src[p + 1]! | (src[p + 2]! << 8);
        literal(L, 3);
      } else if (low === 6) {
        // Previous distance: LLMMM110.
        literal(L, 1);
      } else {
        // Small distance: LLMMMDDD DDDDDDDD.
        if (srcEnd - p <= 2 + L) fail('LZVN payload cut off');
        D = (low << 8) | src[p + 1]!;
        literal(L, 2);
      }
      match(M);
    }
  }
}

/**
 * Decode the LZFSE stream at the start of `src` into `dst`, which it must fill
 * exactly; bytes after the end-of-stream block are ignored.
 */
export function lzfseDecode(src: Uint8Array, dst: Uint8Array): void {
  const dv = new DataView(src.buffer, src.byteOffset, src.byteLength);
  let at = 0;
  let out = 0;
  for (;;) {
    if (at + 4 > src.length) fail('stream ends without an end-of-stream block');
    const magic = dv.getUint32(at, true);
    if (magic === MAGIC_END) break;
    if (magic === MAGIC_RAW) {
      if (at + 8 > src.length) fail('block header cut off');
      const n = dv.getUint32(at + 4, true);
      at += 8;
      if (at + n > src.length) fail('raw block cut off');
      if (out + n > dst.length) fail('stream decodes to more than its chunk');
      dst.set(src.subarray(at, at + n), out);
      at += n;
      out += n;
    } else if (magic === MAGIC_LZVN) {
      if (at + 12 > src.length) fail('block header cut off');
      const nRaw = dv.getUint32(at + 4, true);
      const nPayload = dv.getUint32(at + 8, true);
      at += 12;
      if (at + nPayload > src.length) fail('LZVN block cut off');
      if (out + nRaw > dst.length) fail('stream decodes to more than its chunk');
      const r = decodeLzvn(src, at, at + nPayload, dst, out, out + nRaw);
      if (r.at !== at + nPayload || r.out !== out + nRaw) fail('LZVN block does not match its header');
      at = r.at;
      out = r.out;
    } else if (magic === MAGIC_V1 || magic === MAGIC_V2) {
      const h = magic === MAGIC_V1 ? readV1Header(src, at) : readV2Header(src, at);
      ({ at, out } = decodeLzfseBlock(src, at, h, dst, out));
    } else {
      fail(`bad block magic 0x${magic.toString(16)}`);
    }
  }
  if (out !== dst.length) fail(`stream decodes to ${out} bytes, not ${dst.length}`);
}
