// Sector encryption as dm-crypt and QEMU's crypto/block.c do it: each sector is one
// message of a block-cipher mode (xts, cbc, ecb, ctr) whose IV comes from the sector
// number (ivgen.ts). Written once over the BlockCipher interface; whole runs of
// sectors go to the cipher in one call wherever the mode allows it.
import { makeBlockCipher, type BlockCipher } from './cipher.js';
import { IvGenerator, type IvGenName } from './ivgen.js';

import type { CipherMode } from './magic.js';

export { CIPHER_MODES, type CipherMode } from './magic.js';

export interface SectorCipherSpec {
  /** Cipher family as LUKS names it: aes, serpent, twofish, cast5... */
  cipher: string;
  mode: CipherMode;
  ivgen: IvGenName;
  /** The hash of essiv. */
  ivHash?: string;
  /** The whole key (both halves for xts). */
  key: Uint8Array;
  /** Bytes per encryption unit: 512 (LUKS1), or up to 4096 (LUKS2). */
  sectorSize?: number;
  /** IV sectors per encryption unit: 1, or sectorSize/512 when IVs count 512-byte sectors (LUKS2). */
  ivStep?: number;
  /** Added to every IV sector number (LUKS2 iv_tweak). */
  ivOffset?: number;
}

/** Encrypts and decrypts whole sectors in place. */
export interface SectorCipher {
  readonly sectorSize: number;
  /** data.length is a multiple of sectorSize; firstSector counts sectorSize units. */
  encrypt(data: Uint8Array, firstSector: number): void;
  decrypt(data: Uint8Array, firstSector: number): void;
}

export function makeSectorCipher(spec: SectorCipherSpec): SectorCipher {
  return new ModeCipher(spec);
}

class ModeCipher implements SectorCipher {
  readonly sectorSize: number;
  private readonly data: BlockCipher;
  private readonly tweak: BlockCipher | undefined;
  private readonly ivgen: IvGenerator | undefined;
  private readonly mode: CipherMode;
  private readonly ivStep: number;
  private readonly ivOffset: number;

  constructor(spec: SectorCipherSpec) {
    this.mode = spec.mode;
    this.sectorSize = spec.sectorSize ?? 512;
    this.ivStep = spec.ivStep ?? 1;
    this.ivOffset = spec.ivOffset ?? 0;
    if (spec.mode === 'xts') {
      const half = spec.key.length / 2;
      if (!Number.isInteger(half)) throw new RangeError('xts needs a key of two equal halves');
      this.data = makeBlockCipher(spec.cipher, spec.key.subarray(0, half));
      this.tweak = makeBlockCipher(spec.cipher, spec.key.subarray(half));
      if (this.data.blockSize !== 16) throw new RangeError(`mode xts needs a 128-bit block cipher, not ${spec.cipher}`);
    } else {
      this.data = makeBlockCipher(spec.cipher, spec.key);
    }
    if (this.sectorSize % this.data.blockSize) throw new RangeError('sector size is not a multiple of the cipher block');
    // QEMU gives ECB no IV at all (qcrypto_cipher_get_iv_len is 0 for it).
    if (spec.mode !== 'ecb') this.ivgen = new IvGenerator(spec.ivgen, this.data.blockSize, spec.cipher, spec.key, spec.ivHash);
  }

  private ivs(firstSector: number, count: number): Uint8Array {
    return this.ivgen!.generate(this.ivOffset + firstSector * this.ivStep, count, this.ivStep);
  }

  encrypt(data: Uint8Array, firstSector: number): void {
    const count = data.length / this.sectorSize;
    switch (this.mode) {
      case 'ecb':
        return this.data.encrypt(data, data);
      case 'xts':
        return this.xts(data, firstSector, count, true);
      case 'ctr':
        return this.ctr(data, firstSector, count);
      case 'cbc': {
        const bs = this.data.blockSize;
        const ivs = this.ivs(firstSector, count);
        for (let s = 0; s < count; s++) {
          let prev = ivs.subarray(s * bs, (s + 1) * bs);
          for (let off = s * this.sectorSize, end = off + this.sectorSize; off < end; off += bs) {
            const block = data.subarray(off, off + bs);
            for (let i = 0; i < bs; i++) block[i]! ^= prev[i]!;
            this.data.encrypt(block, block);
            prev = block;
          }
        }
        return undefined;
      }
    }
  }

  decrypt(data: Uint8Array, firstSector: number): void {
    const count = data.length / this.sectorSize;
    switch (this.mode) {
      case 'ecb':
        return this.data.decrypt(data, data);
      case 'xts':
        return this.xts(data, firstSector, count, false);
      case 'ctr':
        return this.ctr(data, firstSector, count);
      case 'cbc': {
        // Every block's predecessor is known up front: one cipher call for the run.
        const bs = this.data.blockSize;
        const ivs = this.ivs(firstSector, count);
        // A copy, never a view: data may be a Buffer, whose slice() shares memory.
        const cipherText = new Uint8Array(data);
        this.data.decrypt(data, data);
        for (let s = 0; s < count; s++) {
          const base = s * this.sectorSize;
          for (let i = 0; i < bs; i++) data[base + i]! ^= ivs[s * bs + i]!;
          for (let off = base + bs, end = base + this.sectorSize; off < end; off++) data[off]! ^= cipherText[off - bs]!;
        }
        return undefined;
      }
    }
  }

  /** CTR as nettle runs it: the IV is the first counter block, incremented big-endian. */
  private ctr(data: Uint8Array, firstSector: number, count: number): void {
    const bs = this.data.blockSize;
    const perSector = this.sectorSize / bs;
    const ivs = this.ivs(firstSector, count);
    const stream = new Uint8Array(data.length);
    for (let s = 0; s < count; s++) {
      const iv = ivs.subarray(s * bs, (s + 1) * bs);
      for (let b = 0; b < perSector; b++) {
        const off = (s * perSector + b) * bs;
        stream.set(iv, off);
        let carry = b;
        for (let i = bs - 1; i >= 0 && carry; i--) {
          const v = stream[off + i]! + (carry & 0xff);
          stream[off + i] = v & 0xff;
          carry = Math.floor(carry / 256) + (v >> 8);
        }
      }
    }
    this.data.encrypt(stream, stream);
    for (let i = 0; i < data.length; i++) data[i]! ^= stream[i]!;
  }

  /** XTS (IEEE 1619) without ciphertext stealing: sectors are whole blocks. */
  private xts(data: Uint8Array, firstSector: number, count: number, encrypt: boolean): void {
    const perSector = this.sectorSize / 16;
    const ivs = this.ivs(firstSector, count);
    this.tweak!.encrypt(ivs, ivs);
    const t = new Uint8Array(data.length);
    for (let s = 0; s < count; s++) {
      let off = s * this.sectorSize;
      t.set(ivs.subarray(s * 16, s * 16 + 16), off);
      for (let b = 1; b < perSector; b++, off += 16) {
        // Multiply the previous tweak by x in GF(2^128), little-endian.
        const carry = t[off + 15]! >> 7;
        for (let i = 15; i > 0; i--) t[off + 16 + i] = ((t[off + i]! << 1) | (t[off + i - 1]! >> 7)) & 0xff;
        t[off + 16] = ((t[off]! << 1) & 0xff) ^ (carry ? 0x87 : 0);
      }
    }
    for (let i = 0; i < data.length; i++) data[i]! ^= t[i]!;
    if (encrypt) this.data.encrypt(data, data);
    else this.data.decrypt(data, data);
    for (let i = 0; i < data.length; i++) data[i]! ^= t[i]!;
  }
}
