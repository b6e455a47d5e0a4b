// The decoders dmg chunks need, on their own: LZFSE (every block kind: raw, LZVN, v1
// and v2 LZFSE), ADC and bzip2 through drivers/util/decompress.ts; damaged streams
// throw a clean error, never hang or write past their output.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { lzfseDecode, LzfseError, readV2Header } from '../../drivers/util/lzfse.js';
import { adcDecode, AdcError } from '../../drivers/util/adc.js';
import { decompress } from '../../drivers/util/decompress.js';
import { CorruptImageError } from '../../drivers/errors.js';
import { adcEncode, encodeChunk, lzfseEncode, sampleData } from '../helpers/udif.js';
import { rng } from '../helpers/corrupt.js';

const SAMPLE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../../shared/samples/dmg/compression-lzfse.dmg');

/** The LZFSE streams in a file: from each first block magic to its end-of-stream block, with the size they decode to. */
function lzfseStreams(file: Buffer): { stream: Buffer; size: number }[] {
  const out: { stream: Buffer; size: number }[] = [];
  let at = 0;
  for (;;) {
    const next = Math.min(...['bvx2', 'bvxn', 'bvx-', 'bvx1'].map((m) => file.indexOf(m, at, 'latin1')).filter((i) => i >= 0));
    if (!Number.isFinite(next)) break;
    let p = next;
    let size = 0;
    for (;;) {
      const magic = file.toString('latin1', p, p + 4);
      if (magic === 'bvx$') {
        p += 4;
        break;
      }
      size += file.readUInt32LE(p + 4);
      if (magic === 'bvxn') p += 12 + file.readUInt32LE(p + 8);
      else if (magic === 'bvx-') p += 8 + file.readUInt32LE(p + 4);
      else if (magic === 'bvx2') {
        const h = readV2Header(file, p);
        p += h.headerSize + h.nLiteralPayload + h.nLmdPayload;
      } else throw new Error(`unexpected block ${magic}`);
    }
    out.push({ stream: file.subarray(next, p), size });
    at = p;
  }
  return out;
}

/** The same stream with every v2 block header rewritten as a v1 header (uncompressed tables). */
function asV1(stream: Buffer): Buffer {
  const parts: Buffer[] = [];
  let p = 0;
  for (;;) {
    const magic = stream.toString('latin1', p, p + 4);
    if (magic === 'bvx$') return Buffer.concat([...parts, stream.subarray(p)]);
    if (magic === 'bvxn') {
      const n = 12 + stream.readUInt32LE(p + 8);
      parts.push(stream.subarray(p, p + n));
      p += n;
      continue;
    }
    expect(magic).to.equal('bvx2');
    const h = readV2Header(stream, p);
    const v1 = Buffer.alloc(772);
    v1.write('bvx1', 0, 'latin1');
    v1.writeUInt32LE(stream.readUInt32LE(p + 4), 4);
    v1.writeUInt32LE(h.nLiteralPayload + h.nLmdPayload, 8);
    v1.writeUInt32LE(h.nLiterals, 12);
    v1.writeUInt32LE(h.nMatches, 16);
    v1.writeUInt32LE(h.nLiteralPayload, 20);
    v1.writeUInt32LE(h.nLmdPayload, 24);
    v1.writeInt32LE(h.literalBits, 28);
    h.literalState.forEach((s, i) => v1.writeUInt16LE(s, 32 + 2 * i));
    v1.writeInt32LE(h.lmdBits, 40);
    v1.writeUInt16LE(h.lState, 44);
    v1.writeUInt16LE(h.mState, 46);
    v1.writeUInt16LE(h.dState, 48);
    h.freq.forEach((f, i) => v1.writeUInt16LE(f, 50 + 2 * i));
    const payload = h.nLiteralPayload + h.nLmdPayload;
    parts.push(v1, stream.subarray(p + h.headerSize, p + h.headerSize + payload));
    p += h.headerSize + payload;
  }
}

const md5 = (b: Uint8Array): string => crypto.createHash('md5').update(b).digest('hex');

