// The metadata multiset every format's overlap checks use (drivers/format/metadata-ranges.ts),
// against a plain list doing the same thing the obvious way: random adds (one at a time,
// in bulk, uniform tables), removes and queries must agree.
import { expect } from 'chai';
import { MetadataRanges, type MetadataRange } from '../../drivers/format/metadata-ranges.js';
import { CorruptImageError } from '../../drivers/errors.js';

/** A seeded generator, so a failure repeats. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

class Model {
  readonly list: MetadataRange[] = [];
  add(offset: number, length: number, what: string): void {
    if (length > 0) this.list.push({ offset, length, what });
  }
  remove(offset: number, what: string): boolean {
    const i = this.list.findIndex((r) => r.offset === offset && r.what === what);
    if (i < 0) return false;
    this.list.splice(i, 1);
    return true;
  }
  hits(offset: number, length: number, ignore: readonly string[] = []): MetadataRange[] {
    return this.list.filter((r) => r.offset < offset + length && r.offset + r.length > offset && !ignore.includes(r.what));
  }
}

describe('MetadataRanges', () => {
  const kinds = ['header', 'L1 table', 'L2 table', 'refcount block'];

  it('agrees with a plain list under random adds, bulk adds, removes and queries', () => {
    const rand = rng(12);
    const m = new MetadataRanges('img');
    const model = new Model();
    const pick = (n: number): number => Math.floor(rand() * n);
    for (let step = 0; step < 4000; step++) {
      const op = pick(10);
      if (op < 3) {
        const [o, l, w] = [pick(1 << 20), pick(4096), kinds[pick(4)]!];
        m.add(o, l, w);
        model.add(o, l, w);
      } else if (op === 3) {
        const list = Array.from({ length: pick(20) }, () => ({ offset: pick(1 << 20), length: pick(4096), what: kinds[pick(4)]! }));
        m.addAll(list);
        for (const r of list) model.add(r.offset, r.length, r.what);
      } else if (op === 4) {
        const offs = Float64Array.from({ length: pick(30) }, () => pick(256) * 4096);
        const w = kinds[pick(4)]!;
        const unique = [...new Set(offs)];
        m.addUniform(offs, 4096, w);
        for (const o of unique) model.add(o, 4096, w);
      } else if (op < 7 && model.list.length > 0) {
        const r = model.list[pick(model.list.length)]!;
        expect(m.remove(r.offset, r.what)).to.equal(model.remove(r.offset, r.what));
      } else {
        const [o, l] = [pick(1 << 20), 1 + pick(65536)];
        const ignore = rand() < 0.3 ? [kinds[pick(4)]!] : undefined;
        const want = model.hits(o, l, ignore);
        const got = m.find(o, l, ignore);
        if (want.length === 0) expect(got).to.equal(undefined);
        else expect(want.some((r) => r.offset === got?.offset && r.length === got.length && r.what === got.what), `find ${o}+${l}`).to.equal(true);
        const kindsHit = new Set(model.hits(o, l).map((r) => r.what));
        const overlap = m.overlap(o, l);
        expect(overlap === undefined ? new Set() : new Set(overlap.split(', '))).to.deep.equal(kindsHit);
      }
      expect(m.count).to.equal(model.list.length);
    }
  });

  it('is a multiset: a range added twice stays until removed twice', () => {
    const m = new MetadataRanges().add(4096, 512, 'L2 table').add(4096, 512, 'L2 table');
    expect(m.remove(4096, 'L2 table')).to.equal(true);
    expect(m.find(4096, 1)?.what).to.equal('L2 table');
    expect(m.remove(4096, 'L2 table')).to.equal(true);
    expect(m.find(4096, 1)).to.equal(undefined);
    expect(m.remove(4096, 'L2 table')).to.equal(false);
  });

  it('refuses a write on metadata with a message naming the image, the guest data and what it hits', () => {
    const m = new MetadataRanges('disk.qcow2').add(0, 512, 'header').add(65536, 65536, 'L2 table');
    expect(() => m.assertNoOverlap(65536 + 100, 10, 'guest cluster 3'))
      .to.throw(CorruptImageError, /^disk\.qcow2: preventing invalid write on metadata: guest cluster 3 maps to 0x10064\+0xa, which overlaps the L2 table; the image is corrupt$/);
    expect(() => m.assertNoOverlap(512, 65024, 'guest cluster 4')).to.not.throw();
  });
});
