// The crypto module against published test vectors and against OpenSSL.
import { expect } from 'chai';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { Serpent } from '../drivers/crypto/serpent.js';
import { Twofish } from '../drivers/crypto/twofish.js';
import { Cast5 } from '../drivers/crypto/cast5.js';
import type { BlockCipher } from '../drivers/crypto/cipher.js';
import { makeSectorCipher, type CipherMode } from '../drivers/crypto/modes.js';
import { afMerge, afSplit, pbkdf2 } from '../drivers/crypto/kdf.js';
import { parseLuks2Encryption, parseModeSpec } from '../drivers/crypto/spec.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
/** The Serpent submission's own files print blocks and keys byte-reversed. */
const rev = (s: string): Buffer => Buffer.from(hex(s).reverse());

interface Vector {
  name: string;
  make: (key: Uint8Array) => BlockCipher;
  key: Buffer;
  plain: Buffer;
  cipher: Buffer;
}

const vectors: Vector[] = [
  // Twofish paper, appendix A.1 (the first test of each key size).
  { name: 'Twofish-128', make: (k) => new Twofish(k), key: hex('00'.repeat(16)), plain: hex('00'.repeat(16)), cipher: hex('9F589F5CF6122C32B6BFEC2F2AE8C35A') },
  { name: 'Twofish-192', make: (k) => new Twofish(k), key: hex('0123456789ABCDEFFEDCBA98765432100011223344556677'), plain: hex('00'.repeat(16)), cipher: hex('CFD1D2E5A9BE9CDF501F13B892BD2248') },
  { name: 'Twofish-256', make: (k) => new Twofish(k), key: hex('0123456789ABCDEFFEDCBA987654321000112233445566778899AABBCCDDEEFF'), plain: hex('00'.repeat(16)), cipher: hex('37527BE0052334B89F0CFCCAE87CFA20') },
  // RFC 2144 appendix B.1.
  { name: 'CAST5-128', make: (k) => new Cast5(k), key: hex('0123456712345678234567893456789A'), plain: hex('0123456789ABCDEF'), cipher: hex('238B4FE5847E44B2') },
  { name: 'CAST5-80', make: (k) => new Cast5(k), key: hex('01234567123456782345'), plain: hex('0123456789ABCDEF'), cipher: hex('EB6A711A2C02271B') },
  { name: 'CAST5-40', make: (k) => new Cast5(k), key: hex('0123456712'), plain: hex('0123456789ABCDEF'), cipher: hex('7AC816D16E9B302E') },
  // Serpent submission ecb_vk.txt / ecb_vt.txt, first entries (byte-reversed as nettle's test suite reads them).
  { name: 'Serpent-128 vk1', make: (k) => new Serpent(k), key: rev('80000000000000000000000000000000'), plain: hex('00'.repeat(16)), cipher: rev('49AFBFAD9D5A34052CD8FFA5986BD2DD') },
  { name: 'Serpent-128 vt1', make: (k) => new Serpent(k), key: hex('00'.repeat(16)), plain: rev('80000000000000000000000000000000'), cipher: rev('10B5FFB720B8CB9002A1142B0BA2E94A') },
];

