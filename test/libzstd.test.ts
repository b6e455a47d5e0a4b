// libzstd's fast path for the reading threads (drivers/util/libzstd.ts): it decodes the
// first frame as fzstd (the main thread's reference decoder) does, byte for byte, and
// refuses what it cannot decode whole into the room it is given.
import { expect } from 'chai';
import crypto from 'node:crypto';
import { decompress as fzstd } from 'fzstd';
import { libzstd } from '../drivers/util/libzstd.js';
import { encodeZstd } from '../drivers/util/native-codecs.js';

const KiB = 1024;

describe('libzstd fast path (libzstd1 through koffi, synchronous)', function () {
  before(function () {
    if (!libzstd()) {
      // eslint-disable-next-line no-console
      console.log('      skipped: libzstd.so.1 does not load here');
      this.skip();
    }
  });

  it('decodes clusters of text, random bytes and zeros as fzstd does, also with the rest of a sector after the frame; refuses a damaged frame, one cut short, one larger than the room; with more room, its own size', async () => {
    const fast = libzstd()!;
    const clusters = [Buffer.from(crypto.randomBytes(32 * KiB).toString('hex')), crypto.randomBytes(64 * KiB), Buffer.alloc(64 * KiB), Buffer.from(crypto.randomBytes(2 * KiB).toString('hex'))];
    for (const plain of clusters) {
      const frame = (await encodeZstd(plain, plain.length + 1024))!;
      expect(Buffer.from(fzstd(frame)).equals(plain)).to.equal(true);
      const out = Buffer.alloc(plain.length);
      expect(fast(frame, out)).to.equal(plain.length);
      expect(out.equals(plain)).to.equal(true);
      // A qcow2 cluster's stream is counted in sectors: random bytes after the frame.
      out.fill(0);
      expect(fast(Buffer.concat([frame, crypto.randomBytes(511)]), out), 'with bytes after the frame').to.equal(plain.length);
      expect(out.equals(plain)).to.equal(true);
      const bad = Buffer.from(frame);
      bad.fill(0xff, 0, Math.min(16, bad.length));
      expect(fast(bad, out), 'damaged').to.equal(-1);
      expect(fast(frame.subarray(0, frame.length >> 1), out), 'cut short').to.equal(-1);
      expect(fast(frame, out.subarray(0, plain.length - 1)), 'no room').to.equal(-1);
      expect(fast(frame, Buffer.alloc(plain.length * 2)), 'more room than it needs').to.equal(plain.length);
    }
  });

  it('decodes only the first of two frames (what follows a frame is not the cluster\'s)', async () => {
    const a = Buffer.from(crypto.randomBytes(8 * KiB).toString('hex'));
    const b = Buffer.from(crypto.randomBytes(8 * KiB).toString('hex'));
    const two = Buffer.concat([(await encodeZstd(a, a.length + 1024))!, (await encodeZstd(b, b.length + 1024))!]);
    const out = Buffer.alloc(a.length + b.length);
    expect(libzstd()!(two, out)).to.equal(a.length);
    expect(out.subarray(0, a.length).equals(a)).to.equal(true);
  });

  it('is off with TSMOUNT_LIBZSTD=0', () => {
    process.env.TSMOUNT_LIBZSTD = '0';
    try {
      expect(libzstd()).to.equal(undefined);
    } finally {
      delete process.env.TSMOUNT_LIBZSTD;
    }
  });
});
