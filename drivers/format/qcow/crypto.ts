// qcow's legacy encryption (QEMU's crypto/block-qcow.c): AES-128-CBC per 512-byte
// sector, the key the passphrase's first 16 bytes zero-padded, the IV "plain64" (the
// guest sector number, little-endian, zero-padded to 16 bytes). Flawed by design;
// kept for reading and writing old images.
import crypto from 'node:crypto';

export const SECTOR = 512;
const BLOCK = 16;

export class QcowCipher {
  private readonly key: Buffer;

  constructor(passphrase: string) {
    this.key = Buffer.alloc(16);
    Buffer.from(passphrase, 'utf8').copy(this.key, 0, 0, 16);
  }

  private iv(sector: number): Buffer {
    const iv = Buffer.alloc(BLOCK);
    iv.writeBigUInt64LE(BigInt(sector));
    return iv;
  }

  /** Decrypt whole sectors in place; guestOffset is where buf starts on the guest disk. */
  decrypt(buf: Uint8Array, guestOffset: number): void {
    // One ECB pass over everything, then CBC's XOR with the previous block or the IV.
    const d = crypto.createDecipheriv('aes-128-ecb', this.key, null).setAutoPadding(false);
    const plain = Buffer.concat([d.update(buf), d.final()]);
    const first = guestOffset / SECTOR;
    for (let s = 0; s * SECTOR < buf.length; s++) {
      const base = s * SECTOR;
      const iv = this.iv(first + s);
      for (let i = 0; i < BLOCK; i++) plain[base + i]! ^= iv[i]!;
      for (let i = base + BLOCK; i < base + SECTOR; i++) plain[i]! ^= buf[i - BLOCK]!;
    }
    buf.set(plain);
  }

  /** Encrypted copy of whole sectors. */
  encrypt(buf: Uint8Array, guestOffset: number): Buffer {
    const out = Buffer.alloc(buf.length);
    const first = guestOffset / SECTOR;
    for (let s = 0; s * SECTOR < buf.length; s++) {
      const c = crypto.createCipheriv('aes-128-cbc', this.key, this.iv(first + s)).setAutoPadding(false);
      c.update(buf.subarray(s * SECTOR, (s + 1) * SECTOR)).copy(out, s * SECTOR);
      c.final();
    }
    return out;
  }
}
