// IV generators (QEMU crypto/ivgen-*.c, dm-crypt): the IV of a sector from its number.
import { CIPHER_FAMILIES, makeBlockCipher, type BlockCipher } from './cipher.js';
import { digest, hashLength } from './hash.js';

export type IvGenName = 'plain' | 'plain64' | 'plain64be' | 'essiv' | 'null';
/** QEMU's IV generators. */
export const QEMU_IVGENS = ['plain', 'plain64', 'essiv'] as const;
export const IVGENS: readonly IvGenName[] = ['plain', 'plain64', 'plain64be', 'essiv', 'null'];

/**
 * The ESSIV cipher's key size is the hash's digest size, not the data cipher's
 * (dm-crypt's quirk, which QEMU follows: aes-128 with sha256 gives aes-256).
 */
export function essivKeyLength(cipher: string, hash: string): number {
  const len = hashLength(hash);
  const family = Object.prototype.hasOwnProperty.call(CIPHER_FAMILIES, cipher) ? CIPHER_FAMILIES[cipher] : undefined;
  if (!family?.keySizes.includes(len)) throw new RangeError(`essiv with ${hash} needs a ${len * 8}-bit ${cipher} key, which ${cipher} does not take`);
  return len;
}

export class IvGenerator {
  private readonly essiv: BlockCipher | undefined;

  constructor(private readonly kind: IvGenName, private readonly niv: number, cipher: string, key: Uint8Array, hash?: string) {
    if (niv !== 8 && niv !== 16) throw new RangeError(`no IVs of ${niv} bytes: block ciphers here have 8 or 16-byte blocks`);
    if (kind === 'essiv') {
      if (!hash) throw new RangeError('essiv needs a hash');
      essivKeyLength(cipher, hash);
      this.essiv = makeBlockCipher(cipher, digest(hash, key));
      if (this.essiv.blockSize !== niv) throw new RangeError('essiv cipher block size differs from the data cipher');
    }
  }

  /** IVs for `count` sectors numbered first, first+step, ... in one buffer of count*niv bytes. */
  generate(first: number, count: number, step: number): Uint8Array {
    const out = new Uint8Array(count * this.niv);
    this.generateInto(out, first, count, step);
    return out;
  }

  /** generate() into the first count*niv bytes of `out` (a sector cipher's module memory: no buffer of its own). */
  generateInto(out: Uint8Array, first: number, count: number, step: number): void {
    const niv = this.niv;
    out.fill(0, 0, count * niv);
    if (this.kind === 'null') return;
    if (this.kind === 'plain64' && niv === 16 && LITTLE_ENDIAN && out.byteOffset % 4 === 0 && first + count * step <= Number.MAX_SAFE_INTEGER) {
      // The usual case (LUKS's aes-xts-plain64): two little-endian words per IV, as 32-bit stores.
      const w = new Uint32Array(out.buffer, out.byteOffset, count * 4);
      for (let i = 0, n = first; i < count; i++, n += step) {
        w[i * 4] = n >>> 0;
        w[i * 4 + 1] = Math.floor(n / 2 ** 32) >>> 0;
      }
      return;
    }
    const dv = new DataView(out.buffer, out.byteOffset, count * niv);
    // Block ciphers have 8 or 16-byte blocks: plain's 4 bytes and plain64's 8 always fit.
    for (let i = 0; i < count; i++) {
      const n = first + i * step;
      const lo = n >>> 0;
      const hi = Math.floor(n / 2 ** 32) >>> 0;
      const off = i * niv;
      if (this.kind === 'plain') {
        dv.setUint32(off, lo, true);
      } else if (this.kind === 'plain64be') {
        dv.setUint32(off + niv - 8, hi, false);
        dv.setUint32(off + niv - 4, lo, false);
      } else {
        dv.setUint32(off, lo, true);
        dv.setUint32(off + 4, hi, true);
      }
    }
    if (this.essiv) {
      const ivs = out.subarray(0, count * niv);
      this.essiv.encrypt(ivs, ivs);
    }
  }
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
