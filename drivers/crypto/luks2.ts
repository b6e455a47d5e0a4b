// LUKS2 headers (cryptsetup's "LUKS2 On-Disk Format Specification" 1.1): a binary
// header with a checksum, a JSON area describing keyslots, digests and segments, and a
// secondary copy. Read here (unlockLuks2) and made here (createLuks2, laid out as
// cryptsetup 2.6 lays out a default luksFormat); QEMU cannot open these at all.
import crypto from 'node:crypto';
import { CorruptImageError, UnsupportedError } from '../errors.js';
import { afMerge, afSplit, argon2, argon2Cost, checkArgon2, checkPbkdf2Iterations, KDF_LIMITS, KdfBudget, pbkdf2, pbkdf2Cost, pbkdf2IterationsPerSecond, type Argon2Params } from './kdf.js';
import { digest, hashLength, isHash } from './hash.js';
import { modeSpecString, parseLuks2Encryption, type CipherSpec } from './spec.js';
import { sectorCipherFor, type Reader } from './luks1.js';
import type { SectorCipher } from './modes.js';

/** Binary header fields (spec section 2.1), big-endian. */
const BIN = { magic: 0, version: 6, hdrSize: 8, seqid: 16, label: 24, checksumAlg: 72, salt: 104, uuid: 168, subsystem: 208, hdrOffset: 256, csum: 448, csumLen: 64, size: 4096 } as const;
const MAGIC_2ND = Uint8Array.from([0x53, 0x4b, 0x55, 0x4c, 0xba, 0xbe]); // "SKUL\xba\xbe"
const MAGIC_1ST = Uint8Array.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
/** The header sizes (binary + JSON) the spec allows; the secondary header sits at one of these. */
const HDR_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096].map((k) => k * 1024);
/** Field caps for parsing; the real bounds on the work are kdf.ts's KDF_LIMITS. */
const MAX_ARGON_MEMORY_KIB = 4 * 1024 * 1024;
const MAX_ARGON_TIME = 2 ** 32 - 1;
const MAX_PBKDF2_ITER = 2 ** 32 - 1;
const MAX_AREA = 64 << 20;

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

export interface Luks2Volume {
  sectorCipher: SectorCipher;
  spec: CipherSpec;
  /** Bytes. */
  payloadOffset: number;
  /** Bytes, or undefined for "dynamic" (to the end of the device). */
  payloadLength: number | undefined;
  sectorSize: number;
  uuid: string;
}

class J {
  constructor(private readonly name: string) {}
  bad(what: string): never {
    throw new CorruptImageError(`${this.name}: LUKS2 metadata: ${what}`);
  }
  obj(v: Json | undefined, what: string): { [k: string]: Json } {
    if (v === null || typeof v !== 'object' || Array.isArray(v)) this.bad(`${what} is not an object`);
    return v;
  }
  str(v: Json | undefined, what: string): string {
    if (typeof v !== 'string') this.bad(`${what} is not a string`);
    return v;
  }
  /** An integer given as a number or as a decimal string (u64 fields). */
  int(v: Json | undefined, what: string, max = Number.MAX_SAFE_INTEGER): number {
    const n = typeof v === 'number' ? v : typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : NaN;
    if (!Number.isSafeInteger(n) || n < 0 || n > max) this.bad(`${what} is not a valid number`);
    return n;
  }
  b64(v: Json | undefined, what: string): Uint8Array {
    return Buffer.from(this.str(v, what), 'base64');
  }
}

interface BinHeader {
  seqid: bigint;
  hdrSize: number;
  json: string;
  uuid: string;
}

async function readBinHeader(reader: Reader, offset: number, magic: Uint8Array): Promise<BinHeader | undefined> {
  if (offset + BIN.size > reader.size) return undefined;
  const first = new Uint8Array(BIN.size);
  await reader.read(offset, first);
  if (!magic.every((m, i) => first[i] === m)) return undefined;
  const dv = new DataView(first.buffer);
  if (dv.getUint16(BIN.version, false) !== 2) return undefined;
  const hdrSizeBig = dv.getBigUint64(BIN.hdrSize, false);
  const hdrSize = Number(hdrSizeBig);
  if (!HDR_SIZES.includes(hdrSize) || offset + hdrSize > reader.size) return undefined;
  const all = new Uint8Array(hdrSize);
  all.set(first);
  await reader.read(offset + BIN.size, all.subarray(BIN.size));
  const alg = Buffer.from(first.subarray(BIN.checksumAlg, BIN.checksumAlg + 32)).toString('latin1').replace(/\0.*$/s, '');
  if (!isHash(alg)) return undefined;
  const stored = Uint8Array.from(first.subarray(BIN.csum, BIN.csum + BIN.csumLen));
  all.fill(0, BIN.csum, BIN.csum + BIN.csumLen);
  const sum = digest(alg, all);
  if (!crypto.timingSafeEqual(sum, stored.subarray(0, sum.length))) return undefined;
  const jsonArea = all.subarray(BIN.size);
  const end = jsonArea.indexOf(0);
  return {
    seqid: dv.getBigUint64(BIN.seqid, false),
    hdrSize,
    json: Buffer.from(jsonArea.subarray(0, end < 0 ? jsonArea.length : end)).toString('utf8'),
    uuid: Buffer.from(first.subarray(168, 208)).toString('latin1').replace(/\0.*$/s, ''),
  };
}

