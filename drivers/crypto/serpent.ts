// Serpent (Anderson, Biham, Knudsen), in the byte order of Linux and nettle, which is
// what dm-crypt and QEMU use: block and key are read as little-endian 32-bit words.
// The S-boxes are evaluated bitsliced from their algebraic normal form, so each one is
// a handful of AND/XOR over whole words rather than 32 table lookups.
import type { BlockCipher } from './cipher.js';

const SBOX: readonly (readonly number[])[] = [
  [3, 8, 15, 1, 10, 6, 5, 11, 14, 13, 4, 2, 7, 0, 9, 12],
  [15, 12, 2, 7, 9, 0, 5, 10, 1, 11, 14, 8, 6, 13, 3, 4],
  [8, 6, 7, 9, 3, 12, 10, 15, 13, 1, 14, 4, 0, 11, 5, 2],
  [0, 15, 11, 8, 12, 9, 6, 3, 13, 1, 2, 4, 10, 7, 5, 14],
  [1, 15, 8, 3, 12, 0, 11, 6, 2, 5, 4, 10, 9, 14, 7, 13],
  [15, 5, 2, 11, 4, 10, 9, 12, 0, 3, 14, 8, 13, 6, 7, 1],
  [7, 2, 12, 5, 8, 4, 6, 11, 14, 9, 1, 15, 13, 3, 10, 0],
  [1, 13, 15, 0, 14, 8, 2, 11, 7, 4, 12, 10, 9, 3, 5, 6],
];

/** For each output bit, the monomials (as 4-bit masks of input words) whose XOR gives it. */
type Anf = readonly [readonly number[], readonly number[], readonly number[], readonly number[]];

function anfOf(box: readonly number[]): Anf {
  const out: number[][] = [];
  for (let bit = 0; bit < 4; bit++) {
    // Möbius transform of the truth table of this output bit.
    const f = box.map((v) => (v >> bit) & 1);
    for (let i = 0; i < 4; i++) for (let x = 0; x < 16; x++) if (x & (1 << i)) f[x]! ^= f[x ^ (1 << i)]!;
    out.push(f.flatMap((c, mask) => (c ? [mask] : [])));
  }
  return out as unknown as Anf;
}

function inverse(box: readonly number[]): number[] {
  const inv = new Array<number>(16);
  box.forEach((v, i) => (inv[v] = i));
  return inv;
}

const FWD: readonly Anf[] = SBOX.map(anfOf);
const INV: readonly Anf[] = SBOX.map((b) => anfOf(inverse(b)));
const PHI = 0x9e3779b9;

const rotl = (x: number, n: number): number => (x << n) | (x >>> (32 - n));
const rotr = (x: number, n: number): number => (x >>> n) | (x << (32 - n));

export class Serpent implements BlockCipher {
  readonly blockSize = 16;
  /** 33 round keys of 4 words. */
  private readonly k = new Int32Array(132);
  private readonly m = new Int32Array(16);
  private readonly x = new Int32Array(4);

  constructor(key: Uint8Array) {
    if (key.length !== 16 && key.length !== 24 && key.length !== 32) throw new RangeError(`serpent: bad key length ${key.length}`);
    const padded = new Uint8Array(32);
    padded.set(key);
    if (key.length < 32) padded[key.length] = 1;
    const kv = new DataView(padded.buffer);
    const w = new Int32Array(140);
    for (let i = 0; i < 8; i++) w[i] = kv.getInt32(i * 4, true);
    for (let i = 8; i < 140; i++) w[i] = rotl(w[i - 8]! ^ w[i - 5]! ^ w[i - 3]! ^ w[i - 1]! ^ PHI ^ (i - 8), 11);
    for (let i = 0; i < 33; i++) {
      const x = this.x;
      x.set(w.subarray(8 + 4 * i, 12 + 4 * i));
      this.sbox(FWD[(35 - i) % 8]!);
      this.k.set(x, 4 * i);
    }
  }

  /** x := S(x), bitsliced: x[0] holds bit 0 of every nibble. */
  private sbox(anf: Anf): void {
    const m = this.m;
    const x = this.x;
    const a = x[0]!, b = x[1]!, c = x[2]!, d = x[3]!;
    m[0] = -1; m[1] = a; m[2] = b; m[3] = a & b;
    m[4] = c; m[5] = a & c; m[6] = b & c; m[7] = a & b & c;
    m[8] = d; m[9] = a & d; m[10] = b & d; m[11] = m[3]! & d;
    m[12] = c & d; m[13] = m[5]! & d; m[14] = m[6]! & d; m[15] = m[7]! & d;
    for (let bit = 0; bit < 4; bit++) {
      const terms = anf[bit as 0 | 1 | 2 | 3];
      let y = 0;
      for (let t = 0; t < terms.length; t++) y ^= m[terms[t]!]!;
      x[bit] = y;
    }
  }

  encrypt(src: Uint8Array, dst: Uint8Array): void {
    const sv = new DataView(src.buffer, src.byteOffset, src.byteLength);
    const dv = new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
    const x = this.x;
    const k = this.k;
    for (let off = 0; off < src.length; off += 16) {
      for (let i = 0; i < 4; i++) x[i] = sv.getInt32(off + 4 * i, true);
      for (let r = 0; r < 32; r++) {
        for (let i = 0; i < 4; i++) x[i]! ^= k[4 * r + i]!;
        this.sbox(FWD[r % 8]!);
        if (r < 31) {
          let a = x[0]!, b = x[1]!, c = x[2]!, d = x[3]!;
          a = rotl(a, 13);
          c = rotl(c, 3);
          b ^= a ^ c;
          d ^= c ^ (a << 3);
          b = rotl(b, 1);
          d = rotl(d, 7);
          a ^= b ^ d;
          c ^= d ^ (b << 7);
          x[0] = rotl(a, 5); x[1] = b; x[2] = rotl(c, 22); x[3] = d;
        } else {
          for (let i = 0; i < 4; i++) x[i]! ^= k[128 + i]!;
        }
      }
      for (let i = 0; i < 4; i++) dv.setInt32(off + 4 * i, x[i]!, true);
    }
  }

  decrypt(src: Uint8Array, dst: Uint8Array): void {
    const sv = new DataView(src.buffer, src.byteOffset, src.byteLength);
    const dv = new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
    const x = this.x;
    const k = this.k;
    for (let off = 0; off < src.length; off += 16) {
      for (let i = 0; i < 4; i++) x[i] = sv.getInt32(off + 4 * i, true) ^ k[128 + i]!;
      for (let r = 31; r >= 0; r--) {
        if (r < 31) {
          let a = x[0]!, b = x[1]!, c = x[2]!, d = x[3]!;
          a = rotr(a, 5);
          c = rotr(c, 22);
          a ^= b ^ d;
          c ^= d ^ (b << 7);
          b = rotr(b, 1);
          d = rotr(d, 7);
          b ^= a ^ c;
          d ^= c ^ (a << 3);
          x[0] = rotr(a, 13); x[1] = b; x[2] = rotr(c, 3); x[3] = d;
        }
        this.sbox(INV[r % 8]!);
        for (let i = 0; i < 4; i++) x[i]! ^= k[4 * r + i]!;
      }
      for (let i = 0; i < 4; i++) dv.setInt32(off + 4 * i, x[i]!, true);
    }
  }
}
