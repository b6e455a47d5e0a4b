// The hand-written LZ4 block decoder (drivers/util/lz4.ts) on hand-made blocks: the
// corners of the format, and malformed blocks, which throw instead of reading or
// writing outside their buffers. Real blocks from the lz4 tool: test/cloop.test.ts.
import { expect } from 'chai';
import { lz4BlockDecode } from '../../drivers/util/lz4.js';

function decode(block: number[] | Buffer, room = 1024): Buffer {
  const dst = Buffer.alloc(room);
  return dst.subarray(0, lz4BlockDecode(Buffer.from(block), dst));
}

describe('LZ4 block decoder (unit)', function () {
  it('literals only', () => {
    expect(decode([0x50, ...Buffer.from('hello')]).toString()).to.equal('hello');
  });

  it('a match that overlaps its own output (offset 1: a run)', () => {
    // 1 literal 'a', then a match of 4 + 4 = 8 at offset 1, then the last literals 'b'.
    expect(decode([0x14, 0x61, 0x01, 0x00, 0x10, 0x62]).toString()).to.equal('aaaaaaaaab');
  });

  it('literal and match lengths continued in extra bytes (15 + 255 + ...)', () => {
    const lit = Buffer.alloc(300, 0x41);
    // 300 literals: 15 + 255 + 30; a match of 15 + 4 + 10 = 29 at offset 300; end with 'z'.
    const out = decode([0xff, 255, 30, ...lit, 0x2c, 0x01, 10, 0x10, 0x7a]);
    expect(out.length).to.equal(300 + 29 + 1);
    expect(out.subarray(0, 329).every((b) => b === 0x41)).to.equal(true);
    expect(out[329]).to.equal(0x7a);
  });

  const malformed: [string, number[], number?][] = [
    ['empty', []],
    ['literals past the input', [0x50, 0x61, 0x62]],
    ['literals past the output', [0x50, ...Buffer.from('hello')], 3],
    ['match offset 0', [0x14, 0x61, 0x00, 0x00, 0x10, 0x62]],
    ['match offset before the output', [0x14, 0x61, 0x05, 0x00, 0x10, 0x62]],
    ['match past the output', [0x1f, 0x61, 0x01, 0x00, 200, 0x10, 0x62], 50],
    ['offset cut off', [0x14, 0x61, 0x01]],
    ['ends after a match', [0x14, 0x61, 0x01, 0x00]],
    ['length bytes cut off', [0xf0, 255, 255]],
  ];
  for (const [what, block, room] of malformed) {
    it(`throws on a malformed block: ${what}`, () => {
      expect(() => decode(block, room)).to.throw(/malformed LZ4 block/);
    });
  }
});
