// libdeflate's fast path (drivers/util/libdeflate.ts): it decodes what zlib decodes,
// byte for byte, and refuses (for zlib to decide) what it cannot decode whole.
import { expect } from 'chai';
import crypto from 'node:crypto';
import zlib from 'node:zlib';
import { libdeflate } from '../drivers/util/libdeflate.js';
import { rawInflater, INFLATE_SLACK } from '../drivers/util/raw-inflater.js';

const KiB = 1024;

/** Raw deflate of `plain` ending with a sync flush and no final block, as QEMU may leave a qcow2 cluster. */
function withoutFinalBlock(plain: Buffer): Promise<Buffer> {
  return new Promise((resolve) => {
    const d = zlib.createDeflateRaw();
    const parts: Buffer[] = [];
    d.on('data', (c: Buffer) => parts.push(c));
    d.write(plain);
    d.flush(zlib.constants.Z_SYNC_FLUSH, () => resolve(Buffer.concat(parts)));
  });
}

describe('libdeflate fast path (libdeflate0 through koffi)', function () {
  before(function () {
    if (!libdeflate('raw')) {
      // eslint-disable-next-line no-console
      console.log('      skipped: libdeflate.so.0 does not load here (scripts/setup.sh installs libdeflate0)');
      this.skip();
    }
  });

  for (const kind of ['raw', 'zlib'] as const) {
    it(`${kind}: decodes clusters of text, random bytes and zeros as zlib does; refuses a damaged stream, one cut short and one larger than the room`, () => {
      const fast = libdeflate(kind)!;
      const slow = rawInflater(kind);
      const clusters = [Buffer.from(crypto.randomBytes(32 * KiB).toString('hex')), crypto.randomBytes(64 * KiB), Buffer.alloc(64 * KiB), Buffer.from(crypto.randomBytes(2 * KiB).toString('hex'))];
      for (const plain of clusters) {
        const packed = kind === 'raw' ? zlib.deflateRawSync(plain) : zlib.deflateSync(plain);
        const a = Buffer.alloc(plain.length + INFLATE_SLACK);
        const b = Buffer.alloc(plain.length + INFLATE_SLACK);
        expect(fast(packed, a)).to.equal(plain.length);
        expect(slow(packed, b)).to.equal(plain.length);
        expect(a.subarray(0, plain.length).equals(plain)).to.equal(true);
        // Followed by the rest of its last sector (a qcow2 cluster's stream is counted in sectors): the same.
        expect(fast(Buffer.concat([packed, crypto.randomBytes(511)]), a), 'with bytes after the stream').to.equal(plain.length);
        expect(a.subarray(0, plain.length).equals(plain)).to.equal(true);
        const bad = Buffer.from(packed);
        bad.fill(0xff, 0, Math.min(16, bad.length));
        expect(fast(bad, a), 'damaged').to.equal(-1);
        expect(fast(packed.subarray(0, packed.length >> 1), a), 'cut short').to.equal(-1);
        expect(fast(packed, a.subarray(0, plain.length - 1)), 'no room').to.equal(-1);
      }
    });
  }

  it('leaves a raw stream without a final block to zlib (which reads it, as QEMU does)', async () => {
    const plain = Buffer.from(crypto.randomBytes(32 * KiB).toString('hex'));
    const packed = await withoutFinalBlock(plain);
    const out = Buffer.alloc(plain.length + INFLATE_SLACK);
    expect(libdeflate('raw')!(packed, out)).to.equal(-1);
    expect(rawInflater('raw')(packed, out)).to.equal(plain.length);
    expect(out.subarray(0, plain.length).equals(plain)).to.equal(true);
  });

  it('is off with TSMOUNT_LIBDEFLATE=0', () => {
    process.env.TSMOUNT_LIBDEFLATE = '0';
    try {
      expect(libdeflate('raw')).to.equal(undefined);
    } finally {
      delete process.env.TSMOUNT_LIBDEFLATE;
    }
  });
});
