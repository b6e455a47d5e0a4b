// ECB in place on Node's own OpenSSL (drivers/crypto/evp.ts): it loads here; for every
// cipher family OpenSSL runs for us (aes of three key sizes, camellia, sm4) it gives
// Node's crypto's bytes, in place, from one buffer to another, at odd offsets and
// across buffers of a pooled Buffer, and for a dst that overlaps src; the fallback
// (Node's update() in pieces) gives the same; the sector modes give the same bytes with
// EVP and without, with the WebAssembly module and without.
import { expect } from 'chai';
import crypto from 'node:crypto';
import { makeBlockCipher } from '../drivers/crypto/cipher.js';
import { EvpEcb, evpEcb, setEvp } from '../drivers/crypto/evp.js';
import { makeSectorCipher, type SectorCipherSpec } from '../drivers/crypto/modes.js';
import { setModesWasm } from '../drivers/crypto/modes-wasm.js';
import { writeEncrypted } from '../drivers/util/write-encrypted.js';

const FAMILIES: [family: string, openssl: (bits: number) => string, keyLens: number[]][] = [
  ['aes', (b) => `aes-${b}-ecb`, [16, 24, 32]],
  ['camellia', (b) => `camellia-${b}-ecb`, [16, 24, 32]],
  ['sm4', () => 'sm4-ecb', [16]],
];

function nodeEcb(alg: string, key: Buffer, data: Buffer, encrypt: boolean): Buffer {
  const c = (encrypt ? crypto.createCipheriv(alg, key, null) : crypto.createDecipheriv(alg, key, null)).setAutoPadding(false);
  return Buffer.concat([c.update(data), c.final()]);
}

describe('ECB in place through EVP (evp.ts)', () => {
  afterEach(() => {
    setEvp(undefined);
    setModesWasm(undefined);
  });

  it('loads here (Node exports OpenSSL; the FIPS-197 answer comes out)', () => {
    setEvp(undefined);
    expect(evpEcb('aes-256-ecb', Buffer.alloc(32)), 'EVP does not run here').to.be.instanceOf(EvpEcb);
  });

  for (const evp of [true, false]) {
    for (const [family, name, keyLens] of FAMILIES) {
      for (const keyLen of keyLens) {
        it(`${evp ? 'EVP' : "Node's update() in pieces"}: ${name(keyLen * 8)} equals Node's crypto in place, apart, at odd offsets and over 64 KiB`, () => {
          setEvp(evp);
          const key = crypto.randomBytes(keyLen);
          const c = makeBlockCipher(family, key);
          expect(c instanceof EvpEcb).to.equal(evp);
          for (const len of [16, 4096, 65536 + 48, 1024 * 1024 + 16 * 3]) {
            const plain = crypto.randomBytes(len);
            const want = nodeEcb(name(keyLen * 8), key, plain, true);
            // In place, in a buffer at an odd offset of its ArrayBuffer.
            const host = Buffer.alloc(len + 3);
            const inPlace = host.subarray(3);
            plain.copy(inPlace);
            c.encrypt(inPlace, inPlace);
            expect(inPlace.equals(want), `encrypt in place, ${len} bytes`).to.equal(true);
            c.decrypt(inPlace, inPlace);
            expect(inPlace.equals(plain), `decrypt in place, ${len} bytes`).to.equal(true);
            // Apart, into a longer dst: only src.length bytes are written.
            const out = Buffer.alloc(len + 16, 0xee);
            c.encrypt(plain, out);
            expect(out.subarray(0, len).equals(want)).to.equal(true);
            expect(out.subarray(len).equals(Buffer.alloc(16, 0xee)), 'wrote past src.length').to.equal(true);
            const back = Buffer.alloc(len);
            c.decrypt(want, back);
            expect(back.equals(plain)).to.equal(true);
          }
        });
      }
    }
  }

  it('a dst that overlaps src (behind it) gets the whole of src enciphered', () => {
    setEvp(true);
    const key = crypto.randomBytes(32);
    const c = makeBlockCipher('aes', key);
    const plain = crypto.randomBytes(4096);
    const want = nodeEcb('aes-256-ecb', key, plain, true);
    const buf = Buffer.alloc(4096 + 32);
    plain.copy(buf, 32);
    c.encrypt(buf.subarray(32), buf.subarray(0, 4096));
    expect(buf.subarray(0, 4096).equals(want)).to.equal(true);
  });

  it('refuses a part block and a dst shorter than src', () => {
    setEvp(true);
    const c = makeBlockCipher('aes', crypto.randomBytes(16));
    expect(() => c.encrypt(Buffer.alloc(20), Buffer.alloc(20))).to.throw(RangeError);
    expect(() => c.encrypt(Buffer.alloc(32), Buffer.alloc(16))).to.throw(RangeError);
  });

  it('TSMOUNT_EVP=0 leaves it out', () => {
    const was = process.env.TSMOUNT_EVP;
    process.env.TSMOUNT_EVP = '0';
    try {
      setEvp(undefined);
      expect(evpEcb('aes-256-ecb', Buffer.alloc(32))).to.equal(undefined);
      expect(makeBlockCipher('aes', Buffer.alloc(32)) instanceof EvpEcb).to.equal(false);
    } finally {
      if (was === undefined) delete process.env.TSMOUNT_EVP;
      else process.env.TSMOUNT_EVP = was;
    }
  });

  const specs: Omit<SectorCipherSpec, 'key'>[] = [
    { cipher: 'aes', mode: 'xts', ivgen: 'plain64' },
    { cipher: 'aes', mode: 'xts', ivgen: 'plain64', sectorSize: 4096, ivStep: 8 },
    { cipher: 'aes', mode: 'cbc', ivgen: 'essiv', ivHash: 'sha256' },
    { cipher: 'aes', mode: 'cbc', ivgen: 'plain64' },
    { cipher: 'aes', mode: 'ctr', ivgen: 'plain64' },
    { cipher: 'aes', mode: 'ecb', ivgen: 'plain64' },
    { cipher: 'camellia', mode: 'xts', ivgen: 'plain64' },
  ];
  for (const spec of specs) {
    it(`${spec.cipher}-${spec.mode}-${spec.ivgen}${spec.sectorSize ? ` (${spec.sectorSize}-byte sectors)` : ''}: the same bytes with EVP and without, with the WebAssembly module and without`, () => {
      const key = crypto.randomBytes(spec.mode === 'xts' ? 64 : 32);
      const ss = spec.sectorSize ?? 512;
      const plain = crypto.randomBytes(ss * 300);
      let first: Buffer | undefined;
      for (const evp of [true, false]) {
        for (const wasm of [true, false]) {
          setEvp(evp);
          setModesWasm(wasm);
          const c = makeSectorCipher({ ...spec, key });
          const data = Buffer.from(plain);
          c.encrypt(data, 0x1_0000_0000 / ss - 7);
          if (first) expect(data.equals(first), `evp ${evp}, wasm ${wasm}`).to.equal(true);
          else first = Buffer.from(data);
          c.decrypt(data, 0x1_0000_0000 / ss - 7);
          expect(data.equals(plain)).to.equal(true);
        }
      }
    });
  }
});