describe('crypto: block ciphers against published vectors', () => {
  for (const v of vectors) {
    it(`${v.name} encrypts and decrypts the published block`, () => {
      const c = v.make(v.key);
      const out = new Uint8Array(v.plain.length);
      c.encrypt(v.plain, out);
      expect(Buffer.from(out).toString('hex')).to.equal(v.cipher.toString('hex'));
      const back = new Uint8Array(out.length);
      c.decrypt(out, back);
      expect(Buffer.from(back).toString('hex')).to.equal(v.plain.toString('hex'));
    });
  }

  it('Serpent-256 in CBC gives nettle\'s published ciphertext', () => {
    const c = new Serpent(hex('0123456789ABCDEF FEDCBA9876543210 0011223344556677 8899AABBCCDDEEFF'));
    const iv = hex('0011223344556677 8899AABBCCDDEEFF');
    const plain = hex('0000000000000000 0000000000000000 1111111111111111 1111111111111111');
    const out = Buffer.from(plain);
    let prev: Uint8Array = iv;
    for (let off = 0; off < out.length; off += 16) {
      const b = out.subarray(off, off + 16);
      for (let i = 0; i < 16; i++) b[i]! ^= prev[i]!;
      c.encrypt(b, b);
      prev = b;
    }
    expect(out.toString('hex')).to.equal('c170ed586cfda8fe084f01ef04475883b9eb25819813023f2938e97bdf4597c8');
  });

  it('Serpent, Twofish and CAST5 decrypt what they encrypt over many blocks and keys', () => {
    for (const [make, sizes] of [
      [(k: Uint8Array) => new Serpent(k), [16, 24, 32]],
      [(k: Uint8Array) => new Twofish(k), [16, 24, 32]],
      [(k: Uint8Array) => new Cast5(k), [16]],
    ] as const) {
      for (const n of sizes) {
        const c = make(crypto.randomBytes(n));
        const data = crypto.randomBytes(4096);
        const enc = new Uint8Array(data.length);
        c.encrypt(data, enc);
        expect(Buffer.from(enc).equals(data)).to.equal(false);
        c.decrypt(enc, enc);
        expect(Buffer.from(enc).equals(data)).to.equal(true);
      }
    }
  });

  it('CAST5 matches OpenSSL\'s cast5-ecb (legacy provider) on random keys and data', () => {
    const cases = Array.from({ length: 8 }, () => ({ key: crypto.randomBytes(16).toString('hex'), data: crypto.randomBytes(64).toString('hex') }));
    const script = `const c=require('crypto');const cases=JSON.parse(process.argv[1]);console.log(JSON.stringify(cases.map(x=>{const e=c.createCipheriv('cast5-ecb',Buffer.from(x.key,'hex'),null).setAutoPadding(false);return Buffer.concat([e.update(Buffer.from(x.data,'hex')),e.final()]).toString('hex')})))`;
    const want = JSON.parse(execFileSync(process.execPath, ['--openssl-legacy-provider', '-e', script, JSON.stringify(cases)]).toString()) as string[];
    cases.forEach((x, i) => {
      const out = new Uint8Array(64);
      new Cast5(hex(x.key)).encrypt(hex(x.data), out);
      expect(Buffer.from(out).toString('hex'), `case ${i}`).to.equal(want[i]);
    });
  });
});

