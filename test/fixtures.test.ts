// The fixture generator is itself tested against qemu-img: every other suite trusts its md5s.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { makeFixtures, type Fixture } from '../scripts/fixtures.js';
import { checkImage, imageInfo, mapImage, md5File, md5Sparse, rawMd5, rawMd5Sparse, runOk, tempDir, type MapExtent } from './helpers/qemu.js';

const GiB = 2 ** 30;

async function eachLimit<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const lane = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++] as T);
  };
  await Promise.all(Array.from({ length: limit }, lane));
}

/** Guest-visible bytes [offset, offset+length) as qemu-img sees them (offset, length: multiples of 512). */
async function guestBytes(f: Fixture, offset: number, length: number, scratch: string): Promise<Buffer> {
  const out = path.join(scratch, `dd-${f.name}-${offset}.raw`);
  // qemu-img dd counts `count` from the start of the image, not from `skip`, and exits 0 when it cannot skip.
  const args = ['dd', '-U', '-f', f.format, '-O', 'raw', 'bs=512', `skip=${offset / 512}`, `count=${(offset + length) / 512}`, `if=${f.file}`, `of=${out}`];
  await runOk('qemu-img', args, { cwd: path.dirname(f.file) });
  try {
    const bytes = fs.readFileSync(out);
    if (bytes.length !== length) throw new Error(`qemu-img ${args.join(' ')} gave ${bytes.length} bytes, not ${length}`);
    return bytes;
  } finally {
    fs.rmSync(out, { force: true });
  }
}

interface Qcow2Specific {
  compat?: string;
  'refcount-bits'?: number;
  'extended-l2'?: boolean;
  'compression-type'?: string;
}
const qcow2Data = (info: Record<string, unknown>): Qcow2Specific => ((info['format-specific'] as { data?: Qcow2Specific } | undefined)?.data ?? {});

const hasDataAt = (extents: MapExtent[], offset: number): boolean => extents.some((e) => e.data && e.start <= offset && offset < e.start + e.length);

