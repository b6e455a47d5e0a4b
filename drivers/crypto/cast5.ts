// CAST-128 (CAST5), RFC 2144: 64-bit blocks, keys of 40..128 bits (LUKS uses 128).
import type { BlockCipher } from './cipher.js';
import { CAST_S } from './cast5-sboxes.js';

const [S1, S2, S3, S4, S5, S6, S7, S8] = CAST_S as [Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array];

const rotl = (x: number, n: number): number => (n === 0 ? x : (x << n) | (x >>> (32 - n)));

/**
 * The key schedule of RFC 2144 section 2.4, as data: each step writes four bytes of x
 * or z from the other array, or one subkey, from S5..S8 lookups of named bytes.
 * Byte names: 'x' or 'z' then a hex digit, as in the RFC.
 */
type Lookup = string; // e.g. 'zD'
interface WordStep { dst: 'x' | 'z'; word: number; src: 'x' | 'z'; srcWord: number; look: [Lookup, Lookup, Lookup, Lookup, Lookup] }
interface KeyStep { look: [Lookup, Lookup, Lookup, Lookup, Lookup] }

const W = (dst: 'x' | 'z', word: number, src: 'x' | 'z', srcWord: number, ...look: [Lookup, Lookup, Lookup, Lookup, Lookup]): WordStep => ({ dst, word, src, srcWord, look });
const K = (...look: [Lookup, Lookup, Lookup, Lookup, Lookup]): KeyStep => ({ look });

const ROUND_A = [
  W('z', 0, 'x', 0, 'xD', 'xF', 'xC', 'xE', 'x8'),
  W('z', 1, 'x', 2, 'z0', 'z2', 'z1', 'z3', 'xA'),
  W('z', 2, 'x', 3, 'z7', 'z6', 'z5', 'z4', 'x9'),
  W('z', 3, 'x', 1, 'zA', 'z9', 'zB', 'z8', 'xB'),
];
const ROUND_B = [
  W('x', 0, 'z', 2, 'z5', 'z7', 'z4', 'z6', 'z0'),
  W('x', 1, 'z', 0, 'x0', 'x2', 'x1', 'x3', 'z2'),
  W('x', 2, 'z', 1, 'x7', 'x6', 'x5', 'x4', 'z1'),
  W('x', 3, 'z', 3, 'xA', 'x9', 'xB', 'x8', 'z3'),
];
const KEYS_1 = [K('z8', 'z9', 'z7', 'z6', 'z2'), K('zA', 'zB', 'z5', 'z4', 'z6'), K('zC', 'zD', 'z3', 'z2', 'z9'), K('zE', 'zF', 'z1', 'z0', 'zC')];
const KEYS_2 = [K('x3', 'x2', 'xC', 'xD', 'x8'), K('x1', 'x0', 'xE', 'xF', 'xD'), K('x7', 'x6', 'x8', 'x9', 'x3'), K('x5', 'x4', 'xA', 'xB', 'x7')];
const KEYS_3 = [K('z3', 'z2', 'zC', 'zD', 'z9'), K('z1', 'z0', 'zE', 'zF', 'zC'), K('z7', 'z6', 'z8', 'z9', 'z2'), K('z5', 'z4', 'zA', 'zB', 'z6')];
const KEYS_4 = [K('x8', 'x9', 'x7', 'x6', 'x3'), K('xA', 'xB', 'x5', 'x4', 'x7'), K('xC', 'xD', 'x3', 'x2', 'x8'), K('xE', 'xF', 'x1', 'x0', 'xD')];
const SCHEDULE: readonly (readonly (WordStep | KeyStep)[])[] = [ROUND_A, KEYS_1, ROUND_B, KEYS_2, ROUND_A, KEYS_3, ROUND_B, KEYS_4];

