// Sector encryption as dm-crypt and QEMU's crypto/block.c do it: each sector is one
// message of a block-cipher mode (xts, cbc, ecb, ctr) whose IV comes from the sector
// number (ivgen.ts). Written once over the BlockCipher interface; whole runs of
// sectors go to the cipher in one call wherever the mode allows it.
import { makeBlockCipher, type BlockCipher } from './cipher.js';
import { IvGenerator, type IvGenName } from './ivgen.js';
import type { CipherMode } from './magic.js';
import { CHUNK, DATA, IVS, IVS_ROOM, modesWasm, SECOND, type ModesWasm } from './modes-wasm.js';
export { CIPHER_MODES, type CipherMode } from './magic.js';

export interface SectorCipherSpec {
  /** Cipher family as LUKS names it: aes, serpent, twofish, cast5... */
  cipher: string;
  mode: CipherMode;
  ivgen: IvGenName;
  /** The hash of essiv. */
  ivHash?: string;
  /** The whole key (both halves for xts). */
  key: Uint8Array;
  /** Bytes per encryption unit: 512 (LUKS1), or up to 4096 (LUKS2). */
  sectorSize?: number;
  /** IV sectors per encryption unit: 1, or sectorSize/512 when IVs count 512-byte sectors (LUKS2). */
  ivStep?: number;
  /** Added to every IV sector number (LUKS2 iv_tweak). */
  ivOffset?: number;
}

/** Encrypts and decrypts whole sectors in place. */
export interface SectorCipher {
  readonly sectorSize: number;
  /** What makes this cipher again (makeSectorCipher): another thread makes its own from it (fs/read-map.ts). */
  readonly spec: Readonly<SectorCipherSpec>;
  /** data.length is a multiple of sectorSize; firstSector counts sectorSize units. */
  encrypt(data: Uint8Array, firstSector: number): void;
  decrypt(data: Uint8Array, firstSector: number): void;
  /**
   * A reading thread's shortcut past one copy: where the ciphertext of `length` bytes
   * (whole sectors) may be read to for decryptStaged (this thread's WebAssembly memory,
   * modes-wasm.ts), or undefined where this cipher has no such place (then decrypt()).
   * Valid until the next call of this thread's ciphers.
   */
  staging(length: number): Uint8Array | undefined;
  /** The `length` bytes read to staging(length), sectors from firstSector on, decrypted into `out` at `at`. */
  decryptStaged(length: number, firstSector: number, out: Uint8Array, at: number): void;
  /**
   * A writing thread's shortcut: `plain` (whole sectors from firstSector on, left as it
   * is) encrypted in this thread's module memory, returned there for the write to the
   * host file, valid until the next call of this thread's ciphers; undefined where it
   * cannot be staged (then a copy and encrypt()).
   */
  encryptStaged(plain: Uint8Array, firstSector: number): Uint8Array | undefined;
}

export function makeSectorCipher(spec: SectorCipherSpec): SectorCipher {
  return new ModeCipher(spec);
}

/**
 * The legacy "aes" of qcow and qcow2 (QEMU's crypto/block-qcow.c): AES-128-CBC per
 * 512-byte sector, IV plain64, the key the passphrase's first 16 bytes (UTF-8), zero-padded.
 */
export function legacyAesCipher(passphrase: string): SectorCipher {
  const key = new Uint8Array(16);
  key.set(Buffer.from(passphrase, 'utf8').subarray(0, 16));
  return makeSectorCipher({ cipher: 'aes', mode: 'cbc', ivgen: 'plain64', key });
}

class ModeCipher implements SectorCipher {
  readonly sectorSize: number;
  readonly spec: Readonly<SectorCipherSpec>;
  private readonly data: BlockCipher;
  private readonly tweak: BlockCipher | undefined;
  private readonly ivgen: IvGenerator | undefined;
  private readonly mode: CipherMode;
  private readonly ivStep: number;
  private readonly ivOffset: number;

