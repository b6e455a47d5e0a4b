// LUKS1 headers (LUKS On-Disk Format Specification 1.2.3; QEMU crypto/block-luks.c):
// parse, unlock a key slot, and create the header QEMU's `qemu-img create -f luks` makes.
import crypto from 'node:crypto';
import { CorruptImageError, UnsupportedError } from '../errors.js';
import { afMerge, afSplit, checkPbkdf2Iterations, KDF_LIMITS, KdfBudget, pbkdf2, pbkdf2Cost, pbkdf2IterationsPerSecond } from './kdf.js';
import { isHash } from './hash.js';
import { makeSectorCipher, type SectorCipher } from './modes.js';
import { parseModeSpec, type CipherSpec } from './spec.js';
import { essivKeyLength } from './ivgen.js';

import { LUKS_MAGIC } from './magic.js';

export { LUKS_MAGIC };
export const SECTOR = 512;

/** The phdr, big-endian throughout (spec section 2.4, table 1). */
export const HDR = {
  magic: 0, // 6 bytes
  version: 6, // u16
  cipherName: 8, // 32
  cipherMode: 40, // 32
  hashSpec: 72, // 32
  payloadOffset: 104, // u32, sectors
  keyBytes: 108, // u32
  mkDigest: 112, // 20
  mkDigestSalt: 132, // 32
  mkDigestIter: 164, // u32
  uuid: 168, // 40
  keySlots: 208, // 8 x 48
  size: 592,
} as const;
/** One key slot (table 2). */
const SLOT = { active: 0, iterations: 4, salt: 8, keyMaterialOffset: 40, stripes: 44, size: 48 } as const;

export const SLOT_ENABLED = 0x00ac71f3;
export const SLOT_DISABLED = 0x0000dead;
const NUM_SLOTS = 8;
const DIGEST_LEN = 20;
const SALT_LEN = 32;
const STRIPES = 4000;
/** QEMU's key slot alignment: 4096 bytes. */
const ALIGN_SECTORS = 4096 / SECTOR;
/** Caps on what a header may ask for: a corrupt one must not allocate or spin forever. */
export const MAX_KEY_BYTES = 256;
/** What we create stays within what we open (kdf.ts's bounds). */
export const MAX_ITERATIONS = KDF_LIMITS.pbkdf2Iterations;
const MAX_MATERIAL = 16 << 20;

export interface Luks1Slot {
  index: number;
  active: boolean;
  iterations: number;
  salt: Uint8Array;
  /** Bytes. */
  keyMaterialOffset: number;
  stripes: number;
}

export interface Luks1Header {
  spec: CipherSpec;
  cipherName: string;
  cipherMode: string;
  hash: string;
  /** Bytes. */
  payloadOffset: number;
  keyBytes: number;
  mkDigest: Uint8Array;
  mkDigestSalt: Uint8Array;
  mkDigestIter: number;
  uuid: string;
  slots: Luks1Slot[];
}

function cString(b: Uint8Array, off: number, len: number): string {
  const s = b.subarray(off, off + len);
  const end = s.indexOf(0);
  return Buffer.from(s.subarray(0, end < 0 ? len : end)).toString('latin1');
}

/** The cipher family and per-cipher key length a header's key size means. */
function familyKeyBytes(spec: CipherSpec, keyBytes: number): number {
  return spec.mode === 'xts' ? keyBytes / 2 : keyBytes;
}

/** qemu-img info's format-specific data of a LUKS1 header (qcrypto_block_luks_get_info). */
export function describeLuks1(h: Luks1Header): Record<string, unknown> {
  const familyBytes = familyKeyBytes(h.spec, h.keyBytes);
  const data: Record<string, unknown> = { 'ivgen-alg': h.spec.ivgen };
  if (h.spec.ivHash !== undefined) data['ivgen-hash-alg'] = h.spec.ivHash;
  Object.assign(data, {
    'hash-alg': h.hash,
    'cipher-alg': `${h.spec.cipher}-${familyBytes * 8}`,
    uuid: h.uuid,
    'cipher-mode': h.spec.mode,
    slots: h.slots.map((s) => (s.active ? { active: true, iters: s.iterations, 'key-offset': s.keyMaterialOffset, stripes: s.stripes } : { active: false, 'key-offset': s.keyMaterialOffset })),
    'payload-offset': h.payloadOffset,
    'master-key-iters': h.mkDigestIter,
  });
  return data;
}

