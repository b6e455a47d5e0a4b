// Twofish (Schneier et al., 1998), 128/192/256-bit keys. The key-dependent S-boxes and
// the MDS matrix are folded into four 256-entry word tables at key setup, so g() is
// four lookups and three XORs.
import type { BlockCipher } from './cipher.js';
import { Q0, Q1 } from './twofish-tables.js';

/** Multiply in GF(2^8) modulo the given polynomial. */
function gfMul(a: number, b: number, poly: number): number {
  let r = 0;
  while (b) {
    if (b & 1) r ^= a;
    a <<= 1;
    if (a & 0x100) a ^= poly;
    b >>= 1;
  }
  return r;
}

const MDS_POLY = 0x169;
const RS_POLY = 0x14d;
const MDS = [
  [0x01, 0xef, 0x5b, 0x5b],
  [0x5b, 0xef, 0xef, 0x01],
  [0xef, 0x5b, 0x01, 0xef],
  [0xef, 0x01, 0xef, 0x5b],
] as const;
const RS = [
  [0x01, 0xa4, 0x55, 0x87, 0x5a, 0x58, 0xdb, 0x9e],
  [0xa4, 0x56, 0x82, 0xf3, 0x1e, 0xc6, 0x68, 0xe5],
  [0x02, 0xa1, 0xfc, 0xc1, 0x47, 0xae, 0x3d, 0x19],
  [0xa4, 0x55, 0x87, 0x5a, 0x58, 0xdb, 0x9e, 0x03],
] as const;

/** Which q permutation each byte passes through at each stage of h (stage 0 is applied first). */
const QORDER: readonly (readonly Uint8Array[])[] = [
  // byte 0..3: [k=4 stage, k>=3 stage, stage L1, stage L0, final]
  [Q1, Q1, Q0, Q0, Q1],
  [Q0, Q1, Q1, Q0, Q0],
  [Q0, Q0, Q0, Q1, Q1],
  [Q1, Q0, Q1, Q1, Q0],
];

const byteOf = (w: number, i: number): number => (w >>> (8 * i)) & 0xff;
const rotl = (x: number, n: number): number => (x << n) | (x >>> (32 - n));
const rotr = (x: number, n: number): number => (x >>> n) | (x << (32 - n));

/** The byte path of h for input byte y at position j, with key words L (L[0] applied last). */
function hByte(y: number, j: number, L: readonly number[]): number {
  const q = QORDER[j]!;
  const k = L.length;
  if (k === 4) y = q[0]![y]! ^ byteOf(L[3]!, j);
  if (k >= 3) y = q[1]![y]! ^ byteOf(L[2]!, j);
  y = q[2]![y]! ^ byteOf(L[1]!, j);
  y = q[3]![y]! ^ byteOf(L[0]!, j);
  return q[4]![y]!;
}

/** MDS column j times byte y, as a little-endian word. */
function mdsColumn(j: number, y: number): number {
  let w = 0;
  for (let i = 0; i < 4; i++) w |= gfMul(MDS[i]![j]!, y, MDS_POLY) << (8 * i);
  return w;
}

function h(x: number, L: readonly number[]): number {
  let w = 0;
  for (let j = 0; j < 4; j++) w ^= mdsColumn(j, hByte(byteOf(x, j), j, L));
  return w;
}

export class Twofish implements BlockCipher {
  readonly blockSize = 16;
  private readonly K = new Int32Array(40);
  private readonly T: readonly [Int32Array, Int32Array, Int32Array, Int32Array];

