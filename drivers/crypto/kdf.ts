// Key derivation and anti-forensic splitting for LUKS (LUKS1 on-disk format spec,
// sections 2.4 and 2.5; LUKS2 adds argon2i/argon2id).
import crypto from 'node:crypto';
import { argon2i, argon2id } from 'hash-wasm';
import { digest, hashLength, opensslHash } from './hash.js';

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
