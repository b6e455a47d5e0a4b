// ECB through OpenSSL's EVP calls, in place, on Node's own OpenSSL: the node binary
// exports libcrypto's symbols (for addons), and koffi reaches them through the
// program's own handle (koffi.load(null)). Node's Cipher.update() returns a new buffer
// each call: for 1 MiB that is a fresh mapping the CPU faults in page by page, and
// AES-256 ran at 1.5 GB/s through it where the same OpenSSL does 8 GB/s in place.
//
// Used when the symbols are there and a known answer (FIPS-197 C.1) and a comparison
// with Node's crypto for each algorithm come out right; otherwise cipher.ts feeds
// Node's update() in 64 KiB pieces (its best size here, 4 GB/s). TSMOUNT_EVP=0 turns
// this off (A/B). koffi is loaded on first use, never at import, and under the
// process's lock (util/koffi-load.ts: two threads loading the addon at once crashed
// the process once).
import crypto from 'node:crypto';
import { loadKoffi } from '../util/koffi-load.js';

/** An EVP_CIPHER_CTX *: koffi's opaque pointer. */
type Ctx = unknown;

interface Lib {
  newCtx(): Ctx;
  freeCtx(ctx: Ctx): void;
  byName(name: string): unknown;
  init(ctx: Ctx, type: unknown, impl: null, key: Uint8Array, iv: null, enc: number): number;
  padding(ctx: Ctx, pad: number): number;
  update(ctx: Ctx, out: Uint8Array, outl: Int32Array, inp: Uint8Array, inl: number): number;
}

/** Bytes per EVP_CipherUpdate call: its lengths are C ints. */
const MAX_CALL = 1 << 30;

let lib: Lib | null | undefined;
/** Per algorithm: does EVP give what Node's crypto gives (checked once). */
const checked = new Map<string, boolean>();
/** EVP_CIPHER_CTX_free cleanses the key schedule: run for each context once its cipher is garbage. */
let contexts: FinalizationRegistry<Ctx[]> | undefined;

function bind(): Lib | null {
  try {
    const koffi = loadKoffi();
    const self = koffi.load(null as unknown as string);
    const f = {
      newCtx: self.func('void *EVP_CIPHER_CTX_new()'),
      freeCtx: self.func('void EVP_CIPHER_CTX_free(void *ctx)'),
      byName: self.func('const void *EVP_get_cipherbyname(const char *name)'),
      init: self.func('int EVP_CipherInit_ex(void *ctx, const void *type, void *impl, const void *key, const void *iv, int enc)'),
      padding: self.func('int EVP_CIPHER_CTX_set_padding(void *ctx, int pad)'),
      update: self.func('int EVP_CipherUpdate(void *ctx, void *out, void *outl, const void *in, int inl)'),
    } as unknown as Lib;
    contexts = new FinalizationRegistry((ctxs) => ctxs.forEach((c) => f.freeCtx(c)));
    // FIPS-197 appendix C.1: AES-128.
    const key = Buffer.from('000102030405060708090a0b0c0d0e0f', 'hex');
    const block = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const ecb = new EvpEcb(f, 'aes-128-ecb', key);
    ecb.encrypt(block, block);
    if (block.toString('hex') !== '69c4e0d86a7b0430d8cdb78070b4c55a') return null;
    ecb.decrypt(block, block);
    return block.toString('hex') === '00112233445566778899aabbccddeeff' ? f : null;
  } catch {
    return null;
  }
}

function evp(): Lib | null {
  if (lib === undefined) lib = process.env.TSMOUNT_EVP === '0' ? null : bind();
  return lib;
}

/** Tests: ECB through EVP (true), through Node's update() (false), or as the environment says (undefined). */
export function setEvp(on: boolean | undefined): void {
  lib = on === false ? null : on === true ? bind() : undefined;
  checked.clear();
}

/**
 * An ECB cipher on EVP for OpenSSL's `algorithm` (aes-256-ecb...), or undefined where
 * EVP is not reachable here or does not match Node's crypto for that algorithm.
 */
export function evpEcb(algorithm: string, key: Uint8Array): EvpEcb | undefined {
  const f = evp();
  if (!f) return undefined;
  let ok = checked.get(algorithm);
  if (ok === undefined) {
    ok = agrees(f, algorithm, key.length);
    checked.set(algorithm, ok);
  }
  return ok ? new EvpEcb(f, algorithm, key) : undefined;
}

/** 64 bytes both ways under a made-up key, EVP against Node's crypto, in place and from one buffer to another. */
function agrees(f: Lib, algorithm: string, keyLength: number): boolean {
  try {
    const key = Buffer.from(Array.from({ length: keyLength }, (_, i) => (i * 71 + 3) & 0xff));
    const plain = Buffer.from(Array.from({ length: 64 }, (_, i) => (i * 53 + 17) & 0xff));
    const want = crypto.createCipheriv(algorithm, key, null).setAutoPadding(false).update(plain);
    const ecb = new EvpEcb(f, algorithm, key);
    const out = Buffer.alloc(64);
    ecb.encrypt(plain, out);
    if (!out.equals(want)) return false;
    ecb.decrypt(out, out);
    return out.equals(plain);
  } catch {
    return false;
  }
}

export class EvpEcb {
  readonly blockSize = 16;
  private readonly enc: Ctx;
  private readonly dec: Ctx;
  private readonly outl = new Int32Array(1);

  constructor(
    private readonly f: Lib,
    algorithm: string,
    key: Uint8Array,
  ) {
    const type = f.byName(algorithm);
    if (!type) throw new RangeError(`OpenSSL has no ${algorithm}`);
    this.enc = this.context(type, key, 1);
    this.dec = this.context(type, key, 0);
    contexts!.register(this, [this.enc, this.dec]);
  }

  private context(type: unknown, key: Uint8Array, enc: number): Ctx {
    const ctx = this.f.newCtx();
    if (!ctx) throw new Error('EVP_CIPHER_CTX_new failed');
    if (this.f.init(ctx, type, null, key, null, enc) !== 1 || this.f.padding(ctx, 0) !== 1) {
      this.f.freeCtx(ctx);
      throw new Error('EVP_CipherInit_ex failed');
    }
    return ctx;
  }

  encrypt(src: Uint8Array, dst: Uint8Array): void {
    this.run(this.enc, src, dst);
  }

  decrypt(src: Uint8Array, dst: Uint8Array): void {
    this.run(this.dec, src, dst);
  }

  private run(ctx: Ctx, src: Uint8Array, dst: Uint8Array): void {
    if (src.length % 16 !== 0 || dst.length < src.length) throw new RangeError(`ECB needs whole 16-byte blocks (${src.length} bytes into ${dst.length})`);
    // In place or apart: EVP allows both, not a partial overlap.
    if (src !== dst && src.buffer === dst.buffer && src.byteOffset !== dst.byteOffset && overlap(src, dst)) {
      dst.set(src);
      src = dst.subarray(0, src.length);
    }
    for (let at = 0; at < src.length; at += MAX_CALL) {
      const n = Math.min(MAX_CALL, src.length - at);
      if (this.f.update(ctx, dst.subarray(at, at + n), this.outl, src.subarray(at, at + n), n) !== 1 || this.outl[0] !== n) throw new Error('EVP_CipherUpdate failed');
    }
  }
}

function overlap(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteOffset < b.byteOffset + b.length && b.byteOffset < a.byteOffset + a.length;
}