  constructor(spec: SectorCipherSpec) {
    this.spec = { ...spec, key: new Uint8Array(spec.key) };
    this.mode = spec.mode;
    this.sectorSize = spec.sectorSize ?? 512;
    this.ivStep = spec.ivStep ?? 1;
    this.ivOffset = spec.ivOffset ?? 0;
    if (spec.mode === 'xts') {
      const half = spec.key.length / 2;
      if (!Number.isInteger(half)) throw new RangeError('xts needs a key of two equal halves');
      this.data = makeBlockCipher(spec.cipher, spec.key.subarray(0, half));
      this.tweak = makeBlockCipher(spec.cipher, spec.key.subarray(half));
      if (this.data.blockSize !== 16) throw new RangeError(`mode xts needs a 128-bit block cipher, not ${spec.cipher}`);
    } else {
      this.data = makeBlockCipher(spec.cipher, spec.key);
    }
    if (this.sectorSize % this.data.blockSize) throw new RangeError('sector size is not a multiple of the cipher block');
    // QEMU gives ECB no IV at all (qcrypto_cipher_get_iv_len is 0 for it).
    if (spec.mode !== 'ecb') this.ivgen = new IvGenerator(spec.ivgen, this.data.blockSize, spec.cipher, spec.key, spec.ivHash);
  }

  /** The whole sectors `data` holds; the nodes give whole sectors only. */
  private sectors(data: Uint8Array): number {
    if (data.length % this.sectorSize !== 0) throw new RangeError(`${data.length} bytes are not whole ${this.sectorSize}-byte encryption sectors`);
    return data.length / this.sectorSize;
  }

  private ivs(firstSector: number, count: number): Uint8Array {
    return this.ivgen!.generate(this.ivOffset + firstSector * this.ivStep, count, this.ivStep);
  }

  /** ivs() written straight to the module's memory at IVS. */
  private ivsInModule(w: ModesWasm, firstSector: number, count: number): void {
    this.ivgen!.generateInto(w.bytes.subarray(IVS, IVS + count * this.data.blockSize), this.ivOffset + firstSector * this.ivStep, count, this.ivStep);
  }

  staging(length: number): Uint8Array | undefined {
    if ((this.mode !== 'xts' && this.mode !== 'cbc') || length <= 0 || length > CHUNK || length % this.sectorSize !== 0) return undefined;
    return this.wasm()?.bytes.subarray(DATA, DATA + length);
  }

  encryptStaged(plain: Uint8Array, firstSector: number): Uint8Array | undefined {
    const length = plain.length;
    const stage = this.staging(length);
    const w = this.wasm();
    if (!stage || !w) return undefined;
    stage.set(plain);
    const n = length / this.sectorSize;
    this.ivsInModule(w, firstSector, n);
    const from = this.mode === 'xts' ? this.xtsChunk(w, n, length, true) : this.cbcEncryptChunk(w, n);
    return w.bytes.subarray(from, from + length);
  }

  decryptStaged(length: number, firstSector: number, out: Uint8Array, at: number): void {
    const w = this.wasm();
    if (!w || this.staging(length) === undefined) throw new RangeError(`${length} bytes cannot be staged for this cipher`);
    const n = length / this.sectorSize;
    this.ivsInModule(w, firstSector, n);
    const from = this.mode === 'xts' ? this.xtsChunk(w, n, length, false) : this.cbcDecryptChunk(w, n, length);
    out.set(w.bytes.subarray(from, from + length), at);
  }

  encrypt(data: Uint8Array, firstSector: number): void {
    const count = this.sectors(data);
    switch (this.mode) {
      case 'ecb':
        return this.data.encrypt(data, data);
      case 'xts':
        return this.xts(data, firstSector, count, true);
      case 'ctr':
        return this.ctr(data, firstSector, count);
      case 'cbc':
        return this.cbcEncrypt(data, firstSector, count);
    }
  }