describe('writeEncrypted: ciphertext in buffers kept from write to write (drivers/util/write-encrypted.ts)', () => {
  const key = crypto.randomBytes(64);
  const spec = { cipher: 'aes', mode: 'xts', ivgen: 'plain64', key } as const;

  it('gives writes in flight at once buffers of their own, each the ciphertext of its data, and leaves src alone', async () => {
    const c = makeSectorCipher(spec);
    const srcs = [0, 1, 2, 3, 4, 5].map((i) => Buffer.alloc(4096 * (i + 1), i + 1));
    const seen: Uint8Array[] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const writes = srcs.map((src, i) =>
      writeEncrypted(c, src, i * 100, async (buf) => {
        seen[i] = buf;
        await gate;
      }),
    );
    release();
    await Promise.all(writes);
    srcs.forEach((src, i) => {
      expect(src.equals(Buffer.alloc(4096 * (i + 1), i + 1)), 'src changed').to.equal(true);
      const want = Buffer.from(src);
      makeSectorCipher(spec).encrypt(want, i * 100);
      expect(Buffer.from(seen[i]!).equals(want), `write ${i}`).to.equal(true);
    });
  });

  it('uses a buffer again after its write resolved, never after one failed', async () => {
    const c = makeSectorCipher(spec);
    const big = 3 * 1024 * 1024 + 512; // larger than any buffer kept so far: a new one
    let first: ArrayBufferLike | undefined;
    await writeEncrypted(c, Buffer.alloc(big, 1), 0, async (buf) => void (first = buf.buffer));
    let again: ArrayBufferLike | undefined;
    await writeEncrypted(c, Buffer.alloc(big, 2), 0, async (buf) => void (again = buf.buffer));
    expect(again).to.equal(first);
    const failing = writeEncrypted(c, Buffer.alloc(big, 3), 0, async (buf) => {
      again = buf.buffer;
      throw new Error('the disk went away');
    });
    await failing.then(() => expect.fail('resolved'), (err: Error) => expect(err.message).to.equal('the disk went away'));
    expect(again).to.equal(first);
    let after: ArrayBufferLike | undefined;
    await writeEncrypted(c, Buffer.alloc(big, 4), 0, async (buf) => void (after = buf.buffer));
    expect(after, 'the failed write\'s buffer was used again').to.not.equal(first);
  });
});