describe('crypto: sector modes against OpenSSL', () => {
  const sectors = 9;
  const first = 2 ** 32 - 3; // crosses the 32-bit boundary of plain vs plain64
  const native: { mode: CipherMode; keyLen: number; openssl: string }[] = [
    { mode: 'xts', keyLen: 32, openssl: 'aes-128-xts' },
    { mode: 'xts', keyLen: 64, openssl: 'aes-256-xts' },
    { mode: 'cbc', keyLen: 16, openssl: 'aes-128-cbc' },
    { mode: 'cbc', keyLen: 32, openssl: 'aes-256-cbc' },
    { mode: 'ctr', keyLen: 24, openssl: 'aes-192-ctr' },
    { mode: 'ecb', keyLen: 32, openssl: 'aes-256-ecb' },
  ];
  for (const n of native) {
    it(`aes ${n.mode}-plain64 with a ${n.keyLen * 8}-bit key equals OpenSSL ${n.openssl} per sector, on 32-bit words and on bytes at an odd address`, () => {
      const key = crypto.randomBytes(n.keyLen);
      const data = crypto.randomBytes(512 * sectors);
      const want = Buffer.alloc(data.length);
      for (let s = 0; s < sectors; s++) {
        const iv = Buffer.alloc(16);
        iv.writeBigUInt64LE(BigInt(first + s));
        const c = crypto.createCipheriv(n.openssl, key, n.mode === 'ecb' ? null : iv).setAutoPadding(false);
        Buffer.concat([c.update(data.subarray(s * 512, (s + 1) * 512)), c.final()]).copy(want, s * 512);
      }
      const sc = makeSectorCipher({ cipher: 'aes', mode: n.mode, ivgen: 'plain64', key });
      for (const at of [0, 1]) {
        const buf = new Uint8Array(data.length + at).subarray(at);
        buf.set(data);
        sc.encrypt(buf, first);
        expect(Buffer.from(buf).equals(want), `at ${at}`).to.equal(true);
        sc.decrypt(buf, first);
        expect(Buffer.from(buf).equals(data), `at ${at}`).to.equal(true);
      }
    });
  }

  it('plain truncates the sector number to 32 bits, plain64 does not', () => {
    const key = crypto.randomBytes(32);
    const data = crypto.randomBytes(512);
    const a = Uint8Array.from(data);
    const b = Uint8Array.from(data);
    makeSectorCipher({ cipher: 'aes', mode: 'cbc', ivgen: 'plain', key }).encrypt(a, 2 ** 32 + 5);
    makeSectorCipher({ cipher: 'aes', mode: 'cbc', ivgen: 'plain64', key }).encrypt(b, 5);
    expect(Buffer.from(a).equals(Buffer.from(b))).to.equal(true);
  });

  it('essiv encrypts the sector number under the hash of the key (aes-128 with sha256 uses aes-256)', () => {
    const key = crypto.randomBytes(16);
    const data = crypto.randomBytes(512);
    const salt = crypto.createHash('sha256').update(key).digest();
    const ivPlain = Buffer.alloc(16);
    ivPlain.writeBigUInt64LE(77n);
    const e = crypto.createCipheriv('aes-256-ecb', salt, null).setAutoPadding(false);
    const iv = Buffer.concat([e.update(ivPlain), e.final()]);
    const c = crypto.createCipheriv('aes-128-cbc', key, iv).setAutoPadding(false);
    const want = Buffer.concat([c.update(data), c.final()]);
    const buf = Uint8Array.from(data);
    makeSectorCipher({ cipher: 'aes', mode: 'cbc', ivgen: 'essiv', ivHash: 'sha256', key }).encrypt(buf, 77);
    expect(Buffer.from(buf).equals(want)).to.equal(true);
  });

  it('aes-cbc over 4096-byte sectors and Serpent-cbc over a run of sectors equal the same cipher sector by sector (CAST5: 8-byte blocks, plain64)', () => {
    for (const [cipher, keyLen, sectorSize] of [['aes', 32, 4096], ['serpent', 32, 512], ['cast5', 16, 512]] as const) {
      const key = crypto.randomBytes(keyLen);
      const sc = makeSectorCipher({ cipher, mode: 'cbc', ivgen: cipher === 'cast5' ? 'plain64' : 'essiv', ivHash: 'sha256', key, sectorSize });
      const data = crypto.randomBytes(sectorSize * 5);
      const run = Uint8Array.from(data);
      sc.encrypt(run, 40);
      for (let s = 0; s < 5; s++) {
        const one = Uint8Array.from(data.subarray(s * sectorSize, (s + 1) * sectorSize));
        sc.encrypt(one, 40 + s);
        expect(Buffer.from(one).equals(Buffer.from(run.subarray(s * sectorSize, (s + 1) * sectorSize))), `${cipher} sector ${s}`).to.equal(true);
      }
      if (cipher === 'aes') {
        // One sector against OpenSSL's CBC with essiv's IV.
        const salt = crypto.createHash('sha256').update(key).digest();
        const ivPlain = Buffer.alloc(16);
        ivPlain.writeBigUInt64LE(40n);
        const iv = crypto.createCipheriv('aes-256-ecb', salt, null).setAutoPadding(false).update(ivPlain);
        const want = crypto.createCipheriv('aes-256-cbc', key, iv).setAutoPadding(false).update(data.subarray(0, sectorSize));
        expect(Buffer.from(run.subarray(0, sectorSize)).equals(want), 'aes against OpenSSL').to.equal(true);
      }
      sc.decrypt(run, 40);
      expect(Buffer.from(run).equals(data), cipher).to.equal(true);
    }
  });

  it('LUKS2 4096-byte sectors take IVs counted in 512-byte sectors', () => {
    const key = crypto.randomBytes(64);
    const data = crypto.randomBytes(8192);
    const want = Buffer.alloc(data.length);
    for (let s = 0; s < 2; s++) {
      const iv = Buffer.alloc(16);
      iv.writeBigUInt64LE(BigInt((3 + s) * 8));
      const c = crypto.createCipheriv('aes-256-xts', key, iv);
      Buffer.concat([c.update(data.subarray(s * 4096, (s + 1) * 4096)), c.final()]).copy(want, s * 4096);
    }
    const buf = Uint8Array.from(data);
    makeSectorCipher({ cipher: 'aes', mode: 'xts', ivgen: 'plain64', key, sectorSize: 4096, ivStep: 8 }).encrypt(buf, 3);
    expect(Buffer.from(buf).equals(want)).to.equal(true);
  });

  it('every mode round-trips with every cipher family', () => {
    for (const [cipher, keyLen] of [['serpent', 32], ['twofish', 24], ['cast5', 16], ['aes', 16], ['camellia', 32], ['sm4', 16]] as const) {
      for (const mode of ['xts', 'cbc', 'ecb', 'ctr'] as const) {
        if (mode === 'xts' && cipher === 'cast5') continue;
        const key = crypto.randomBytes(mode === 'xts' ? 2 * keyLen : keyLen);
        const sc = makeSectorCipher({ cipher, mode, ivgen: 'plain64', key });
        const data = crypto.randomBytes(2048);
        const buf = Uint8Array.from(data);
        sc.encrypt(buf, 11);
        sc.decrypt(buf, 11);
        expect(Buffer.from(buf).equals(data), `${cipher}-${mode}`).to.equal(true);
      }
    }
  });

  it('refuses xts over a 64-bit block cipher', () => {
    expect(() => makeSectorCipher({ cipher: 'cast5', mode: 'xts', ivgen: 'plain64', key: crypto.randomBytes(32) })).to.throw(/128-bit block/);
  });
});

