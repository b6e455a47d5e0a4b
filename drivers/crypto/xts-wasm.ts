// XTS's tweak work in WebAssembly (xts.wat, assembled into XTS_WASM below): making each
// block's tweak and XORing it in before and after the block cipher took two thirds of
// XTS's time in JavaScript (modes.ts; 1 MiB in about 1 ms of the 1.4), where OpenSSL's
// ECB does the rest. Used when the module validates and passes its self-test; else
// modes.ts keeps its JavaScript loops. TSMOUNT_XTS_WASM=0 turns it off (A/B).
//
// Memory (34 pages, fixed): a chunk of up to XTS_CHUNK bytes of data at DATA, its tweaks
// at TWEAKS, the sectors' encrypted IVs at IVS.

/** xts.wat, assembled (wabt; test/xts-wasm.test.ts assembles it again and compares). */
export const XTS_WASM =
  'AGFzbQEAAAABDwJgBX9/f39/AGADf39/AAMDAgABBQMBACIHFAMDbWVtAgAEcHJlcAAAA3hvcgABCuMBAqMBAgJ/A34CQANAIAUgA08NASACKQMAIQcgAikDCCEIIAJBEGohAkEAIQYCQANAIAYgBE8NASABIAc3AwAgASAINwMIIAAgACkDACAHhTcDACAAIAApAwggCIU3AwggCEI/iCEJIAhCAYYgB0I/iIQhCCAHQgGGIAlChwF+hSEHIAFBEGohASAAQRBqIQAgBkEBaiEGDAALCyAFQQFqIQUMAAsLCzwBAX8gACACaiEDAkADQCAAIANPDQEgACAA/QAEACAB/QAEAP1R/QsEACAAQRBqIQAgAUEQaiEBDAALCws=';

export const XTS_CHUNK = 1 << 20;
export const DATA = 0;
export const TWEAKS = XTS_CHUNK;
export const IVS = 2 * XTS_CHUNK;
/** Room for IVs at IVS (the memory's 34 pages end 128 KiB after it): 16 bytes per sector of a chunk. */
export const IVS_ROOM = 34 * 65536 - IVS;

export interface XtsWasm {
  /** data ^= tweaks of `count` sectors of `per` blocks, the tweaks kept at `tw`. */
  prep(data: number, tw: number, ivs: number, count: number, per: number): void;
  /** a ^= b over len bytes. */
  xor(a: number, b: number, len: number): void;
  /** The module's memory. */
  bytes: Uint8Array;
}

let state: XtsWasm | null | undefined;

/** The module, or undefined where it cannot run here (made once per thread). */
export function xtsWasm(): XtsWasm | undefined {
  if (state === undefined) state = process.env.TSMOUNT_XTS_WASM === '0' ? null : load();
  return state ?? undefined;
}

/** Tests: run XTS with (true) or without (false) the module, or as the environment says (undefined). */
export function setXtsWasm(on: boolean | undefined): void {
  state = on === false ? null : on === true ? load() : undefined;
}

function load(): XtsWasm | null {
  try {
    const code = Buffer.from(XTS_WASM, 'base64');
    if (!WebAssembly.validate(code)) return null;
    const exp = new WebAssembly.Instance(new WebAssembly.Module(code), {}).exports as {
      mem: WebAssembly.Memory;
      prep: XtsWasm['prep'];
      xor: XtsWasm['xor'];
    };
    const w: XtsWasm = { prep: exp.prep, xor: exp.xor, bytes: new Uint8Array(exp.mem.buffer) };
    return selfTest(w) ? w : null;
  } catch {
    return null;
  }
}

/**
 * One sector of three blocks whose first tweak has both 64-bit halves' top bits set:
 * the tweaks must be t, t*x, t*x^2 (the carry between the halves and 0x87 folded in),
 * XORed into the data, and xor() must take them out again.
 */
function selfTest(w: XtsWasm): boolean {
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
  w.prep(DATA, TWEAKS, IVS, 1, 3);
  const view = Buffer.from(m.buffer, m.byteOffset, m.byteLength);
  for (let i = 0; i < 6; i++) {
    if (view.readBigUInt64LE(TWEAKS + 8 * i) !== want[i]) return false;
    if (view.readBigUInt64LE(DATA + 8 * i) !== (data.readBigUInt64LE(8 * i) ^ want[i]!)) return false;
  }
  w.xor(DATA, TWEAKS, 48);
  return view.subarray(DATA, DATA + 48).equals(data);
}
