// Block ciphers behind one interface, so the modes (modes.ts) are written once. AES
// (and the other ciphers OpenSSL has) run natively; Serpent, Twofish and CAST5, which
// Node's OpenSSL lacks, are implemented here.
import crypto from 'node:crypto';
import { Serpent } from './serpent.js';
import { Twofish } from './twofish.js';
import { Cast5 } from './cast5.js';

export interface BlockCipher {
  /** Bytes per block: 16, or 8 for CAST5. */
  readonly blockSize: number;
  /** ECB over whole blocks; src.length is a multiple of blockSize; dst may be src. */
  encrypt(src: Uint8Array, dst: Uint8Array): void;
  decrypt(src: Uint8Array, dst: Uint8Array): void;
}

/** ECB through OpenSSL. One context per direction serves every call: ECB keeps no state. */
class NativeEcb implements BlockCipher {
  readonly blockSize = 16;
  private readonly enc: crypto.Cipher;
  private readonly dec: crypto.Decipher;
  constructor(algorithm: string, key: Uint8Array) {
    this.enc = crypto.createCipheriv(algorithm, key, null).setAutoPadding(false);
    this.dec = crypto.createDecipheriv(algorithm, key, null).setAutoPadding(false);
  }
  encrypt(src: Uint8Array, dst: Uint8Array): void {
    dst.set(this.enc.update(src));
  }
  decrypt(src: Uint8Array, dst: Uint8Array): void {
    dst.set(this.dec.update(src));
  }
}

/** Cipher families by the name LUKS headers use, with the key sizes each takes. */
export const CIPHER_FAMILIES: Readonly<Record<string, { keySizes: readonly number[]; make: (key: Uint8Array) => BlockCipher }>> = {
  aes: { keySizes: [16, 24, 32], make: (k) => new NativeEcb(`aes-${k.length * 8}-ecb`, k) },
  serpent: { keySizes: [16, 24, 32], make: (k) => new Serpent(k) },
  twofish: { keySizes: [16, 24, 32], make: (k) => new Twofish(k) },
  cast5: { keySizes: [16], make: (k) => new Cast5(k) },
  // Not in QEMU, but cryptsetup makes them and OpenSSL has them.
  camellia: { keySizes: [16, 24, 32], make: (k) => new NativeEcb(`camellia-${k.length * 8}-ecb`, k) },
  sm4: { keySizes: [16], make: (k) => new NativeEcb('sm4-ecb', k) },
};

export function isCipherFamily(name: string): boolean {
  return Object.prototype.hasOwnProperty.call(CIPHER_FAMILIES, name);
}

/** A block cipher by LUKS family name and key; throws RangeError for an unknown one. */
export function makeBlockCipher(family: string, key: Uint8Array): BlockCipher {
  const f = isCipherFamily(family) ? CIPHER_FAMILIES[family] : undefined;
  if (!f || !f.keySizes.includes(key.length)) throw new RangeError(`cipher ${family} with a ${key.length * 8}-bit key is not supported`);
  return f.make(key);
}
