// Block ciphers behind one interface, so the modes (modes.ts) are written once. AES
// (and the other ciphers OpenSSL has) run natively (evp.ts); Serpent, Twofish and CAST5, which
// Node's OpenSSL lacks, are implemented here.
import crypto from 'node:crypto';
import { Serpent } from './serpent.js';
import { Twofish } from './twofish.js';
import { Cast5 } from './cast5.js';
import { evpEcb } from './evp.js';

export interface BlockCipher {
  /** Bytes per block: 16, or 8 for CAST5. */
  readonly blockSize: number;
  /** ECB over whole blocks; src.length is a multiple of blockSize; dst may be src. */
  encrypt(src: Uint8Array, dst: Uint8Array): void;
  decrypt(src: Uint8Array, dst: Uint8Array): void;
}

/**
 * ECB through OpenSSL: in place through EVP where it runs here (evp.ts), else through
 * Node's Cipher.update() in pieces of UPDATE_PIECE bytes. One context per direction
 * serves every call: ECB keeps no state.
 */
function nativeEcb(algorithm: string, key: Uint8Array): BlockCipher {
  return evpEcb(algorithm, key) ?? new NodeEcb(algorithm, key);
}

/**
 * update() returns a new buffer: of 1 MiB it is a fresh mapping the CPU faults in page by
 * page (AES-256 1.5 GB/s here); pieces of 64 KiB come from the allocator's free lists
 * (4.1 GB/s; 32 KiB 3.6, 128 KiB 2.9-4.4, 256 KiB 2.6).
 */
const UPDATE_PIECE = 64 * 1024;

class NodeEcb implements BlockCipher {
  readonly blockSize = 16;
  private readonly enc: crypto.Cipher;
  private readonly dec: crypto.Decipher;
  constructor(algorithm: string, key: Uint8Array) {
    this.enc = crypto.createCipheriv(algorithm, key, null).setAutoPadding(false);
    this.dec = crypto.createDecipheriv(algorithm, key, null).setAutoPadding(false);
  }
  encrypt(src: Uint8Array, dst: Uint8Array): void {
    run(this.enc, src, dst);
  }
  decrypt(src: Uint8Array, dst: Uint8Array): void {
    run(this.dec, src, dst);
  }
}

function run(c: crypto.Cipher | crypto.Decipher, src: Uint8Array, dst: Uint8Array): void {
  if (src.length <= UPDATE_PIECE) return dst.set(c.update(src));
  // Every piece is read before it is written over: dst may be src, not a part of it ahead.
  for (let at = 0; at < src.length; at += UPDATE_PIECE) dst.set(c.update(src.subarray(at, at + UPDATE_PIECE)), at);
}

/** Cipher families by the name LUKS headers use, with the key sizes each takes. */
export const CIPHER_FAMILIES: Readonly<Record<string, { keySizes: readonly number[]; make: (key: Uint8Array) => BlockCipher }>> = {
  aes: { keySizes: [16, 24, 32], make: (k) => nativeEcb(`aes-${k.length * 8}-ecb`, k) },
  serpent: { keySizes: [16, 24, 32], make: (k) => new Serpent(k) },
  twofish: { keySizes: [16, 24, 32], make: (k) => new Twofish(k) },
  cast5: { keySizes: [16], make: (k) => new Cast5(k) },
  // Not in QEMU, but cryptsetup makes them and OpenSSL has them.
  camellia: { keySizes: [16, 24, 32], make: (k) => nativeEcb(`camellia-${k.length * 8}-ecb`, k) },
  sm4: { keySizes: [16], make: (k) => nativeEcb('sm4-ecb', k) },
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
