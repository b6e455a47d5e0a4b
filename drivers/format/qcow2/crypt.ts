// qcow2 encryption (qcow2.txt, crypt_method and "Full disk encryption header
// pointer"; QEMU's crypto/block-qcow.c and block/qcow2.c):
// - method 1, legacy "aes": AES-128-CBC, the key is the passphrase's first 16 bytes
//   (zero-padded), IV plain64 of the guest sector (512 bytes);
// - method 2, LUKS: a LUKS1 header in clusters of the image; data sectors are
//   numbered by their host offset (crypt_physical_offset).
import type { BlockNode } from '../../types.js';
import { BadPassphraseError, CorruptImageError, UnsupportedError, UsageError } from '../../errors.js';
import type { SectorCipher } from '../../crypto/index.js';
import { CIPHER_MODES } from '../../crypto/magic.js';

export const SECTOR = 512;

export const LUKS_CREATE_OPTIONS = [
  'encrypt.key-secret',
  'encrypt.cipher-alg',
  'encrypt.cipher-mode',
  'encrypt.ivgen-alg',
  'encrypt.ivgen-hash-alg',
  'encrypt.hash-alg',
  'encrypt.iter-time',
] as const;

const CIPHER_ALGS = ['aes-128', 'aes-192', 'aes-256', 'serpent-128', 'serpent-192', 'serpent-256', 'twofish-128', 'twofish-192', 'twofish-256', 'cast5-128'] as const;

/** How data clusters are encrypted; `physical`: IV sectors count host offsets, else guest offsets. */
export interface DataCrypt {
  cipher: SectorCipher;
  physical: boolean;
}

/** The data cipher of an encrypted image, or a one-line error. */
export async function openCrypt(file: BlockNode, method: number, cryptoHeader: { offset: number; length: number } | undefined, secret: string | undefined): Promise<DataCrypt> {
  const name = file.name;
  if (secret === undefined) throw new BadPassphraseError(`${name}: the image is encrypted; give its passphrase with --secret or --secret-file`);
  if (method === 1) {
    const { legacyAesCipher } = await import('../../crypto/modes.js');
    return { cipher: legacyAesCipher(secret), physical: false };
  }
  if (method !== 2) throw new UnsupportedError(`${name}: qcow2 encryption method ${method} is not supported`);
  if (!cryptoHeader) throw new CorruptImageError(`${name}: qcow2 LUKS encryption without a crypto header extension`);
  if (cryptoHeader.offset + cryptoHeader.length > file.size) throw new CorruptImageError(`${name}: qcow2 LUKS header lies outside the file`);
  // The LUKS header as if it were a file of its own.
  const reader = {
    name,
    size: cryptoHeader.length,
    read: (offset: number, dst: Uint8Array) => file.read(cryptoHeader.offset + offset, dst),
  };
  const { unlockLuks } = await import('../../crypto/index.js');
  const v = await unlockLuks(reader, secret);
  return { cipher: v.sectorCipher, physical: true };
}

/** A LUKS1 header for encrypt.format=luks, padded to its payload offset (QEMU reserves all key slots). */
export async function createLuksHeader(opts: Map<string, string>, secret: string, spec: string): Promise<{ header: Uint8Array }> {
  // The hash and IV generator modules bring the ciphers with them: only creating an encrypted image needs them.
  const [{ QEMU_HASHES }, { QEMU_IVGENS }] = await Promise.all([import('../../crypto/hash.js'), import('../../crypto/ivgen.js')]);
  const pick = <T extends string>(key: string, allowed: readonly T[], dflt: T | undefined): T | undefined => {
    const v = opts.get(key);
    if (v === undefined) return dflt;
    if (!(allowed as readonly string[]).includes(v)) throw new UsageError(`invalid value '${v}' for ${key} (one of: ${allowed.join(', ')})`);
    return v as T;
  };
  const alg = pick('encrypt.cipher-alg', CIPHER_ALGS, 'aes-256')!;
  const mode = pick('encrypt.cipher-mode', CIPHER_MODES, 'xts')!;
  const ivgen = pick('encrypt.ivgen-alg', QEMU_IVGENS, 'plain64')!;
  let ivHash = pick('encrypt.ivgen-hash-alg', QEMU_HASHES, undefined);
  const hash = pick('encrypt.hash-alg', QEMU_HASHES, 'sha256')!;
  const iterText = opts.get('encrypt.iter-time');
  const iterTime = iterText === undefined ? 2000 : Number(iterText);
  if (!Number.isInteger(iterTime) || iterTime < 1) throw new UsageError(`invalid value '${iterText}' for encrypt.iter-time (milliseconds)`);
  if (ivgen === 'essiv' && ivHash === undefined) ivHash = 'sha256';
  const [family, bits] = alg.split('-') as [string, string];
  const { createLuks1 } = await import('../../crypto/index.js');
  const made = await createLuks1(
    { cipher: family, cipherKeyBytes: Number(bits) / 8, mode, ivgen, ivHash, hash, iterTimeMs: iterTime, passphrase: Buffer.from(secret, 'utf8') },
    spec,
  );
  const header = new Uint8Array(Math.max(made.payloadOffset, made.header.length));
  header.set(made.header);
  return { header };
}
