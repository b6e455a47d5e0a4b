// The sector modes' work in WebAssembly (drivers/crypto/modes-wasm.ts, modes.wat): the
// module is what modes.wat assembles to, it loads here, and XTS and CBC (decryption's
// XORs, encryption's lanes) with it and without it (modes.ts's JavaScript loops) equal OpenSSL's XTS and CBC run one
// sector at a time, for 512- and 4096-byte sectors and runs longer than the module's
// chunk; ciphers OpenSSL has not (Serpent: the block cipher works on the module's
// memory) and ESSIV give the same bytes both ways.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import wabtInit from 'wabt';
import { makeSectorCipher } from '../drivers/crypto/modes.js';
import { CHUNK, MODES_WASM, modesWasm, setModesWasm } from '../drivers/crypto/modes-wasm.js';

const WAT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../drivers/crypto/modes.wat');

/** OpenSSL's aes-N-MODE over each sector alone, the IV the plain64 number of its first 512-byte sector. */
function openssl(mode: 'xts' | 'cbc', key: Buffer, data: Buffer, firstSector: number, sectorSize: number, encrypt: boolean): Buffer {
  const out = Buffer.alloc(data.length);
  const alg = `aes-${(mode === 'xts' ? key.length / 2 : key.length) * 8}-${mode}`;
  for (let s = 0; s * sectorSize < data.length; s++) {
    const iv = Buffer.alloc(16);
    iv.writeBigUInt64LE(BigInt((firstSector + s) * (sectorSize / 512)));
    const c = (encrypt ? crypto.createCipheriv(alg, key, iv) : crypto.createDecipheriv(alg, key, iv)).setAutoPadding(false);
    Buffer.concat([c.update(data.subarray(s * sectorSize, (s + 1) * sectorSize)), c.final()]).copy(out, s * sectorSize);
  }
  return out;
}

describe('sector modes in WebAssembly (modes-wasm.ts)', () => {
  after(() => setModesWasm(undefined));

  it('is what modes.wat assembles to (wabt), and loads and passes its self-test here', async () => {
    const wabt = await wabtInit();
    const mod = wabt.parseWat('modes.wat', fs.readFileSync(WAT, 'utf8'), { simd: true });
    try {
      expect(Buffer.from(mod.toBinary({}).buffer).toString('base64'), 'MODES_WASM is stale: assemble modes.wat again').to.equal(MODES_WASM);
    } finally {
      mod.destroy();
    }
    setModesWasm(undefined);
    expect(modesWasm(), 'the module does not run on this machine').to.not.equal(undefined);
  });

  for (const wasm of [true, false]) {
    for (const [mode, keyLen, sectorSize, bytes] of [
      ['xts', 64, 512, 9 * 512],
      ['xts', 32, 512, CHUNK + 7 * 512],
      ['xts', 64, 4096, 2 * CHUNK + 3 * 4096],
      ['xts', 64, 4096, 4096],
      ['cbc', 32, 512, 9 * 512],
      ['cbc', 16, 512, CHUNK + 7 * 512],
      ['cbc', 32, 4096, 2 * CHUNK + 3 * 4096],
    ] as const) {
      const bits = (mode === 'xts' ? keyLen / 2 : keyLen) * 8;
      it(`${wasm ? 'with' : 'without'} the module: aes-${bits}-${mode}, ${sectorSize}-byte sectors, ${bytes} bytes, equals OpenSSL sector by sector both ways`, () => {
        setModesWasm(wasm);
        expect(modesWasm() !== undefined).to.equal(wasm);
        const key = crypto.randomBytes(keyLen);
        const data = crypto.randomBytes(bytes);
        const first = Math.floor(2 ** 32 / (sectorSize / 512)) - 2; // across the 32-bit boundary
        const sc = makeSectorCipher({ cipher: 'aes', mode, ivgen: 'plain64', key, sectorSize, ivStep: sectorSize / 512 });
        const buf = Buffer.from(data);
        sc.encrypt(buf, first);
        expect(buf.equals(openssl(mode, key, data, first, sectorSize, true)), 'encrypt').to.equal(true);
        sc.decrypt(buf, first);
        expect(buf.equals(data), 'decrypt of the encryption').to.equal(true);
        const plain = Buffer.from(data);
        sc.decrypt(plain, first);
        expect(plain.equals(openssl(mode, key, data, first, sectorSize, false)), 'decrypt').to.equal(true);
      });
    }
  }

  for (const [cipher, mode, ivgen, keyLen] of [
    ['serpent', 'xts', 'plain64', 64],
    ['serpent', 'cbc', 'essiv', 32],
    ['aes', 'cbc', 'essiv', 32],
    ['cast5', 'cbc', 'plain64', 16],
  ] as const) {
    it(`${cipher}-${mode}-${ivgen} gives the same bytes with the module and without`, () => {
      const key = crypto.randomBytes(keyLen);
      const data = crypto.randomBytes(CHUNK + 3 * 512);
      const run = (wasm: boolean, encrypt: boolean): Buffer => {
        setModesWasm(wasm);
        const sc = makeSectorCipher({ cipher, mode, ivgen, ivHash: 'sha256', key });
        const b = Buffer.from(data);
        if (encrypt) sc.encrypt(b, 77);
        else sc.decrypt(b, 77);
        return b;
      };
      expect(run(true, true).equals(run(false, true))).to.equal(true);
      expect(run(true, false).equals(run(false, false))).to.equal(true);
    });
  }
});
