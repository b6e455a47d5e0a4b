// qcow's legacy encryption (QEMU's crypto/block-qcow.c): AES-128-CBC per 512-byte
// sector, the key the passphrase's first 16 bytes zero-padded, the IV "plain64" (the
// guest sector number, little-endian, zero-padded to 16 bytes): the same cipher as
// qcow2's method 1 (drivers/crypto/modes.ts legacyAesCipher). Flawed by design; kept
// for reading and writing old images.
import { legacyAesCipher, type SectorCipher } from '../../crypto/modes.js';

export const SECTOR = 512;

export class QcowCipher {
  private readonly cipher: SectorCipher;

  constructor(passphrase: string) {
    this.cipher = legacyAesCipher(passphrase);
  }

  /** Decrypt whole sectors in place; guestOffset is where buf starts on the guest disk. */
  decrypt(buf: Uint8Array, guestOffset: number): void {
    this.cipher.decrypt(buf, guestOffset / SECTOR);
  }

  /** Encrypted copy of whole sectors. */
  encrypt(buf: Uint8Array, guestOffset: number): Buffer {
    const out = Buffer.from(buf);
    this.cipher.encrypt(out, guestOffset / SECTOR);
    return out;
  }
}