/** The valid header copy with the highest sequence id. */
async function readHeader(reader: Reader): Promise<BinHeader> {
  const primary = await readBinHeader(reader, 0, MAGIC_1ST);
  const candidates = primary ? [primary] : [];
  for (const off of primary ? [primary.hdrSize] : HDR_SIZES) {
    const second = await readBinHeader(reader, off, MAGIC_2ND);
    if (second) {
      candidates.push(second);
      break;
    }
  }
  if (!candidates.length) throw new CorruptImageError(`${reader.name}: LUKS2 header checksum mismatch in both copies`);
  return candidates.reduce((a, b) => (b.seqid > a.seqid ? b : a));
}

/** Unlock a LUKS2 volume; undefined when the passphrase opens no keyslot. */
export async function unlockLuks2(reader: Reader, passphrase: Uint8Array): Promise<Luks2Volume | undefined> {
  const name = reader.name;
  const j = new J(name);
  const bin = await readHeader(reader);
  let meta: Json;
  try {
    meta = JSON.parse(bin.json) as Json;
  } catch {
    return j.bad('the JSON area does not parse');
  }
  const root = j.obj(meta, 'the JSON area');
  const config = j.obj(root.config ?? {}, 'config');
  if (config.requirements !== undefined) {
    const req = j.obj(config.requirements, 'config.requirements');
    const mandatory = req.mandatory;
    if (Array.isArray(mandatory) && mandatory.length) throw new UnsupportedError(`${name}: LUKS2 requirement ${JSON.stringify(mandatory)} is not supported`);
  }
  const keyslots = j.obj(root.keyslots, 'keyslots');
  const digests = j.obj(root.digests, 'digests');
  const segments = j.obj(root.segments, 'segments');

  // High-priority slots first, then normal; priority 0 slots are only used when named.
  const order = Object.entries(keyslots)
    .map(([id, v]) => ({ id, ks: j.obj(v, `keyslot ${id}`) }))
    .map((s) => ({ ...s, prio: s.ks.priority === undefined ? 1 : j.int(s.ks.priority, `keyslot ${s.id} priority`, 2) }))
    .filter((s) => s.prio > 0)
    .sort((a, b) => b.prio - a.prio || Number(a.id) - Number(b.id));

  // Every slot's parameters are checked, and their work summed, before any derivation:
  // a passphrase may be tried against all of them.
  const budget = new KdfBudget(name);
  const attempts: (() => Promise<Luks2Volume | undefined>)[] = [];
  for (const { id, ks } of order) {
    const type = j.str(ks.type, `keyslot ${id} type`);
    if (type !== 'luks2') continue;
    const keySize = j.int(ks.key_size, `keyslot ${id} key_size`, 512);
    const area = j.obj(ks.area, `keyslot ${id} area`);
    if (j.str(area.type, `keyslot ${id} area type`) !== 'raw') continue;
    const areaSpec = parseLuks2Encryption(j.str(area.encryption, `keyslot ${id} encryption`));
    if (typeof areaSpec === 'string') throw new UnsupportedError(`${name}: LUKS2 keyslot ${id} ${areaSpec} is not supported`);
    const areaKeySize = j.int(area.key_size, `keyslot ${id} area key_size`, 512);
    const areaOffset = j.int(area.offset, `keyslot ${id} area offset`);
    const areaSize = j.int(area.size, `keyslot ${id} area size`, MAX_AREA);
    const af = j.obj(ks.af, `keyslot ${id} af`);
    if (j.str(af.type, `keyslot ${id} af type`) !== 'luks1') throw new UnsupportedError(`${name}: LUKS2 keyslot ${id} anti-forensic type is not supported`);
    const stripes = j.int(af.stripes, `keyslot ${id} stripes`, 65536);
    const afHash = j.str(af.hash, `keyslot ${id} af hash`);
    if (!isHash(afHash)) throw new UnsupportedError(`${name}: LUKS2 hash ${afHash} is not supported`);
    const materialLen = Math.ceil((keySize * stripes) / 512) * 512;
    if (stripes === 0 || keySize === 0 || materialLen > areaSize || areaOffset + areaSize > reader.size) j.bad(`keyslot ${id} key material lies outside the device`);

    const kdf = j.obj(ks.kdf, `keyslot ${id} kdf`);
    const kdfType = j.str(kdf.type, `keyslot ${id} kdf type`);
    const salt = j.b64(kdf.salt, `keyslot ${id} salt`);
    // The digests this slot's key is checked against cost a PBKDF2 run each.
    let digestCost = 0;
    for (const [did, dv] of Object.entries(digests)) {
      const d = j.obj(dv, `digest ${did}`);
      if (!(Array.isArray(d.keyslots) && d.keyslots.includes(id)) || d.type !== 'pbkdf2') continue;
      const iterations = j.int(d.iterations, `digest ${did} iterations`, MAX_PBKDF2_ITER);
      checkPbkdf2Iterations(iterations, `digest ${did}`, name);
      digestCost += pbkdf2Cost(iterations);
    }
    let derive: () => Promise<Uint8Array>;
    if (kdfType === 'pbkdf2') {
      const hash = j.str(kdf.hash, `keyslot ${id} kdf hash`);
      if (!isHash(hash)) throw new UnsupportedError(`${name}: LUKS2 hash ${hash} is not supported`);
      const iterations = j.int(kdf.iterations, `keyslot ${id} iterations`, MAX_PBKDF2_ITER);
      checkPbkdf2Iterations(iterations, `keyslot ${id}`, name);
      budget.charge(pbkdf2Cost(iterations) + digestCost);
      derive = () => pbkdf2(hash, passphrase, salt, iterations, areaKeySize);
    } else if (kdfType === 'argon2i' || kdfType === 'argon2id') {
      const p: Argon2Params = {
        type: kdfType,
        time: j.int(kdf.time, `keyslot ${id} time`, MAX_ARGON_TIME),
        memory: j.int(kdf.memory, `keyslot ${id} memory`, MAX_ARGON_MEMORY_KIB),
        cpus: j.int(kdf.cpus, `keyslot ${id} cpus`, 255),
      };
      if (p.time < 1 || p.cpus < 1 || p.memory < 8 * p.cpus) j.bad(`keyslot ${id} argon2 parameters are invalid`);
      checkArgon2(p, `keyslot ${id}`, name);
      budget.charge(argon2Cost(p) + digestCost);
      derive = () => argon2(p, passphrase, salt, areaKeySize);
    } else {
      throw new UnsupportedError(`${name}: LUKS2 kdf ${kdfType} is not supported`);
    }
    attempts.push(async () => {
      const slotKey = await derive();
      const material = new Uint8Array(materialLen);
      await reader.read(areaOffset, material);
      sectorCipherFor(areaSpec, slotKey, name).decrypt(material, 0);
      const vk = afMerge(afHash, material, keySize, stripes);

      for (const [did, dv] of Object.entries(digests)) {
        const d = j.obj(dv, `digest ${did}`);
        const slotsOf = Array.isArray(d.keyslots) ? d.keyslots : [];
        if (!slotsOf.includes(id)) continue;
        if (j.str(d.type, `digest ${did} type`) !== 'pbkdf2') throw new UnsupportedError(`${name}: LUKS2 digest type is not supported`);
        const hash = j.str(d.hash, `digest ${did} hash`);
        if (!isHash(hash)) throw new UnsupportedError(`${name}: LUKS2 hash ${hash} is not supported`);
        const want = j.b64(d.digest, `digest ${did} digest`);
        if (want.length === 0 || want.length > 64) j.bad(`digest ${did} has a bad length`);
        const got = await pbkdf2(hash, vk, j.b64(d.salt, `digest ${did} salt`), j.int(d.iterations, `digest ${did} iterations`, MAX_PBKDF2_ITER), want.length);
        if (!crypto.timingSafeEqual(got, want)) continue;
        const segIds = (Array.isArray(d.segments) ? d.segments : []).filter((s): s is string => typeof s === 'string');
        return segmentVolume(j, segments, segIds, vk, bin.uuid, name);
      }
      return undefined;
    });
  }
  budget.check();
  for (const attempt of attempts) {
    const v = await attempt();
    if (v) return v;
  }
  return undefined;
}