  decrypt(data: Uint8Array, firstSector: number): void {
    const count = this.sectors(data);
    switch (this.mode) {
      case 'ecb':
        return this.data.decrypt(data, data);
      case 'xts':
        return this.xts(data, firstSector, count, false);
      case 'ctr':
        return this.ctr(data, firstSector, count);
      case 'cbc':
        return this.cbcDecrypt(data, firstSector, count);
    }
  }

  /** CBC decryption: every block's predecessor is known up front, so one cipher call for the run. */
  private cbcDecrypt(data: Uint8Array, firstSector: number, count: number): void {
    const w = this.wasm();
    if (w) return this.cbcDecryptWasm(w, data, firstSector, count);
    const ss = this.sectorSize;
    const bs = this.data.blockSize;
    const ivs = this.ivs(firstSector, count);
    // A copy, never a view: data may be a Buffer, whose slice() shares memory.
    const cipherText = new Uint8Array(data);
    this.data.decrypt(data, data);
    const [d, iv, c] = lanes(data, ivs, cipherText);
    const u = d!.BYTES_PER_ELEMENT;
    const sw = ss / u;
    const bw = bs / u;
    for (let s = 0; s < count; s++) {
      const base = s * sw;
      for (let k = 0; k < bw; k++) d![base + k]! ^= iv![s * bw + k]!;
      for (let k = base + bw, end = base + sw; k < end; k++) d![k]! ^= c![k - bw]!;
    }
  }

  /**
   * CBC encryption chains the blocks of a sector, but sectors are independent: block j
   * of every sector of the run goes to the cipher in one call, XORed first with block
   * j - 1 of its sector, already encrypted (its IV for j = 0). As many cipher calls as
   * a sector has blocks (32), not as the run has (a call per 16 bytes ran at 14-21 MB/s).
   */
  private cbcEncrypt(data: Uint8Array, firstSector: number, count: number): void {
    const w = this.wasm();
    if (w) return this.cbcEncryptWasm(w, data, firstSector, count);
    const ss = this.sectorSize;
    const bs = this.data.blockSize;
    const ivs = this.ivs(firstSector, count);
    const lane = new Uint8Array(count * bs);
    const [d, iv, l] = lanes(data, ivs, lane);
    const u = d!.BYTES_PER_ELEMENT;
    const sw = ss / u;
    const bw = bs / u;
    for (let j = 0; j < sw; j += bw) {
      for (let s = 0; s < count; s++) {
        const at = s * sw + j;
        const prev = j === 0 ? iv! : d!;
        const from = j === 0 ? s * bw : at - bw;
        for (let k = 0; k < bw; k++) l![s * bw + k] = d![at + k]! ^ prev[from + k]!;
      }
      this.data.encrypt(lane, lane);
      for (let s = 0; s < count; s++) for (let k = 0; k < bw; k++) d![s * sw + j + k] = l![s * bw + k]!;
    }
  }

  /** CTR as nettle runs it: the IV is the first counter block, incremented big-endian. */
  private ctr(data: Uint8Array, firstSector: number, count: number): void {
    const bs = this.data.blockSize;
    const perSector = this.sectorSize / bs;
    const ivs = this.ivs(firstSector, count);
    const stream = new Uint8Array(data.length);
    for (let s = 0; s < count; s++) {
      const iv = ivs.subarray(s * bs, (s + 1) * bs);
      for (let b = 0; b < perSector; b++) {
        const off = (s * perSector + b) * bs;
        stream.set(iv, off);
        let carry = b;
        for (let i = bs - 1; i >= 0 && carry; i--) {
          const v = stream[off + i]! + (carry & 0xff);
          stream[off + i] = v & 0xff;
          carry = Math.floor(carry / 256) + (v >> 8);
        }
      }
    }
    this.data.encrypt(stream, stream);
    xor(data, stream);
  }