  constructor(key: Uint8Array) {
    if (key.length !== 16 && key.length !== 24 && key.length !== 32) throw new RangeError(`twofish: bad key length ${key.length}`);
    const k = key.length / 8;
    const kv = new DataView(key.buffer, key.byteOffset, key.byteLength);
    const Me: number[] = [];
    const Mo: number[] = [];
    const S: number[] = [];
    for (let i = 0; i < k; i++) {
      Me.push(kv.getUint32(8 * i, true));
      Mo.push(kv.getUint32(8 * i + 4, true));
      let s = 0;
      for (let r = 0; r < 4; r++) {
        let v = 0;
        for (let c = 0; c < 8; c++) v ^= gfMul(RS[r]![c]!, key[8 * i + c]!, RS_POLY);
        s |= v << (8 * r);
      }
      S.unshift(s); // S = (S_{k-1}, ..., S_0)
    }
    const rho = 0x01010101;
    for (let i = 0; i < 20; i++) {
      const a = h(Math.imul(2 * i, rho), Me);
      const b = rotl(h(Math.imul(2 * i + 1, rho), Mo), 8);
      this.K[2 * i] = (a + b) | 0;
      this.K[2 * i + 1] = rotl((a + 2 * b) | 0, 9);
    }
    const T = [new Int32Array(256), new Int32Array(256), new Int32Array(256), new Int32Array(256)] as const;
    for (let j = 0; j < 4; j++) for (let y = 0; y < 256; y++) T[j]![y] = mdsColumn(j, hByte(y, j, S));
    this.T = T;
  }

  private g(x: number): number {
    const T = this.T;
    return T[0][x & 0xff]! ^ T[1][(x >>> 8) & 0xff]! ^ T[2][(x >>> 16) & 0xff]! ^ T[3][x >>> 24]!;
  }

  encrypt(src: Uint8Array, dst: Uint8Array): void {
    const sv = new DataView(src.buffer, src.byteOffset, src.byteLength);
    const dv = new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
    const K = this.K;
    for (let off = 0; off < src.length; off += 16) {
      let a = sv.getInt32(off, true) ^ K[0]!;
      let b = sv.getInt32(off + 4, true) ^ K[1]!;
      let c = sv.getInt32(off + 8, true) ^ K[2]!;
      let d = sv.getInt32(off + 12, true) ^ K[3]!;
      for (let r = 0; r < 16; r += 2) {
        let t0 = this.g(a);
        let t1 = this.g(rotl(b, 8));
        c = rotr(c ^ ((t0 + t1 + K[2 * r + 8]!) | 0), 1);
        d = rotl(d, 1) ^ ((t0 + 2 * t1 + K[2 * r + 9]!) | 0);
        t0 = this.g(c);
        t1 = this.g(rotl(d, 8));
        a = rotr(a ^ ((t0 + t1 + K[2 * r + 10]!) | 0), 1);
        b = rotl(b, 1) ^ ((t0 + 2 * t1 + K[2 * r + 11]!) | 0);
      }
      dv.setInt32(off, c ^ K[4]!, true);
      dv.setInt32(off + 4, d ^ K[5]!, true);
      dv.setInt32(off + 8, a ^ K[6]!, true);
      dv.setInt32(off + 12, b ^ K[7]!, true);
    }
  }

  decrypt(src: Uint8Array, dst: Uint8Array): void {
    const sv = new DataView(src.buffer, src.byteOffset, src.byteLength);
    const dv = new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
    const K = this.K;
    for (let off = 0; off < src.length; off += 16) {
      let c = sv.getInt32(off, true) ^ K[4]!;
      let d = sv.getInt32(off + 4, true) ^ K[5]!;
      let a = sv.getInt32(off + 8, true) ^ K[6]!;
      let b = sv.getInt32(off + 12, true) ^ K[7]!;
      for (let r = 14; r >= 0; r -= 2) {
        let t0 = this.g(c);
        let t1 = this.g(rotl(d, 8));
        a = rotl(a, 1) ^ ((t0 + t1 + K[2 * r + 10]!) | 0);
        b = rotr(b ^ ((t0 + 2 * t1 + K[2 * r + 11]!) | 0), 1);
        t0 = this.g(a);
        t1 = this.g(rotl(b, 8));
        c = rotl(c, 1) ^ ((t0 + t1 + K[2 * r + 8]!) | 0);
        d = rotr(d ^ ((t0 + 2 * t1 + K[2 * r + 9]!) | 0), 1);
      }
      dv.setInt32(off, a ^ K[0]!, true);
      dv.setInt32(off + 4, b ^ K[1]!, true);
      dv.setInt32(off + 8, c ^ K[2]!, true);
      dv.setInt32(off + 12, d ^ K[3]!, true);
    }
  }
}