function segmentVolume(j: J, segments: { [k: string]: Json }, ids: string[], vk: Uint8Array, uuid: string, name: string): Luks2Volume {
  const crypt = ids.map((id) => ({ id, s: j.obj(segments[id], `segment ${id}`) })).filter((x) => x.s.type === 'crypt');
  if (crypt.length !== 1 || Object.keys(segments).length !== 1) {
    throw new UnsupportedError(`${name}: LUKS2 with ${Object.keys(segments).length} segments (reencryption in progress?) is not supported`);
  }
  const { id, s } = crypt[0]!;
  if (s.integrity !== undefined) throw new UnsupportedError(`${name}: LUKS2 authenticated encryption (integrity) is not supported`);
  const spec = parseLuks2Encryption(j.str(s.encryption, `segment ${id} encryption`));
  if (typeof spec === 'string') throw new UnsupportedError(`${name}: LUKS2 ${spec} is not supported`);
  const sectorSize = j.int(s.sector_size, `segment ${id} sector_size`, 4096);
  if (![512, 1024, 2048, 4096].includes(sectorSize)) j.bad(`segment ${id} sector size ${sectorSize}`);
  const payloadOffset = j.int(s.offset, `segment ${id} offset`);
  const payloadLength = s.size === 'dynamic' ? undefined : j.int(s.size, `segment ${id} size`);
  const ivOffset = s.iv_tweak === undefined ? 0 : j.int(s.iv_tweak, `segment ${id} iv_tweak`);
  // dm-crypt counts IVs in 512-byte sectors for LUKS2 (no iv_large_sectors).
  const sectorCipher = sectorCipherFor(spec, vk, name, { sectorSize, ivStep: sectorSize / 512, ivOffset });
  return { sectorCipher, spec, payloadOffset, payloadLength, sectorSize, uuid };
}