function schedule(key16: Uint8Array): number[] {
  const bytes = { x: Uint8Array.from(key16), z: new Uint8Array(16) };
  const get = (name: Lookup): number => bytes[name[0] as 'x' | 'z'][parseInt(name[1]!, 16)]!;
  const out: number[] = [];
  for (let half = 0; half < 2; half++) {
    for (const group of SCHEDULE) {
      for (const step of group) {
        const l = step.look;
        if ('dst' in step) {
          const sb = bytes[step.src];
          const srcWord = ((sb[4 * step.srcWord]! << 24) | (sb[4 * step.srcWord + 1]! << 16) | (sb[4 * step.srcWord + 2]! << 8) | sb[4 * step.srcWord + 3]!) >>> 0;
          // The fifth lookup uses S5..S8 by the destination word: S7, S8, S5, S6.
          const fifth = [S7, S8, S5, S6][step.word]!;
          const v = (srcWord ^ S5[get(l[0])]! ^ S6[get(l[1])]! ^ S7[get(l[2])]! ^ S8[get(l[3])]! ^ fifth[get(l[4])]!) >>> 0;
          const db = bytes[step.dst];
          db[4 * step.word] = v >>> 24;
          db[4 * step.word + 1] = (v >>> 16) & 0xff;
          db[4 * step.word + 2] = (v >>> 8) & 0xff;
          db[4 * step.word + 3] = v & 0xff;
        } else {
          const fifth = [S5, S6, S7, S8][out.length % 4]!;
          out.push((S5[get(l[0])]! ^ S6[get(l[1])]! ^ S7[get(l[2])]! ^ S8[get(l[3])]! ^ fifth[get(l[4])]!) >>> 0);
        }
      }
    }
  }
  return out;
}

export class Cast5 implements BlockCipher {
  readonly blockSize = 8;
  private readonly km = new Uint32Array(16);
  private readonly kr = new Uint8Array(16);
  private readonly rounds: number;

  constructor(key: Uint8Array) {
    if (key.length < 5 || key.length > 16) throw new RangeError(`cast5: bad key length ${key.length}`);
    const padded = new Uint8Array(16);
    padded.set(key);
    this.rounds = key.length <= 10 ? 12 : 16;
    const k = schedule(padded);
    for (let i = 0; i < 16; i++) {
      this.km[i] = k[i]!;
      this.kr[i] = k[16 + i]! & 31;
    }
  }

  private f(i: number, d: number): number {
    const km = this.km[i]!;
    const kr = this.kr[i]!;
    let I: number;
    switch (i % 3) {
      case 0:
        I = rotl((km + d) | 0, kr);
        return ((((S1[I >>> 24]! ^ S2[(I >>> 16) & 0xff]!) - S3[(I >>> 8) & 0xff]!) | 0) + S4[I & 0xff]!) | 0;
      case 1:
        I = rotl(km ^ d, kr);
        return (((S1[I >>> 24]! - S2[(I >>> 16) & 0xff]! + S3[(I >>> 8) & 0xff]!) | 0) ^ S4[I & 0xff]!) | 0;
      default:
        I = rotl((km - d) | 0, kr);
        return (((S1[I >>> 24]! + S2[(I >>> 16) & 0xff]!) ^ S3[(I >>> 8) & 0xff]!) - S4[I & 0xff]!) | 0;
    }
  }

  encrypt(src: Uint8Array, dst: Uint8Array): void {
    const sv = new DataView(src.buffer, src.byteOffset, src.byteLength);
    const dv = new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
    for (let off = 0; off < src.length; off += 8) {
      let l = sv.getInt32(off, false);
      let r = sv.getInt32(off + 4, false);
      for (let i = 0; i < this.rounds; i++) {
        const t = r;
        r = l ^ this.f(i, r);
        l = t;
      }
      dv.setInt32(off, r, false);
      dv.setInt32(off + 4, l, false);
    }
  }

  decrypt(src: Uint8Array, dst: Uint8Array): void {
    const sv = new DataView(src.buffer, src.byteOffset, src.byteLength);
    const dv = new DataView(dst.buffer, dst.byteOffset, dst.byteLength);
    for (let off = 0; off < src.length; off += 8) {
      let l = sv.getInt32(off, false);
      let r = sv.getInt32(off + 4, false);
      for (let i = this.rounds - 1; i >= 0; i--) {
        const t = r;
        r = l ^ this.f(i, r);
        l = t;
      }
      dv.setInt32(off, r, false);
      dv.setInt32(off + 4, l, false);
    }
  }
}