describe('LZFSE decoder (unit)', function () {
  it('decodes raw (bvx-) and LZVN (bvxn) blocks', function () {
    const data = sampleData(300_000, 5);
    const out = Buffer.alloc(data.length);
    lzfseDecode(lzfseEncode(data), out);
    expect(out.equals(data)).to.equal(true);
  });

  it('reads every LZVN opcode kind: literals, small, medium, large and previous distances, nop, matches only', function () {
    const ops = [
      [0xe4, ...Buffer.from('abcd')], // sml_l: "abcd"
      [0xa0, 18, 0], // med_d: L=0, M=5, D=4: "abcda"
      [0x47, 2, 0, 0x78], // lrg_d: L=1 "x", M=3, D=2: "axa"
      [0x0e], // nop
      [0x46, 0x79], // pre_d: L=1 "y", M=3, D=2 again: "aya"
      [0xf2], // sml_m: M=2, D=2: "ya"
      [0x01, 0x03], // sml_d: L=0, M=3, D=(1<<8)|3=259: reaches before the start
    ];
    const block = (body: number[]): Buffer => {
      const payload = Buffer.from([...body, 0x06, 0, 0, 0, 0, 0, 0, 0]);
      const h = Buffer.alloc(12);
      h.write('bvxn', 0, 'latin1');
      h.writeUInt32LE(0, 4);
      h.writeUInt32LE(payload.length, 8);
      return Buffer.concat([h, payload, Buffer.from('bvx$')]);
    };
    const want = 'abcdabcdaxaxayayaya';
    const good = block(ops.slice(0, 6).flat());
    good.writeUInt32LE(want.length, 4);
    const out = Buffer.alloc(want.length);
    lzfseDecode(good, out);
    expect(out.toString('latin1')).to.equal(want);
    const bad = block(ops.flat());
    bad.writeUInt32LE(want.length + 3, 4);
    expect(() => lzfseDecode(bad, Buffer.alloc(want.length + 3))).to.throw(LzfseError, /before the start/);
    const undef = block([0xe1, 0x61, 0x70]);
    undef.writeUInt32LE(1, 4);
    expect(() => lzfseDecode(undef, Buffer.alloc(1))).to.throw(LzfseError, /undefined/);
  });

  it('an empty stream decodes to nothing; a short one is corrupt, a long one too', function () {
    lzfseDecode(Buffer.from('bvx$'), Buffer.alloc(0));
    const data = sampleData(10_000, 6);
    const s = lzfseEncode(data);
    expect(() => lzfseDecode(s, Buffer.alloc(data.length + 1))).to.throw(LzfseError, /decodes to/);
    expect(() => lzfseDecode(s, Buffer.alloc(data.length - 1))).to.throw(LzfseError);
  });

  it('decodes the v2 (bvx2) blocks hdiutil wrote, and the same blocks rewritten with v1 (bvx1) headers', function () {
    if (!fs.existsSync(SAMPLE)) this.skip();
    const streams = lzfseStreams(fs.readFileSync(SAMPLE));
    expect(streams.length).to.be.at.least(1);
    for (const { stream, size } of streams) {
      const a = Buffer.alloc(size);
      lzfseDecode(stream, a);
      const b = Buffer.alloc(size);
      lzfseDecode(asV1(stream), b);
      expect(md5(b)).to.equal(md5(a));
    }
  });

  it('every truncation and many random flips of a real stream throw LzfseError or decode; none hangs or overruns', function () {
    const streams = fs.existsSync(SAMPLE) ? lzfseStreams(fs.readFileSync(SAMPLE)) : [];
    const inputs = [...streams, { stream: lzfseEncode(sampleData(100_000, 7)), size: 100_000 }];
    const rnd = rng(99);
    for (const { stream, size } of inputs) {
      const step = Math.max(1, Math.floor(stream.length / 200));
      for (let n = 0; n < stream.length; n += step) {
        expect(() => lzfseDecode(stream.subarray(0, n), Buffer.alloc(size)), `cut at ${n}`).to.throw(LzfseError);
      }
      for (let round = 0; round < 200; round++) {
        const bad = Buffer.from(stream);
        for (let k = 0; k < 1 + Math.floor(rnd() * 4); k++) bad[Math.floor(rnd() * bad.length)] = Math.floor(rnd() * 256);
        try {
          lzfseDecode(bad, Buffer.alloc(size));
        } catch (err) {
          expect(err, String((err as Error).stack)).to.be.instanceOf(LzfseError);
        }
      }
    }
  });
});

