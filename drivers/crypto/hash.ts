// Hash algorithms by the names LUKS headers (QEMU's and cryptsetup's) use.
import crypto from 'node:crypto';

/** LUKS/QEMU hash name -> OpenSSL's. QEMU 7.2 knows the first seven. */
const HASHES: Readonly<Record<string, { openssl: string; length: number }>> = {
  md5: { openssl: 'md5', length: 16 },
  sha1: { openssl: 'sha1', length: 20 },
  sha224: { openssl: 'sha224', length: 28 },
  sha256: { openssl: 'sha256', length: 32 },
  sha384: { openssl: 'sha384', length: 48 },
  sha512: { openssl: 'sha512', length: 64 },
  ripemd160: { openssl: 'ripemd160', length: 20 },
  // cryptsetup's further names
  'sha3-224': { openssl: 'sha3-224', length: 28 },
  'sha3-256': { openssl: 'sha3-256', length: 32 },
  'sha3-384': { openssl: 'sha3-384', length: 48 },
  'sha3-512': { openssl: 'sha3-512', length: 64 },
  'blake2b-512': { openssl: 'blake2b512', length: 64 },
  'blake2s-256': { openssl: 'blake2s256', length: 32 },
  sm3: { openssl: 'sm3', length: 32 },
};

/** The hashes `tsimg create -f luks` offers: QEMU's own list. */
export const QEMU_HASHES = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160'] as const;

export function isHash(name: string): boolean {
  return Object.prototype.hasOwnProperty.call(HASHES, name);
}

function spec(name: string): { openssl: string; length: number } {
  const h = isHash(name) ? HASHES[name] : undefined;
  if (!h) throw new RangeError(`hash ${name} is not supported`);
  return h;
}

export function hashLength(name: string): number {
  return spec(name).length;
}

export function opensslHash(name: string): string {
  return spec(name).openssl;
}

export function digest(name: string, ...parts: Uint8Array[]): Uint8Array {
  const h = crypto.createHash(spec(name).openssl);
  for (const p of parts) h.update(p);
  return h.digest();
}
