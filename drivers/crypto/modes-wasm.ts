// The sector modes' work around the block cipher in WebAssembly (modes.wat, assembled
// into MODES_WASM below): XTS's tweaks (making each block's and XORing it in before and
// after the block cipher took two thirds of XTS's time in JavaScript: 1 MiB in about
// 1 ms of the 1.4, OpenSSL's ECB the rest), CBC decryption's XORs, and CBC encryption's
// lanes (a block position of every sector gathered, chained, and put back). Used when the
// module validates and passes its self-test; else modes.ts keeps its JavaScript loops.
// TSMOUNT_MODES_WASM=0 turns it off (A/B).
//
// Memory (34 pages, fixed): a chunk of up to CHUNK bytes of data at DATA, a second
// chunk at SECOND (XTS's tweaks, CBC's plaintext or lane), the sectors' IVs at IVS.

/** modes.wat, assembled (wabt; test/modes-wasm.test.ts assembles it again and compares). */
export const MODES_WASM =
  'AGFzbQEAAAABGANgBX9/f39/AGADf39/AGAGf39/f39/AAMGBQABAAIABQMBACIHNgYDbWVtAgAEcHJlcAAAA3hvcgABBmNiY2RlYwACCWNiY2dhdGhlcgADCmNiY3NjYXR0ZXIABAr5AwWjAQICfwN+AkADQCAFIANPDQEgAikDACEHIAIpAwghCCACQRBqIQJBACEGAkADQCAGIARPDQEgASAHNwMAIAEgCDcDCCAAIAApAwAgB4U3AwAgACAAKQMIIAiFNwMIIAhCP4ghCSAIQgGGIAdCP4iEIQggB0IBhiAJQocBfoUhByABQRBqIQEgAEEQaiEAIAZBAWohBgwACwsgBUEBaiEFDAALCws8AQF/IAAgAmohAwJAA0AgACADTw0BIAAgAP0ABAAgAf0ABAD9Uf0LBAAgAEEQaiEAIAFBEGohAQwACwsLfwEDfwJAA0AgBSADTw0BIAAgAP0ABAAgAv0ABAD9Uf0LBAAgACAEaiEHIABBEGohBgJAA0AgBiAHTw0BIAYgBv0ABAAgAf0ABAD9Uf0LBAAgBkEQaiEGIAFBEGohAQwACwsgAUEQaiEBIAchACACQRBqIQIgBUEBaiEFDAALCwtZAQJ/IAEgBWohBwJAA0AgBiADTw0BIAAgB/0ABAAgBQR7IAdBEGv9AAQABSAC/QAEAAv9Uf0LBAAgAEEQaiEAIAJBEGohAiAHIARqIQcgBkEBaiEGDAALCws7AQJ/IAAgBGohBgJAA0AgBSACTw0BIAYgAf0ABAD9CwQAIAFBEGohASAGIANqIQYgBUEBaiEFDAALCws=';

export const CHUNK = 1 << 20;
export const DATA = 0;
export const SECOND = CHUNK;
export const IVS = 2 * CHUNK;
/** Room for IVs at IVS (the memory's 34 pages end 128 KiB after it): 16 bytes per sector of a chunk. */
export const IVS_ROOM = 34 * 65536 - IVS;

export interface ModesWasm {
  /** data ^= tweaks of `count` sectors of `per` blocks, the tweaks kept at `tw`. */
  prep(data: number, tw: number, ivs: number, count: number, per: number): void;
  /** a ^= b over len bytes. */
  xor(a: number, b: number, len: number): void;
  /** CBC after ECB decryption: each sector's first block ^= its IV, every other ^= the ciphertext block before it. */
  cbcdec(plain: number, cipher: number, ivs: number, count: number, sectorSize: number): void;
  /** CBC encryption, block position `off` of `count` sectors: lane block s = that block ^ the (encrypted) block before it, or the sector's IV. */
  cbcgather(lane: number, data: number, ivs: number, count: number, sectorSize: number, off: number): void;
  /** Block position `off` of each sector = lane block s (after the block cipher). */
  cbcscatter(data: number, lane: number, count: number, sectorSize: number, off: number): void;
  /** The module's memory. */
  bytes: Uint8Array;
}

let state: ModesWasm | null | undefined;

/** The module, or undefined where it cannot run here (made once per thread). */
export function modesWasm(): ModesWasm | undefined {
  if (state === undefined) state = process.env.TSMOUNT_MODES_WASM === '0' ? null : load();
  return state ?? undefined;
}

/** Tests: run the modes with (true) or without (false) the module, or as the environment says (undefined). */
export function setModesWasm(on: boolean | undefined): void {
  state = on === false ? null : on === true ? load() : undefined;
}