describe('crypto: key derivation and anti-forensic split', () => {
  it('PBKDF2-HMAC-SHA1 gives RFC 6070\'s vectors', async () => {
    expect(Buffer.from(await pbkdf2('sha1', Buffer.from('password'), Buffer.from('salt'), 1, 20)).toString('hex')).to.equal('0c60c80f961f0e71f3a9b524af6012062fe037a6');
    expect(Buffer.from(await pbkdf2('sha1', Buffer.from('password'), Buffer.from('salt'), 4096, 20)).toString('hex')).to.equal('4b007901b765489abead49d926f721d065a429c1');
  });

  it('PBKDF2 takes every hash QEMU offers', async () => {
    for (const h of ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160']) {
      expect((await pbkdf2(h, Buffer.from('pw'), Buffer.from('salt'), 2, 40)).length, h).to.equal(40);
    }
  });

  it('AF-merge undoes AF-split for key sizes that are not a multiple of the digest', () => {
    for (const hash of ['sha1', 'sha256', 'sha512', 'ripemd160']) {
      for (const n of [16, 24, 32, 48, 64]) {
        const key = crypto.randomBytes(n);
        const split = afSplit(hash, key, 4000);
        expect(Buffer.from(afMerge(hash, split, n, 4000)).equals(key), `${hash}/${n}`).to.equal(true);
      }
    }
  });

  it('parses the cipher mode strings of QEMU, cryptsetup and LUKS2', () => {
    expect(parseModeSpec('aes', 'xts-plain64')).to.deep.equal({ cipher: 'aes', mode: 'xts', ivgen: 'plain64', ivHash: undefined });
    expect(parseModeSpec('aes', 'cbc-essiv:sha256')).to.deep.equal({ cipher: 'aes', mode: 'cbc', ivgen: 'essiv', ivHash: 'sha256' });
    expect(parseModeSpec('twofish', 'xts-plain64:sha1')).to.deep.include({ ivgen: 'plain64', ivHash: undefined });
    expect(parseModeSpec('aes', 'ecb')).to.deep.include({ mode: 'ecb' });
    expect(parseLuks2Encryption('serpent-xts-plain64')).to.deep.include({ cipher: 'serpent', mode: 'xts' });
    expect(parseModeSpec('blowfish', 'cbc-plain')).to.be.a('string');
    expect(parseModeSpec('aes', 'gcm-random')).to.be.a('string');
    expect(parseModeSpec('aes', 'cbc-essiv')).to.be.a('string');
  });
});