describe('test fixtures (scripts/fixtures.ts)', function () {
  let tmp: { dir: string; cleanup: () => void };
  let scratch: string;
  let fixtures: Fixture[];
  const byName = (name: string): Fixture => {
    const f = fixtures.find((x) => x.name === name);
    if (!f) throw new Error(`no fixture ${name}`);
    return f;
  };

  before(async function () {
    this.timeout(180_000);
    tmp = tempDir('fixtures');
    scratch = fs.mkdtempSync(path.join(tmp.dir, 'scratch-'));
    const t0 = performance.now();
    fixtures = await makeFixtures(path.join(tmp.dir, 'fx'));
    console.log(`      (made ${fixtures.length} fixtures in ${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  });
  after(() => tmp?.cleanup());

  it('gives every fixture a unique readable name, one-line description and an existing file', function () {
    expect(fixtures.length).to.be.greaterThan(30);
    expect(new Set(fixtures.map((f) => f.name)).size).to.equal(fixtures.length);
    for (const f of fixtures) {
      expect(f.name).to.match(/^(raw|qcow2)-[a-z0-9-]+$/);
      expect(path.isAbsolute(f.file), f.name).to.equal(true);
      expect(fs.existsSync(f.file), f.file).to.equal(true);
      expect(f.description, f.name).to.match(/^[^\n]{10,}$/);
      expect(f.rawMd5, f.name).to.match(/^[0-9a-f]{32}$/);
    }
  });

  it('covers both formats across the options the issue lists', async function () {
    const combos = new Set<string>();
    const refcounts = new Set<number>();
    for (const f of fixtures.filter((x) => x.format === 'qcow2')) {
      const info = await imageInfo(f.file, 'qcow2');
      const q = qcow2Data(info);
      combos.add(`${q.compat} ${info['cluster-size']}`);
      if (q['refcount-bits'] !== undefined) refcounts.add(q['refcount-bits']);
    }
    for (const compat of ['0.10', '1.1']) for (const cs of [512, 4096, 65536, 2 * 2 ** 20]) expect([...combos]).to.include(`${compat} ${cs}`);
    expect([...refcounts]).to.include.members([1, 2, 16, 64]);
    const tags = new Set(fixtures.flatMap((f) => f.tags));
    for (const t of ['backing', 'raw-backing', 'short-backing', 'zero-clusters', 'discard', 'partial-clusters', 'unaligned-writes', 'unaligned-size', 'empty', 'sparse', 'big', 'v2', 'v3']) {
      expect([...tags]).to.include(t);
    }
    expect(fixtures.filter((f) => f.format === 'raw' && f.tags.includes('big'))).to.have.length.greaterThan(0);
    expect(fixtures.filter((f) => f.format === 'qcow2' && f.tags.includes('big'))).to.have.length.greaterThan(0);
  });

  it('reports the format and virtual size that qemu-img info reports', async function () {
    await eachLimit(fixtures, 4, async (f) => {
      const info = await imageInfo(f.file);
      expect(info.format, f.name).to.equal(f.format);
      expect(info['virtual-size'], f.name).to.equal(f.size);
    });
  });

  it('records the md5 that a fresh qemu-img convert -O raw gives for every fixture', async function () {
    this.timeout(120_000);
    await eachLimit(fixtures, 2, async (f) => {
      // Small images go through the plain full-read path, so the generator's sparse hashing is checked against it.
      const md5 = f.size > GiB ? await rawMd5Sparse(f.file, f.format) : await rawMd5(f.file, f.format);
      expect(md5, f.name).to.equal(f.rawMd5);
    });
  });

  it('hashes a sparse file exactly as reading it all would', async function () {
    const file = path.join(scratch, 'sparse.bin');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 3 * 2 ** 20 + 1000);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.alloc(5000, 0x5a), 0, 5000, 2 ** 20 - 7);
    fs.writeSync(fd, Buffer.alloc(10, 0xa5), 0, 10, 3 * 2 ** 20 + 990);
    fs.closeSync(fd);
    expect(await md5Sparse(file)).to.equal(await md5File(file));
  });

  it('makes qcow2 images that qemu-img check finds clean', async function () {
    await eachLimit(
      fixtures.filter((f) => f.format === 'qcow2'),
      4,
      async (f) => {
        const r = await checkImage(f.file, 'qcow2');
        expect(r.code, `${f.name}: ${r.output}`).to.equal(0);
        expect(r.leaks + r.corruptions + r.checkErrors, f.name).to.equal(0);
      },
    );
  });

  it('has names and tags that match the images', async function () {
    const backingFiles = new Set<string>();
    await eachLimit(fixtures, 4, async (f) => {
      const info = await imageInfo(f.file, f.format);
      const q = qcow2Data(info);
      const extents = await mapImage(f.file, f.format);
      const tag = (t: string): boolean => f.tags.includes(t);
      const msg = f.name;
      if (info['backing-filename'] !== undefined) {
        expect(tag('backing'), msg).to.equal(true);
        expect(path.isAbsolute(info['backing-filename']), `${msg} has a relative backing file name`).to.equal(false);
        expect(info['backing-filename-format'], msg).to.be.a('string');
        backingFiles.add(path.resolve(path.dirname(f.file), info['backing-filename']));
      }
      if (f.format === 'qcow2') {
        expect(q.compat, msg).to.equal(tag('v2') ? '0.10' : '1.1');
        expect(tag('v2') !== tag('v3'), `${msg} is tagged v2 or v3`).to.equal(true);
      }
      const cs = /-c(\d+)(k|m)?(-|$)/.exec(f.name);
      if (cs) expect(info['cluster-size'], msg).to.equal(Number(cs[1]) * (cs[2] === 'k' ? 1024 : cs[2] === 'm' ? 2 ** 20 : 1));
      const rc = /-refcount(\d+)/.exec(f.name);
      if (rc) expect(q['refcount-bits'], msg).to.equal(Number(rc[1]));
      if (tag('big')) {
        expect(f.size, msg).to.be.greaterThan(2 * GiB);
        expect(hasDataAt(extents, 2 ** 31 - 1) && hasDataAt(extents, 2 ** 31), `${msg} has data across 2^31`).to.equal(true);
        if (f.format === 'qcow2') expect(hasDataAt(extents, 2 ** 32 - 1) && hasDataAt(extents, 2 ** 32), `${msg} has data across 2^32`).to.equal(true);
      }
      if (tag('sparse')) expect(fs.statSync(f.file).blocks * 512, msg).to.be.lessThan(f.size / 100);
      if (tag('empty')) expect(extents.some((e) => e.data), msg).to.equal(false);
      if (tag('zero-clusters') && tag('v3')) expect(extents.some((e) => e.depth === 0 && e.present && e.zero && !e.data), `${msg} has zero clusters`).to.equal(true);
      if (tag('unaligned-size')) {
        if (f.format === 'qcow2') expect(f.size % (info['cluster-size'] ?? 1), msg).to.not.equal(0);
        else expect(fs.statSync(f.file).size % 4096, msg).to.not.equal(0);
      }
      if (tag('compressed')) {
        const check = JSON.parse(await runOk('qemu-img', ['check', '-U', '--output=json', f.file], { cwd: path.dirname(f.file) })) as { 'compressed-clusters'?: number };
        expect(check['compressed-clusters'], msg).to.be.greaterThan(0);
      }
      if (tag('zstd')) expect(q['compression-type'], msg).to.equal('zstd');
      if (tag('extended-l2')) expect(q['extended-l2'], msg).to.equal(true);
    });
    // A layer tagged 'backing' is either an overlay (checked above) or some overlay's backing file.
    for (const f of fixtures.filter((x) => x.tags.includes('backing'))) {
      const info = await imageInfo(f.file, f.format);
      if (info['backing-filename'] === undefined) expect(backingFiles.has(f.file), `${f.name} backs another fixture`).to.equal(true);
    }
  });

  it('builds a 3-layer backing chain whose top shows the layers below where it wrote nothing', async function () {
    const top = byName('qcow2-backing-chain3-top');
    const info = JSON.parse(await runOk('qemu-img', ['info', '-U', '--output=json', '--backing-chain', top.file], { cwd: path.dirname(top.file) })) as unknown[];
    expect(info).to.have.length(3);
    const base = byName('qcow2-backing-chain3-base');
    const baseHead = await guestBytes(base, 0, 65536, scratch);
    expect(baseHead.some((b) => b !== 0)).to.equal(true);
    expect((await guestBytes(top, 0, 65536, scratch)).equals(baseHead)).to.equal(true);
    // zero clusters in the top over data in the base
    expect((await guestBytes(base, 2 ** 20, 131072, scratch)).some((b) => b !== 0)).to.equal(true);
    expect((await guestBytes(top, 2 ** 20, 131072, scratch)).every((b) => b === 0)).to.equal(true);
  });

  it('makes an overlay that reads zeros past the end of its shorter backing file', async function () {
    const base = byName('qcow2-backing-short-base');
    const top = byName('qcow2-backing-short-top');
    expect(base.size).to.be.lessThan(top.size);
    expect((await guestBytes(top, 2 ** 20, 512, scratch)).equals(await guestBytes(base, 2 ** 20, 512, scratch))).to.equal(true);
    expect((await guestBytes(top, base.size, 512, scratch)).every((b) => b === 0)).to.equal(true);
    expect((await guestBytes(top, 2 * 2 ** 20, 2 ** 20, scratch)).every((b) => b === 0)).to.equal(true);
  });

  it('makes a raw file of 1000 bytes that QEMU reads as 1024, zero-padded', async function () {
    const f = byName('raw-odd-1000');
    expect(fs.statSync(f.file).size).to.equal(1000);
    const tail = await guestBytes(f, 512, 512, scratch);
    expect(tail.subarray(0, 488).every((b) => b !== 0)).to.equal(true);
    expect(tail.subarray(488).every((b) => b === 0)).to.equal(true);
  });

  it('makes a 5 GiB qcow2 with one run of data straddling 2^32', async function () {
    const f = byName('qcow2-sparse-5g');
    const around = await guestBytes(f, 2 ** 32 - 512, 1024, scratch);
    expect(around.every((b) => b === around[0] && b !== 0)).to.equal(true);
  });

  it('reuses the images of an earlier run and makes only changed ones again', async function () {
    const dir = path.dirname(byName('raw-small-1m').file);
    const mtimes = (): Map<string, number> => new Map(fixtures.map((f) => [f.name, fs.statSync(f.file).mtimeMs]));
    const before = mtimes();
    const t0 = performance.now();
    const again = await makeFixtures(dir);
    expect(performance.now() - t0).to.be.lessThan(2000);
    expect(again).to.deep.equal(fixtures);
    expect(mtimes()).to.deep.equal(before);

    // A touched layer rebuilds its whole chain; `only` still returns just what it selects.
    const mid = byName('qcow2-backing-chain3-mid');
    fs.utimesSync(mid.file, new Date(), new Date(Date.now() - 60_000));
    const [top, ...rest] = await makeFixtures(dir, { only: (n) => n === 'qcow2-backing-chain3-top' });
    expect(rest).to.have.length(0);
    expect(top).to.deep.equal(byName('qcow2-backing-chain3-top'));
    const after = mtimes();
    for (const n of ['qcow2-backing-chain3-base', 'qcow2-backing-chain3-mid', 'qcow2-backing-chain3-top']) expect(after.get(n), n).to.not.equal(before.get(n));
    expect(after.get('raw-small-1m')).to.equal(before.get('raw-small-1m'));
    expect(await rawMd5(top?.file ?? '', 'qcow2')).to.equal(byName('qcow2-backing-chain3-top').rawMd5);

    const small = await makeFixtures(dir, { big: false });
    expect(small.some((f) => f.tags.includes('big'))).to.equal(false);
    expect(small.length).to.equal(fixtures.filter((f) => !f.tags.includes('big')).length);
  });
});