  /**
   * XTS (IEEE 1619) without ciphertext stealing: sectors are whole blocks. The tweaks of
   * the whole run are made first (each block's the one before it times x in GF(2^128)),
   * then one cipher call between two XORs with them.
   */
  private xts(data: Uint8Array, firstSector: number, count: number, encrypt: boolean): void {
    const w = this.wasm();
    if (w) return this.xtsWasm(w, data, firstSector, count, encrypt);
    const perSector = this.sectorSize / 16;
    const ivs = this.ivs(firstSector, count);
    this.tweak!.encrypt(ivs, ivs);
    const t = new Uint8Array(data.length);
    if (LITTLE_ENDIAN) {
      // A tweak as four 32-bit words, least significant first: the 128-bit shift is four word shifts.
      const t32 = new Uint32Array(t.buffer, t.byteOffset, t.length >> 2);
      const iv32 = new Uint32Array(ivs.buffer.slice(ivs.byteOffset, ivs.byteOffset + ivs.length));
      for (let s = 0; s < count; s++) {
        let w0 = iv32[s * 4]!;
        let w1 = iv32[s * 4 + 1]!;
        let w2 = iv32[s * 4 + 2]!;
        let w3 = iv32[s * 4 + 3]!;
        let o = s * perSector * 4;
        t32[o] = w0;
        t32[o + 1] = w1;
        t32[o + 2] = w2;
        t32[o + 3] = w3;
        for (let b = 1; b < perSector; b++) {
          const carry = w3 >>> 31;
          w3 = (w3 << 1) | (w2 >>> 31);
          w2 = (w2 << 1) | (w1 >>> 31);
          w1 = (w1 << 1) | (w0 >>> 31);
          w0 = (w0 << 1) ^ (carry * 0x87);
          o += 4;
          t32[o] = w0;
          t32[o + 1] = w1;
          t32[o + 2] = w2;
          t32[o + 3] = w3;
        }
      }
    } else {
      for (let s = 0; s < count; s++) {
        let off = s * this.sectorSize;
        t.set(ivs.subarray(s * 16, s * 16 + 16), off);
        for (let b = 1; b < perSector; b++, off += 16) {
          // Multiply the previous tweak by x in GF(2^128), little-endian.
          const carry = t[off + 15]! >> 7;
          for (let i = 15; i > 0; i--) t[off + 16 + i] = ((t[off + i]! << 1) | (t[off + i - 1]! >> 7)) & 0xff;
          t[off + 16] = ((t[off]! << 1) & 0xff) ^ (carry ? 0x87 : 0);
        }
      }
    }
    xor(data, t);
    if (encrypt) this.data.encrypt(data, data);
    else this.data.decrypt(data, data);
    xor(data, t);
  }

  /**
   * The WebAssembly module (modes-wasm.ts) for this cipher's modes, if it runs here and
   * fits: blocks of 16 bytes, and sectors of at least 128 bytes (no format makes fewer),
   * so that a chunk's IVs have room in its memory.
   */
  private wasm(): ModesWasm | undefined {
    return this.data.blockSize === 16 && (CHUNK / this.sectorSize) * 16 <= IVS_ROOM ? modesWasm() : undefined;
  }

  /**
   * Run `work` over `data` a chunk of at most CHUNK bytes at a time in the module's
   * memory: each chunk's sectors copied to DATA and their IVs to IVS; `work(n, length)`
   * (n sectors, length bytes) returns where in the memory it left the result, which is
   * copied back.
   */
  private inModule(w: ModesWasm, data: Uint8Array, firstSector: number, count: number, work: (n: number, length: number) => number): void {
    const ss = this.sectorSize;
    const step = Math.floor(CHUNK / ss);
    for (let s = 0; s < count; s += step) {
      const n = Math.min(step, count - s);
      const part = data.subarray(s * ss, (s + n) * ss);
      w.bytes.set(part, DATA);
      this.ivsInModule(w, firstSector + s, n);
      const at = work(n, part.length);
      part.set(w.bytes.subarray(at, at + part.length));
    }
  }