function load(): ModesWasm | null {
  try {
    const code = Buffer.from(MODES_WASM, 'base64');
    if (!WebAssembly.validate(code)) return null;
    const exp = new WebAssembly.Instance(new WebAssembly.Module(code), {}).exports as {
      mem: WebAssembly.Memory;
      prep: ModesWasm['prep'];
      xor: ModesWasm['xor'];
      cbcdec: ModesWasm['cbcdec'];
      cbcgather: ModesWasm['cbcgather'];
      cbcscatter: ModesWasm['cbcscatter'];
    };
    const w: ModesWasm = {
      prep: exp.prep,
      xor: exp.xor,
      cbcdec: exp.cbcdec,
      cbcgather: exp.cbcgather,
      cbcscatter: exp.cbcscatter,
      bytes: new Uint8Array(exp.mem.buffer),
    };
    return selfTest(w) ? w : null;
  } catch {
    return null;
  }
}

/**
 * XTS: one sector of three blocks whose first tweak has both 64-bit halves' top bits
 * set: the tweaks must be t, t*x, t*x^2 (the carry between the halves and 0x87 folded
 * in), XORed into the data, and xor() must take them out again. CBC: two sectors of two
 * blocks, each block XORed with its IV or the ciphertext block before it.
 */
function selfTest(w: ModesWasm): boolean {
  const m = w.bytes;
  const t0 = Buffer.alloc(16);
  t0.writeBigUInt64LE(0x8000000000000001n, 0);
  t0.writeBigUInt64LE(0x8000000000000002n, 8);
  const want: bigint[] = [];
  let lo = 0x8000000000000001n;
  let hi = 0x8000000000000002n;
  const MASK = (1n << 64n) - 1n;
  for (let b = 0; b < 3; b++) {
    want.push(lo, hi);
    const c = hi >> 63n;
    hi = ((hi << 1n) | (lo >> 63n)) & MASK;
    lo = ((lo << 1n) & MASK) ^ (c * 0x87n);
  }
  const data = Buffer.from(Array.from({ length: 48 }, (_, i) => (i * 37 + 11) & 0xff));
  m.set(data, DATA);
  m.set(t0, IVS);
  w.prep(DATA, SECOND, IVS, 1, 3);
  const view = Buffer.from(m.buffer, m.byteOffset, m.byteLength);
  for (let i = 0; i < 6; i++) {
    if (view.readBigUInt64LE(SECOND + 8 * i) !== want[i]) return false;
    if (view.readBigUInt64LE(DATA + 8 * i) !== (data.readBigUInt64LE(8 * i) ^ want[i]!)) return false;
  }
  w.xor(DATA, SECOND, 48);
  if (!view.subarray(DATA, DATA + 48).equals(data)) return false;
  // CBC: two sectors of two blocks; block 0 ^= the IV, block 1 ^= ciphertext block 0.
  const cipher = Buffer.from(Array.from({ length: 64 }, (_, i) => (i * 13 + 5) & 0xff));
  const plain = Buffer.from(Array.from({ length: 64 }, (_, i) => (i * 29 + 3) & 0xff));
  const ivs = Buffer.from(Array.from({ length: 32 }, (_, i) => (i * 7 + 1) & 0xff));
  m.set(cipher, DATA);
  m.set(plain, SECOND);
  m.set(ivs, IVS);
  w.cbcdec(SECOND, DATA, IVS, 2, 32);
  const expect = Buffer.from(plain);
  for (let i = 0; i < 64; i++) expect[i]! ^= i % 32 < 16 ? ivs[(i >> 5) * 16 + (i % 16)]! : cipher[i - 16]!;
  if (!view.subarray(SECOND, SECOND + 64).equals(expect)) return false;
  // CBC encryption's lanes, the same two sectors: block 1 of each ^ block 0, then back.
  m.set(plain, DATA);
  w.cbcgather(SECOND, DATA, IVS, 2, 32, 16);
  const lane = Buffer.alloc(32);
  for (let i = 0; i < 32; i++) lane[i] = plain[(i >> 4) * 32 + 16 + (i % 16)]! ^ plain[(i >> 4) * 32 + (i % 16)]!;
  if (!view.subarray(SECOND, SECOND + 32).equals(lane)) return false;
  w.cbcgather(SECOND, DATA, IVS, 2, 32, 0);
  for (let i = 0; i < 32; i++) lane[i] = plain[(i >> 4) * 32 + (i % 16)]! ^ ivs[i]!;
  if (!view.subarray(SECOND, SECOND + 32).equals(lane)) return false;
  w.cbcscatter(DATA, SECOND, 2, 32, 16);
  const placed = Buffer.from(plain);
  lane.copy(placed, 16, 0, 16);
  lane.copy(placed, 48, 16, 32);
  return view.subarray(DATA, DATA + 64).equals(placed);
}