describe('ADC decoder (unit)', function () {
  it('reads literal runs and both copy codes, overlapping copies repeating their source', function () {
    // "abc" literal, 00LLLLOO: 3 bytes from 3 back ("abc"), 01LLLLLL: 4 bytes from 1 back ("cccc").
    const src = Buffer.from([0x82, 0x61, 0x62, 0x63, 0x00, 0x02, 0x40, 0x00, 0x00]);
    const dst = Buffer.alloc(10);
    expect(adcDecode(src, dst)).to.equal(10);
    expect(dst.toString('latin1')).to.equal('abcabccccc');
  });

  it('round-trips the test encoder, and rejects copies before the start, cut codes and overruns', function () {
    const data = sampleData(200_000, 3);
    const dst = Buffer.alloc(data.length);
    expect(adcDecode(adcEncode(data), dst)).to.equal(data.length);
    expect(dst.equals(data)).to.equal(true);
    expect(() => adcDecode(Buffer.from([0x00, 0x05]), Buffer.alloc(10))).to.throw(AdcError, /before the start/);
    expect(() => adcDecode(Buffer.from([0x85, 1, 2]), Buffer.alloc(10))).to.throw(AdcError, /cut off/);
    expect(() => adcDecode(Buffer.from([0x40, 0]), Buffer.alloc(10))).to.throw(AdcError, /cut off/);
    expect(() => adcDecode(Buffer.from([0x83, 1, 2, 3, 4]), Buffer.alloc(3))).to.throw(AdcError, /more than/);
  });
});

describe('decompress(): the dmg codecs', function () {
  const data = sampleData(256 * 1024, 11);
  const o = { size: data.length, exact: true, what: 'test.dmg: chunk' };
  for (const codec of ['zlib', 'bzip2', 'adc', 'lzfse'] as const) {
    it(`${codec}: decodes, and a damaged or short stream is a CorruptImageError naming the chunk`, async function () {
      const kind = codec;
      const enc = encodeChunk(kind, data);
      expect((await decompress(codec, enc, o)).equals(data)).to.equal(true);
      const bad = Buffer.from(enc);
      for (let i = 4; i < Math.min(bad.length, 64); i++) bad[i]! ^= 0x3c;
      const e1 = await decompress(codec, bad, o).then(() => undefined, (e: unknown) => e);
      expect(e1).to.be.instanceOf(CorruptImageError);
      expect((e1 as Error).message).to.contain('test.dmg: chunk');
      const e2 = await decompress(codec, enc.subarray(0, enc.length >> 1), o).then(() => undefined, (e: unknown) => e);
      expect(e2).to.be.instanceOf(CorruptImageError);
      // More output than the chunk holds is refused too.
      const e3 = await decompress(codec, enc, { ...o, size: data.length - 512 }).then(() => undefined, (e: unknown) => e);
      expect(e3).to.be.instanceOf(CorruptImageError);
    });
  }

  it('bzip2, ADC and LZFSE decode in a worker thread: the event loop keeps turning meanwhile', async function () {
    if (process.env.TSMOUNT_DECODE_WORKERS === '0') this.skip();
    const big = sampleData(2 * 1024 * 1024, 12);
    const enc = encodeChunk('bzip2', big);
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    const started = Date.now();
    try {
      const out = await decompress('bzip2', enc, { size: big.length, exact: true, what: 'test.dmg: chunk' });
      expect(out.equals(big)).to.equal(true);
    } finally {
      clearInterval(timer);
    }
    // Decoding 2 MiB of bzip2 in JavaScript takes hundreds of milliseconds; in-thread no tick would run.
    const elapsed = Date.now() - started;
    if (elapsed > 100) expect(ticks, `${elapsed} ms`).to.be.at.least(Math.floor(elapsed / 5 / 4));
  });
});