export interface Luks2CreateOptions {
  /** The segment's and the keyslot area's encryption (cipher, mode, IV generator). */
  spec: CipherSpec;
  /** Volume key bytes (64 for aes-xts-plain64 with AES-256). */
  keyBytes: number;
  /** The anti-forensic and digest hash. */
  hash: string;
  kdf: 'pbkdf2' | 'argon2i' | 'argon2id';
  /** Time the key slot's derivation should take here (cryptsetup's --iter-time). */
  iterTimeMs: number;
  /** Argon2 memory, KiB, and lanes (cryptsetup's --pbkdf-memory, --pbkdf-parallel). */
  memoryKiB: number;
  parallel: number;
  /** Encryption sector size of the payload: 512 or 4096 (cryptsetup's --sector-size). */
  sectorSize: number;
  passphrase: Uint8Array;
}

export interface Luks2Created {
  /** Both header copies and key slot 0's key material: write at offset 0. */
  header: Uint8Array;
  /** Bytes. */
  payloadOffset: number;
  masterKey: Uint8Array;
  spec: CipherSpec;
}

/** cryptsetup 2.6's default layout: 16 KiB headers, the payload at 16 MiB. */
const LAYOUT = { hdrSize: 16384, dataOffset: 16 << 20, stripes: 4000, saltLen: 32, align: 4096 } as const;
/** cryptsetup's minimum argon2 time cost. */
const MIN_ARGON2_TIME = 4;

/** Passes of argon2 that take about `ms` here with this memory (cryptsetup benchmarks the same way). */
async function argon2Passes(p: Omit<Argon2Params, 'time'>, ms: number): Promise<number> {
  const start = process.hrtime.bigint();
  await argon2({ ...p, time: 1 }, Buffer.from('benchmark'), Buffer.alloc(16, 0x5a), 32);
  const one = Math.max(1, Number(process.hrtime.bigint() - start) / 1e6);
  const cap = Math.max(MIN_ARGON2_TIME, Math.floor(KDF_LIMITS.argon2Work / p.memory));
  return Math.min(cap, Math.max(MIN_ARGON2_TIME, Math.round(ms / one)));
}

/** One binary header plus the JSON area, checksummed (spec section 2.1: sha256 with the checksum field zeroed). */
function binaryHeader(json: string, seqid: bigint, uuid: string, secondary: boolean): Uint8Array {
  const h = new Uint8Array(LAYOUT.hdrSize);
  const dv = new DataView(h.buffer);
  h.set(secondary ? MAGIC_2ND : MAGIC_1ST, BIN.magic);
  dv.setUint16(BIN.version, 2, false);
  dv.setBigUint64(BIN.hdrSize, BigInt(LAYOUT.hdrSize), false);
  dv.setBigUint64(BIN.seqid, seqid, false);
  h.set(Buffer.from('sha256', 'latin1'), BIN.checksumAlg);
  h.set(crypto.randomBytes(64), BIN.salt);
  h.set(Buffer.from(uuid, 'latin1'), BIN.uuid);
  dv.setBigUint64(BIN.hdrOffset, BigInt(secondary ? LAYOUT.hdrSize : 0), false);
  const body = Buffer.from(json, 'utf8');
  if (body.length >= LAYOUT.hdrSize - BIN.size) throw new UnsupportedError('LUKS2 metadata does not fit its JSON area');
  h.set(body, BIN.size);
  h.set(digest('sha256', h), BIN.csum);
  return h;
}