/** Parse and validate a LUKS1 phdr; `size` is how many bytes the header's container holds. */
export function parseLuks1Header(b: Uint8Array, size: number, name: string): Luks1Header {
  if (b.length < HDR.size) throw new CorruptImageError(`${name}: LUKS header truncated`);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const version = dv.getUint16(HDR.version, false);
  if (version !== 1) throw new UnsupportedError(`${name}: LUKS version ${version} is not supported here`);
  const cipherName = cString(b, HDR.cipherName, 32);
  const cipherMode = cString(b, HDR.cipherMode, 32);
  const hash = cString(b, HDR.hashSpec, 32);
  const spec = parseModeSpec(cipherName, cipherMode);
  if (typeof spec === 'string') throw new UnsupportedError(`${name}: LUKS ${spec} is not supported`);
  if (!isHash(hash)) throw new UnsupportedError(`${name}: LUKS hash ${hash} is not supported`);
  const keyBytes = dv.getUint32(HDR.keyBytes, false);
  if (keyBytes === 0 || keyBytes > MAX_KEY_BYTES || (spec.mode === 'xts' && keyBytes % 2)) {
    throw new CorruptImageError(`${name}: LUKS key size ${keyBytes} bytes is invalid`);
  }
  const mkDigestIter = dv.getUint32(HDR.mkDigestIter, false);
  if (mkDigestIter === 0) throw new CorruptImageError(`${name}: LUKS master key iteration count ${mkDigestIter} is invalid`);
  checkPbkdf2Iterations(mkDigestIter, 'master key digest', name);
  const payloadOffset = dv.getUint32(HDR.payloadOffset, false) * SECTOR;
  const slots: Luks1Slot[] = [];
  for (let i = 0; i < NUM_SLOTS; i++) {
    const o = HDR.keySlots + i * SLOT.size;
    const state = dv.getUint32(o + SLOT.active, false);
    if (state !== SLOT_ENABLED && state !== SLOT_DISABLED) throw new CorruptImageError(`${name}: LUKS key slot ${i} state is corrupt`);
    const slot: Luks1Slot = {
      index: i,
      active: state === SLOT_ENABLED,
      iterations: dv.getUint32(o + SLOT.iterations, false),
      salt: Uint8Array.from(b.subarray(o + SLOT.salt, o + SLOT.salt + SALT_LEN)),
      keyMaterialOffset: dv.getUint32(o + SLOT.keyMaterialOffset, false) * SECTOR,
      stripes: dv.getUint32(o + SLOT.stripes, false),
    };
    if (slot.active) {
      const material = materialSectors(keyBytes, slot.stripes) * SECTOR;
      if (slot.iterations === 0) throw new CorruptImageError(`${name}: LUKS key slot ${i} iteration count ${slot.iterations} is invalid`);
      if (slot.stripes === 0 || keyBytes * slot.stripes > MAX_MATERIAL) throw new CorruptImageError(`${name}: LUKS key slot ${i} stripe count ${slot.stripes} is invalid`);
      if (slot.keyMaterialOffset < HDR.size || slot.keyMaterialOffset + material > size) {
        throw new CorruptImageError(`${name}: LUKS key slot ${i} key material lies outside the header`);
      }
    }
    slots.push(slot);
  }
  return {
    spec,
    cipherName,
    cipherMode,
    hash,
    payloadOffset,
    keyBytes,
    mkDigest: Uint8Array.from(b.subarray(HDR.mkDigest, HDR.mkDigest + DIGEST_LEN)),
    mkDigestSalt: Uint8Array.from(b.subarray(HDR.mkDigestSalt, HDR.mkDigestSalt + SALT_LEN)),
    mkDigestIter,
    uuid: cString(b, HDR.uuid, 40),
    slots,
  };
}

function materialSectors(keyBytes: number, stripes: number): number {
  return Math.ceil((keyBytes * stripes) / SECTOR);
}

/** A sector cipher for this header's spec and a key, or UnsupportedError. */
export function sectorCipherFor(spec: CipherSpec, key: Uint8Array, name: string, extra: { sectorSize?: number; ivStep?: number; ivOffset?: number } = {}): SectorCipher {
  try {
    return makeSectorCipher({ ...spec, key, ...extra });
  } catch (err) {
    if (err instanceof RangeError) throw new UnsupportedError(`${name}: ${err.message}`);
    throw err;
  }
}

export interface Reader {
  readonly name: string;
  readonly size: number;
  read(offset: number, dst: Uint8Array): Promise<void>;
}

/** The master key, or undefined when the passphrase opens no slot. */
export async function unlockLuks1(h: Luks1Header, reader: Reader, passphrase: Uint8Array): Promise<Uint8Array | undefined> {
  // Every active slot may be tried: each within the per-slot bound, all within the open's.
  const budget = new KdfBudget(reader.name);
  for (const slot of h.slots) {
    if (!slot.active) continue;
    checkPbkdf2Iterations(slot.iterations, `key slot ${slot.index}`, reader.name);
    budget.charge(pbkdf2Cost(slot.iterations + h.mkDigestIter));
  }
  budget.check();
  for (const slot of h.slots) {
    if (!slot.active) continue;
    const slotKey = await pbkdf2(h.hash, passphrase, slot.salt, slot.iterations, h.keyBytes);
    const material = new Uint8Array(materialSectors(h.keyBytes, slot.stripes) * SECTOR);
    await reader.read(slot.keyMaterialOffset, material);
    sectorCipherFor(h.spec, slotKey, reader.name).decrypt(material, 0);
    const mk = afMerge(h.hash, material, h.keyBytes, slot.stripes);
    const check = await pbkdf2(h.hash, mk, h.mkDigestSalt, h.mkDigestIter, DIGEST_LEN);
    if (crypto.timingSafeEqual(check, h.mkDigest)) return mk;
  }
  return undefined;
}

