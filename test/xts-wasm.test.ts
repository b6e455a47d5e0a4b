// XTS's tweak work in WebAssembly (drivers/crypto/xts-wasm.ts, xts.wat): the module is
// what xts.wat assembles to, it loads here, and XTS with it and without it (modes.ts's
// JavaScript loops) equals OpenSSL's XTS run one sector at a time, for 512- and
// 4096-byte sectors, runs longer than the module's chunk, and ciphers OpenSSL has not
// (Serpent: the block cipher works on the module's memory).
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import wabtInit from 'wabt';
import { makeSectorCipher } from '../drivers/crypto/modes.js';
import { setXtsWasm, XTS_CHUNK, XTS_WASM, xtsWasm } from '../drivers/crypto/xts-wasm.js';

const WAT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../drivers/crypto/xts.wat');

/** OpenSSL's aes-N-xts over each sector alone, the IV the plain64 number of its first 512-byte sector. */
function opensslXts(key: Buffer, data: Buffer, firstSector: number, sectorSize: number, encrypt: boolean): Buffer {
  const out = Buffer.alloc(data.length);
  const alg = key.length === 32 ? 'aes-128-xts' : 'aes-256-xts';
  for (let s = 0; s * sectorSize < data.length; s++) {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt((firstSector + s) * (sectorSize / 512)));
    const c = encrypt ? crypto.createCipheriv(alg, key, iv) : crypto.createDecipheriv(alg, key, iv);
    Buffer.concat([c.update(data.subarray(s * sectorSize, (s + 1) * sectorSize)), c.final()]).copy(out, s * sectorSize);
  }
  return out;
}

describe('XTS in WebAssembly (xts-wasm.ts)', () => {
  after(() => setXtsWasm(undefined));

  it('is what xts.wat assembles to (wabt), and loads and passes its self-test here', async () => {
    const wabt = await wabtInit();
    const mod = wabt.parseWat('xts.wat', fs.readFileSync(WAT, 'utf8'), { simd: true });
    try {
      expect(Buffer.from(mod.toBinary({}).buffer).toString('base64'), 'XTS_WASM is stale: assemble xts.wat again').to.equal(XTS_WASM);
    } finally {
      mod.destroy();
    }
    setXtsWasm(undefined);
    expect(xtsWasm(), 'the module does not run on this machine').to.not.equal(undefined);
  });

  for (const wasm of [true, false]) {
    for (const [keyLen, sectorSize, bytes] of [
      [64, 512, 9 * 512],
      [32, 512, XTS_CHUNK + 7 * 512],
      [64, 4096, 2 * XTS_CHUNK + 3 * 4096],
      [64, 4096, 4096],
    ] as const) {
      it(`${wasm ? 'with' : 'without'} the module: aes-${keyLen * 4}-xts, ${sectorSize}-byte sectors, ${bytes} bytes, equals OpenSSL sector by sector both ways`, () => {
        setXtsWasm(wasm);
        expect(xtsWasm() !== undefined).to.equal(wasm);
        const key = crypto.randomBytes(keyLen);
        const data = crypto.randomBytes(bytes);
        const first = Math.floor(2 ** 32 / (sectorSize / 512)) - 2; // across the 32-bit boundary
        const sc = makeSectorCipher({ cipher: 'aes', mode: 'xts', ivgen: 'plain64', key, sectorSize, ivStep: sectorSize / 512 });
        const buf = Buffer.from(data);
        sc.encrypt(buf, first);
        expect(buf.equals(opensslXts(key, data, first, sectorSize, true)), 'encrypt').to.equal(true);
        sc.decrypt(buf, first);
        expect(buf.equals(data), 'decrypt of the encryption').to.equal(true);
        const plain = Buffer.from(data);
        sc.decrypt(plain, first);
        expect(plain.equals(opensslXts(key, data, first, sectorSize, false)), 'decrypt').to.equal(true);
      });
    }
  }

  it('serpent-xts-plain64 (a JavaScript block cipher over the module memory) gives the same bytes with the module and without', () => {
    const key = crypto.randomBytes(64);
    const data = crypto.randomBytes(XTS_CHUNK + 3 * 512);
    const run = (wasm: boolean, encrypt: boolean): Buffer => {
      setXtsWasm(wasm);
      const sc = makeSectorCipher({ cipher: 'serpent', mode: 'xts', ivgen: 'plain64', key });
      const b = Buffer.from(data);
      if (encrypt) sc.encrypt(b, 77);
      else sc.decrypt(b, 77);
      return b;
    };
    expect(run(true, true).equals(run(false, true))).to.equal(true);
    expect(run(true, false).equals(run(false, false))).to.equal(true);
  });
});
