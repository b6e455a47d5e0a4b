// Key derivation and anti-forensic splitting for LUKS (LUKS1 on-disk format spec,
// sections 2.4 and 2.5; LUKS2 adds argon2i/argon2id).
import crypto from 'node:crypto';
import { digest, hashLength, opensslHash } from './hash.js';
import { UnsupportedError } from '../errors.js';

/**
 * How much key derivation one open may do, whatever a header asks. cryptsetup's
 * own defaults (lib/utils_pbkdf.c, config.h) size a key slot by benchmark to take
 * DEFAULT_LUKS1_ITER_TIME / DEFAULT_LUKS2_ITER_TIME = 2000 ms on the machine that
 * made it, with argon2 memory at most DEFAULT_LUKS2_MEMORY_KB = 1 GiB (the
 * benchmark only ever lowers it) and 4 threads. The bounds leave a wide margin
 * over that on the fastest machines, and refuse what only a hand-made (or
 * hostile) header asks, such as cryptsetup's hard limits of 4 GiB and 2^32
 * passes, which would run for hours.
 */
export const KDF_LIMITS = {
  /** PBKDF2 iterations per slot (and per digest): 2 s at 16 million a second. */
  pbkdf2Iterations: 2 ** 25,
  /** Argon2 memory per slot, KiB: cryptsetup's default maximum, 1 GiB. */
  argon2MemoryKiB: 1024 * 1024,
  /** Argon2 memory x passes per slot, KiB: 1 GiB x 16 passes (2 s at 8 GiB/s). */
  argon2Work: 16 * 1024 * 1024,
  /** All key slots of one open together: the work of this many slots at the limit. */
  slotsAtLimit: 4,
} as const;

/** A slot's share of the per-slot limit (1 = at the limit). */
export function pbkdf2Cost(iterations: number): number {
  return iterations / KDF_LIMITS.pbkdf2Iterations;
}

export function argon2Cost(p: { memory: number; time: number }): number {
  return (p.memory * p.time) / KDF_LIMITS.argon2Work;
}

/**
 * The work of one open: a passphrase may be tried against every key slot, so the
 * slots' costs are summed before any derivation starts, and eight slots each just
 * under the per-slot bound are refused at once instead of running for minutes.
 * cryptsetup's defaults give each slot 2 s on the machine that made it; LUKS1 has
 * 8 slots, and on the fastest machines a default slot costs about a quarter of the
 * per-slot bound, so 8 default slots fit.
 */
export class KdfBudget {
  private total = 0;
  constructor(private readonly name: string) {}

  /** Add one slot's cost (pbkdf2Cost / argon2Cost). */
  charge(cost: number): void {
    this.total += cost;
  }

  /** Refuse, naming the limit, when the slots together exceed it. */
  check(): void {
    if (this.total > KDF_LIMITS.slotsAtLimit) {
      throw new UnsupportedError(
        `${this.name}: LUKS key slots together ask for ${this.total.toFixed(1)} times the key derivation work tsmount allows for one slot; the limit for one open is ${KDF_LIMITS.slotsAtLimit} (a slot at the limit: ${KDF_LIMITS.pbkdf2Iterations} PBKDF2 iterations, or 1 GiB x 16 argon2 passes; cryptsetup's defaults take 2 s)`,
      );
    }
  }
}

/** Refuse PBKDF2 iteration counts beyond the per-slot bound, naming it. */
export function checkPbkdf2Iterations(iterations: number, what: string, name: string): void {
  if (iterations > KDF_LIMITS.pbkdf2Iterations) {
    throw new UnsupportedError(`${name}: LUKS ${what} asks for ${iterations} PBKDF2 iterations; tsmount allows at most ${KDF_LIMITS.pbkdf2Iterations} (cryptsetup's 2 s default, with a wide margin)`);
  }
}