  /**
   * xts() with the tweak work in WebAssembly: the IVs encrypted into the first tweaks,
   * the chunk XORed with its tweaks (kept at SECOND), through the block cipher, XORed again.
   */
  private xtsWasm(w: ModesWasm, data: Uint8Array, firstSector: number, count: number, encrypt: boolean): void {
    this.inModule(w, data, firstSector, count, (n, length) => this.xtsChunk(w, n, length, encrypt));
  }

  /** XTS of the `n` sectors (`length` bytes) at DATA whose IVs are at IVS; the result is at DATA. */
  private xtsChunk(w: ModesWasm, n: number, length: number, encrypt: boolean): number {
    const ivs = w.bytes.subarray(IVS, IVS + n * 16);
    this.tweak!.encrypt(ivs, ivs);
    w.prep(DATA, SECOND, IVS, n, this.sectorSize / 16);
    const chunk = w.bytes.subarray(DATA, DATA + length);
    if (encrypt) this.data.encrypt(chunk, chunk);
    else this.data.decrypt(chunk, chunk);
    w.xor(DATA, SECOND, length);
    return DATA;
  }

  /**
   * cbcDecrypt() with the XORs in WebAssembly: the chunk decrypted by the block cipher
   * into SECOND, each block XORed there with its predecessor (the sector's IV for the first).
   */
  private cbcDecryptWasm(w: ModesWasm, data: Uint8Array, firstSector: number, count: number): void {
    this.inModule(w, data, firstSector, count, (n, length) => this.cbcDecryptChunk(w, n, length));
  }

  /** CBC decryption of the `n` sectors (`length` bytes) at DATA whose IVs are at IVS; the result is at SECOND. */
  private cbcDecryptChunk(w: ModesWasm, n: number, length: number): number {
    this.data.decrypt(w.bytes.subarray(DATA, DATA + length), w.bytes.subarray(SECOND, SECOND + length));
    w.cbcdec(SECOND, DATA, IVS, n, this.sectorSize);
    return SECOND;
  }

  /**
   * cbcEncrypt() with the lanes in WebAssembly: for each block position, that block of
   * every sector gathered into a lane at SECOND (XORed with the block before it, already
   * encrypted, or the IV), encrypted there, and put back.
   */
  private cbcEncryptWasm(w: ModesWasm, data: Uint8Array, firstSector: number, count: number): void {
    this.inModule(w, data, firstSector, count, (n) => this.cbcEncryptChunk(w, n));
  }

  /** CBC encryption of the `n` sectors at DATA whose IVs are at IVS; the result is at DATA. */
  private cbcEncryptChunk(w: ModesWasm, n: number): number {
    const ss = this.sectorSize;
    const lane = w.bytes.subarray(SECOND, SECOND + n * 16);
    for (let off = 0; off < ss; off += 16) {
      w.cbcgather(SECOND, DATA, IVS, n, ss, off);
      this.data.encrypt(lane, lane);
      w.cbcscatter(DATA, SECOND, n, ss, off);
    }
    return DATA;
  }
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

type Lane = Uint8Array | Uint32Array;

/**
 * The arrays as 32-bit words where every one of them allows it (XOR and copies do not
 * care for byte order), else as bytes: a quarter of the loop iterations.
 */
function lanes(...arrays: Uint8Array[]): Lane[] {
  if (arrays.every((a) => a.byteOffset % 4 === 0 && a.length % 4 === 0)) return arrays.map((a) => new Uint32Array(a.buffer, a.byteOffset, a.length >> 2));
  return arrays;
}

/** dst ^= src, of equal length. */
function xor(dst: Uint8Array, src: Uint8Array): void {
  const [d, s] = lanes(dst, src);
  for (let i = 0; i < d!.length; i++) d![i]! ^= s![i]!;
}
