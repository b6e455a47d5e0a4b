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
import { IVGENS, IvGenerator } from '../drivers/crypto/ivgen.js';
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

  it('decrypts ciphertext read straight into the module (staging, decryptStaged) as decrypt() does, and encrypts there as encrypt() does (encryptStaged): xts and cbc, plain64 and essiv, 512- and 4096-byte sectors, across 2^32; no staging for other modes, partial sectors or more than a chunk', () => {
    setModesWasm(true);
    const cases = [
      { cipher: 'aes', mode: 'xts', ivgen: 'plain64', keyLen: 64, sectorSize: 512 },
      { cipher: 'aes', mode: 'xts', ivgen: 'plain64', keyLen: 32, sectorSize: 4096 },
      { cipher: 'aes', mode: 'cbc', ivgen: 'essiv', keyLen: 32, sectorSize: 512 },
      { cipher: 'aes', mode: 'cbc', ivgen: 'plain', keyLen: 16, sectorSize: 512 },
      { cipher: 'serpent', mode: 'xts', ivgen: 'plain64be', keyLen: 64, sectorSize: 512 },
    ] as const;
    for (const c of cases) {
      const sc = makeSectorCipher({ cipher: c.cipher, mode: c.mode, ivgen: c.ivgen, ivHash: 'sha256', key: crypto.randomBytes(c.keyLen), sectorSize: c.sectorSize, ivStep: c.sectorSize / 512, ivOffset: 5 });
      for (const first of [0, 77, Math.floor(2 ** 32 / (c.sectorSize / 512)) - 3]) {
        for (const length of [c.sectorSize, 255 * 4096, CHUNK]) {
          const cipherText = crypto.randomBytes(length);
          const want = Buffer.from(cipherText);
          sc.decrypt(want, first);
          const stage = sc.staging(length);
          expect(stage, `${c.cipher}-${c.mode}-${c.ivgen}: staging of ${length}`).to.not.equal(undefined);
          stage!.set(cipherText);
          const out = Buffer.alloc(length + 100, 0xee);
          sc.decryptStaged(length, first, out, 50);
          expect(out.subarray(50, 50 + length).equals(want), `${c.cipher}-${c.mode}-${c.ivgen} at ${first}, ${length} bytes`).to.equal(true);
          expect(out[49]).to.equal(0xee);
          expect(out[50 + length]).to.equal(0xee);
          // And the other way: plaintext encrypted in the module, the plaintext left as it was.
          const plain = crypto.randomBytes(length);
          const sealed = Buffer.from(plain);
          sc.encrypt(sealed, first);
          const before = Buffer.from(plain);
          const staged = sc.encryptStaged(plain, first);
          expect(staged && Buffer.from(staged).equals(sealed), `${c.cipher}-${c.mode}-${c.ivgen}: encryptStaged at ${first}, ${length} bytes`).to.equal(true);
          expect(plain.equals(before)).to.equal(true);
        }
      }
      expect(sc.staging(CHUNK + c.sectorSize), 'more than a chunk').to.equal(undefined);
      expect(sc.staging(c.sectorSize + 16), 'part of a sector').to.equal(undefined);
    }
    for (const mode of ['ecb', 'ctr'] as const) {
      const sc = makeSectorCipher({ cipher: 'aes', mode, ivgen: 'plain64', key: crypto.randomBytes(32) });
      expect(sc.staging(4096), mode).to.equal(undefined);
      expect(sc.encryptStaged(Buffer.alloc(4096), 0), mode).to.equal(undefined);
    }
    setModesWasm(false);
    expect(makeSectorCipher({ cipher: 'aes', mode: 'xts', ivgen: 'plain64', key: crypto.randomBytes(64) }).staging(4096), 'without the module').to.equal(undefined);
  });

  it('writes IVs into a buffer of its own as generate() makes them (every generator, past 2^32 and 2^53 / 2)', () => {
    for (const kind of IVGENS) {
      for (const niv of [8, 16]) {
        if (kind === 'essiv' && niv === 8) continue;
        const g = new IvGenerator(kind, niv, niv === 16 ? 'aes' : 'cast5', crypto.randomBytes(32), 'sha256');
        for (const [first, step] of [[0, 1], [2 ** 32 - 5, 1], [2 ** 40 + 3, 8], [2 ** 52, 1]] as const) {
          const want = g.generate(first, 20, step);
          const into = new Uint8Array(new ArrayBuffer(20 * niv + 64), 32, 20 * niv + 16).fill(0xab);
          g.generateInto(into, first, 20, step);
          expect(Buffer.from(into.subarray(0, 20 * niv)).equals(Buffer.from(want)), `${kind}/${niv} at ${first}`).to.equal(true);
          expect(into[20 * niv], 'nothing written past the IVs').to.equal(0xab);
        }
      }
    }
  });
});