/** Refuse argon2 parameters beyond the per-slot bounds, naming them. */
export function checkArgon2(p: { memory: number; time: number }, what: string, name: string): void {
  if (p.memory > KDF_LIMITS.argon2MemoryKiB) {
    throw new UnsupportedError(`${name}: LUKS2 ${what} asks for ${p.memory} KiB of argon2 memory; tsmount allows at most ${KDF_LIMITS.argon2MemoryKiB} KiB (1 GiB, cryptsetup's default maximum)`);
  }
  if (p.memory * p.time > KDF_LIMITS.argon2Work) {
    throw new UnsupportedError(
      `${name}: LUKS2 ${what} asks for ${p.time} argon2 passes over ${p.memory} KiB; tsmount allows at most ${KDF_LIMITS.argon2Work} KiB x passes (1 GiB x 16; cryptsetup's default takes 2 s)`,
    );
  }
}

export function pbkdf2(hash: string, password: Uint8Array, salt: Uint8Array, iterations: number, length: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    crypto.pbkdf2(password, salt, iterations, length, opensslHash(hash), (err, key) => (err ? reject(err) : resolve(key)));
  });
}

export interface Argon2Params {
  type: 'argon2i' | 'argon2id';
  /** Passes (time cost). */
  time: number;
  /** KiB. */
  memory: number;
  /** Lanes. */
  cpus: number;
}

export async function argon2(p: Argon2Params, password: Uint8Array, salt: Uint8Array, length: number): Promise<Uint8Array> {
  // hash-wasm (its WebAssembly modules inlined, 2 MB) is loaded only for an argon2 key slot.
  const { argon2i, argon2id } = await import('hash-wasm');
  const fn = p.type === 'argon2i' ? argon2i : argon2id;
  return fn({ password, salt, iterations: p.time, memorySize: p.memory, parallelism: p.cpus, hashLength: length, outputType: 'binary' });
}

/** PBKDF2 iterations per second for this hash here, as QEMU's qcrypto_pbkdf2_count_iters measures it. */
export function pbkdf2IterationsPerSecond(hash: string): number {
  const probe = 1 << 14;
  const start = process.hrtime.bigint();
  crypto.pbkdf2Sync('benchmark', 'saltsaltsaltsalt', probe, hashLength(hash), opensslHash(hash));
  const ns = Number(process.hrtime.bigint() - start);
  return Math.max(1, Math.floor((probe * 1e9) / Math.max(ns, 1)));
}

/** LUKS AF diffusion: each digest-sized piece of the block is hashed with its index. */
function diffuse(hash: string, block: Uint8Array): void {
  const dl = hashLength(hash);
  const idx = new Uint8Array(4);
  for (let i = 0, off = 0; off < block.length; i++, off += dl) {
    new DataView(idx.buffer).setUint32(0, i, false);
    const piece = block.subarray(off, Math.min(off + dl, block.length));
    piece.set(digest(hash, idx, piece).subarray(0, piece.length));
  }
}

/** AF-merge: the key from `stripes` stripes of keyLength bytes each. */
export function afMerge(hash: string, material: Uint8Array, keyLength: number, stripes: number): Uint8Array {
  const d = new Uint8Array(keyLength);
  for (let s = 0; s < stripes - 1; s++) {
    const stripe = material.subarray(s * keyLength, (s + 1) * keyLength);
    for (let i = 0; i < keyLength; i++) d[i]! ^= stripe[i]!;
    diffuse(hash, d);
  }
  const last = material.subarray((stripes - 1) * keyLength, stripes * keyLength);
  for (let i = 0; i < keyLength; i++) d[i]! ^= last[i]!;
  return d;
}

/** AF-split: `stripes` stripes whose merge is key; all but the last are random. */
export function afSplit(hash: string, key: Uint8Array, stripes: number): Uint8Array {
  const n = key.length;
  const out = new Uint8Array(n * stripes);
  crypto.randomFillSync(out.subarray(0, n * (stripes - 1)));
  const d = new Uint8Array(n);
  for (let s = 0; s < stripes - 1; s++) {
    const stripe = out.subarray(s * n, (s + 1) * n);
    for (let i = 0; i < n; i++) d[i]! ^= stripe[i]!;
    diffuse(hash, d);
  }
  for (let i = 0; i < n; i++) out[(stripes - 1) * n + i] = d[i]! ^ key[i]!;
  return out;
}
