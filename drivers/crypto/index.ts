// LUKS unlocking for any container of a LUKS header: the luks format node, and
// qcow2's encrypt.format=luks (whose header lives inside the qcow2 file).
import { BadPassphraseError, CorruptImageError, UnsupportedError } from '../errors.js';
import { HDR, LUKS_MAGIC, parseLuks1Header, unlockLuks1, sectorCipherFor, type Reader } from './luks1.js';
import { unlockLuks2 } from './luks2.js';
import type { SectorCipher } from './modes.js';
import type { CipherSpec } from './spec.js';

export type { Reader as HeaderReader } from './luks1.js';
export type { SectorCipher } from './modes.js';
export { createLuks1, type Luks1CreateOptions, type Luks1Created } from './luks1.js';
export { createLuks2, type Luks2CreateOptions, type Luks2Created } from './luks2.js';

export interface UnlockedLuks {
  version: 1 | 2;
  /** Decrypts/encrypts the payload; sector numbers count from the payload's start. */
  sectorCipher: SectorCipher;
  spec: CipherSpec;
  /** Where the payload starts, in bytes from the start of the header's container. */
  payloadOffset: number;
  /** LUKS2 segments may give a fixed length; LUKS1 runs to the end. */
  payloadLength: number | undefined;
  sectorSize: number;
}

import { luksVersion } from './magic.js';

export { luksVersion };

/**
 * Read the LUKS header through `reader`, try every key slot with the passphrase, and
 * return the payload cipher. Throws BadPassphraseError when no slot opens.
 */
export async function unlockLuks(reader: Reader, passphrase: string): Promise<UnlockedLuks> {
  const name = reader.name;
  const head = new Uint8Array(Math.min(HDR.size, reader.size));
  await reader.read(0, head);
  const version = luksVersion(head);
  const pass = Buffer.from(passphrase, 'utf8');
  if (version === 1) {
    const h = parseLuks1Header(head, reader.size, name);
    const mk = await unlockLuks1(h, reader, pass);
    if (!mk) throw new BadPassphraseError(`${name}: invalid passphrase`);
    return { version, sectorCipher: sectorCipherFor(h.spec, mk, name), spec: h.spec, payloadOffset: h.payloadOffset, payloadLength: undefined, sectorSize: 512 };
  }
  if (version === 2) {
    const v = await unlockLuks2(reader, pass);
    if (!v) throw new BadPassphraseError(`${name}: invalid passphrase`);
    return { version, sectorCipher: v.sectorCipher, spec: v.spec, payloadOffset: v.payloadOffset, payloadLength: v.payloadLength, sectorSize: v.sectorSize };
  }
  if (head.length >= 8 && LUKS_MAGIC.every((m, i) => head[i] === m)) throw new UnsupportedError(`${name}: LUKS version ${(head[6]! << 8) | head[7]!} is not supported`);
  throw new CorruptImageError(`${name}: no LUKS header`);
}