export interface Luks1CreateOptions {
  cipher: string;
  /** Bytes of the family's key (16, 24, 32); doubled for xts. */
  cipherKeyBytes: number;
  mode: CipherSpec['mode'];
  ivgen: CipherSpec['ivgen'];
  /** Written into the mode string when given (QEMU writes it even for plain64). */
  ivHash?: string;
  hash: string;
  iterTimeMs: number;
  passphrase: Uint8Array;
}

export interface Luks1Created {
  /** Header and slot 0's key material: write at offset 0. */
  header: Uint8Array;
  /** Bytes. */
  payloadOffset: number;
  masterKey: Uint8Array;
  spec: CipherSpec;
}

/** A new LUKS1 header laid out as QEMU 7.2 lays it out (slots 4 KiB aligned, one active). */
export async function createLuks1(o: Luks1CreateOptions, name: string): Promise<Luks1Created> {
  const spec: CipherSpec = { cipher: o.cipher, mode: o.mode, ivgen: o.ivgen, ivHash: o.ivgen === 'essiv' ? o.ivHash : undefined };
  if (o.ivgen === 'essiv') {
    try {
      essivKeyLength(o.cipher, o.ivHash!);
    } catch (err) {
      throw new UnsupportedError(`${name}: ${(err as Error).message}`);
    }
  }
  const keyBytes = o.mode === 'xts' ? 2 * o.cipherKeyBytes : o.cipherKeyBytes;
  const masterKey = crypto.randomBytes(keyBytes);
  // Fails early (UnsupportedError) for combinations such as cast5-xts.
  sectorCipherFor(spec, masterKey, name);
  const rate = pbkdf2IterationsPerSecond(o.hash);
  const scaled = Math.floor((rate * o.iterTimeMs) / 1000);
  const mkIter = Math.min(MAX_ITERATIONS, Math.max(1000, Math.floor(scaled / 8)));
  const slotIter = Math.min(MAX_ITERATIONS, Math.max(1000, scaled));

  const slotSectors = Math.ceil(materialSectors(keyBytes, STRIPES) / ALIGN_SECTORS) * ALIGN_SECTORS;
  const payloadSectors = ALIGN_SECTORS + slotSectors * NUM_SLOTS;
  const material0 = ALIGN_SECTORS * SECTOR;
  const header = new Uint8Array(material0 + materialSectors(keyBytes, STRIPES) * SECTOR);
  const dv = new DataView(header.buffer);
  header.set(LUKS_MAGIC, HDR.magic);
  dv.setUint16(HDR.version, 1, false);
  // QEMU always names the IV generator, and the hash whenever one was given.
  const modeString = `${o.mode}-${o.ivgen}${o.ivHash !== undefined ? `:${o.ivHash}` : ''}`;
  header.set(Buffer.from(o.cipher, 'latin1'), HDR.cipherName);
  header.set(Buffer.from(modeString, 'latin1'), HDR.cipherMode);
  header.set(Buffer.from(o.hash, 'latin1'), HDR.hashSpec);
  dv.setUint32(HDR.payloadOffset, payloadSectors, false);
  dv.setUint32(HDR.keyBytes, keyBytes, false);
  const mkSalt = crypto.randomBytes(SALT_LEN);
  header.set(await pbkdf2(o.hash, masterKey, mkSalt, mkIter, DIGEST_LEN), HDR.mkDigest);
  header.set(mkSalt, HDR.mkDigestSalt);
  dv.setUint32(HDR.mkDigestIter, mkIter, false);
  header.set(Buffer.from(crypto.randomUUID(), 'latin1'), HDR.uuid);
  const salt = crypto.randomBytes(SALT_LEN);
  for (let i = 0; i < NUM_SLOTS; i++) {
    const o2 = HDR.keySlots + i * SLOT.size;
    dv.setUint32(o2 + SLOT.active, i === 0 ? SLOT_ENABLED : SLOT_DISABLED, false);
    if (i === 0) {
      dv.setUint32(o2 + SLOT.iterations, slotIter, false);
      header.set(salt, o2 + SLOT.salt);
    }
    dv.setUint32(o2 + SLOT.keyMaterialOffset, ALIGN_SECTORS + slotSectors * i, false);
    dv.setUint32(o2 + SLOT.stripes, STRIPES, false);
  }
  const slotKey = await pbkdf2(o.hash, o.passphrase, salt, slotIter, keyBytes);
  const split = afSplit(o.hash, masterKey, STRIPES);
  const area = header.subarray(material0);
  area.set(split);
  // A split key that ends inside a sector is encrypted padded to the sector, as cryptsetup does.
  sectorCipherFor(spec, slotKey, name).encrypt(area, 0);
  return { header, payloadOffset: payloadSectors * SECTOR, masterKey, spec };
}