/**
 * A new LUKS2 header with one key slot (0), as `cryptsetup luksFormat --type luks2`
 * makes it: primary and secondary header, the keyslot's AF-split key material after
 * them, the payload at 16 MiB. The key slot is pbkdf2 or argon2i/argon2id.
 */
export async function createLuks2(o: Luks2CreateOptions, name: string): Promise<Luks2Created> {
  const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');
  const masterKey = crypto.randomBytes(o.keyBytes);
  // Fails early (UnsupportedError) for combinations the cipher code does not have.
  sectorCipherFor(o.spec, masterKey, name, { sectorSize: o.sectorSize, ivStep: o.sectorSize / 512 });
  const encryption = `${o.spec.cipher}-${modeSpecString(o.spec)}`;
  const areaOffset = 2 * LAYOUT.hdrSize;
  const material = o.keyBytes * LAYOUT.stripes;
  const areaSize = Math.ceil(material / LAYOUT.align) * LAYOUT.align;
  const salt = crypto.randomBytes(LAYOUT.saltLen);
  const rate = pbkdf2IterationsPerSecond(o.hash);
  let kdf: { [k: string]: Json };
  let slotKey: Uint8Array;
  if (o.kdf === 'pbkdf2') {
    const iterations = Math.min(KDF_LIMITS.pbkdf2Iterations, Math.max(1000, Math.floor((rate * o.iterTimeMs) / 1000)));
    kdf = { type: 'pbkdf2', hash: o.hash, iterations, salt: b64(salt) };
    slotKey = await pbkdf2(o.hash, o.passphrase, salt, iterations, o.keyBytes);
  } else {
    const base = { type: o.kdf, memory: o.memoryKiB, cpus: o.parallel };
    const p: Argon2Params = { ...base, time: await argon2Passes(base, o.iterTimeMs) };
    checkArgon2(p, 'key slot 0', name);
    kdf = { type: p.type, time: p.time, memory: p.memory, cpus: p.cpus, salt: b64(salt) };
    slotKey = await argon2(p, o.passphrase, salt, o.keyBytes);
  }
  // The digest takes an eighth of the slot's time, at least 1000 iterations (cryptsetup's floor).
  const digestIter = Math.min(KDF_LIMITS.pbkdf2Iterations, Math.max(1000, Math.floor((rate * o.iterTimeMs) / 8000)));
  const digestSalt = crypto.randomBytes(LAYOUT.saltLen);
  const mkDigest = await pbkdf2(o.hash, masterKey, digestSalt, digestIter, hashLength(o.hash));
  const meta = {
    keyslots: {
      '0': {
        type: 'luks2',
        key_size: o.keyBytes,
        af: { type: 'luks1', stripes: LAYOUT.stripes, hash: o.hash },
        area: { type: 'raw', offset: String(areaOffset), size: String(areaSize), encryption, key_size: o.keyBytes },
        kdf,
      },
    },
    tokens: {},
    segments: {
      '0': { type: 'crypt', offset: String(LAYOUT.dataOffset), size: 'dynamic', iv_tweak: '0', encryption, sector_size: o.sectorSize },
    },
    digests: {
      '0': { type: 'pbkdf2', keyslots: ['0'], segments: ['0'], hash: o.hash, iterations: digestIter, salt: b64(digestSalt), digest: b64(mkDigest) },
    },
    config: { json_size: String(LAYOUT.hdrSize - BIN.size), keyslots_size: String(LAYOUT.dataOffset - areaOffset) },
  };
  const json = JSON.stringify(meta);
  const uuid = crypto.randomUUID();
  const header = new Uint8Array(areaOffset + areaSize);
  header.set(binaryHeader(json, 1n, uuid, false), 0);
  header.set(binaryHeader(json, 1n, uuid, true), LAYOUT.hdrSize);
  const area = header.subarray(areaOffset);
  area.set(afSplit(o.hash, masterKey, LAYOUT.stripes));
  // The key material is encrypted in 512-byte sectors from the area's start, as the reader decrypts it.
  sectorCipherFor(o.spec, slotKey, name).encrypt(area, 0);
  return { header, payloadOffset: LAYOUT.dataOffset, masterKey, spec: o.spec };
}
