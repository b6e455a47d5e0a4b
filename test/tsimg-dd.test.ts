// tsimg dd against qemu-img dd (7.2): the same operands give the same output file, byte
// for byte (raw) or reading the same (qcow2), and the same refusals.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, mapImage, qemuIo, run, runOk, tempDir } from './helpers/qemu.js';
import { tsimg } from './helpers/images.js';

const md5 = (f: string): string => crypto.createHash('md5').update(fs.readFileSync(f)).digest('hex');

describe('tsimg dd, against qemu-img dd', function () {
  this.timeout(120_000);
  let tmp: ReturnType<typeof tempDir>;
  let src: string;
  before(async () => {
    tmp = tempDir('tsimg-dd');
    src = path.join(tmp.dir, 'src.qcow2');
    await createImage(src, 'qcow2', 10 * 1024 * 1024);
    await qemuIo(src, 'qcow2', ['write -P 1 0 1M', 'write -P 2 5M 1M', 'write -P 3 9M 3k']);
  });
  after(() => tmp.cleanup());

  const cases = ['bs=1M count=3', 'bs=1M skip=2', 'bs=1M count=6 skip=2', 'bs=4k skip=100000', 'bs=1M skip=10', 'bs=1000 count=7', 'count=3', 'bs=3M', 'bs=64k skip=3 count=1k'];
  for (const [i, ops] of cases.entries()) {
    it(`raw output: ${ops}`, async () => {
      const q = path.join(tmp.dir, `q${i}.raw`);
      const t = path.join(tmp.dir, `t${i}.raw`);
      const qr = await run('qemu-img', ['dd', '-f', 'qcow2', '-O', 'raw', ...ops.split(' '), `if=${src}`, `of=${q}`]);
      const tr = await tsimg(['dd', '-f', 'qcow2', '-O', 'raw', ...ops.split(' '), `if=${src}`, `of=${t}`]);
      expect(tr.code, tr.stderr).to.equal(qr.code);
      expect(fs.statSync(t).size).to.equal(fs.statSync(q).size);
      expect(md5(t)).to.equal(md5(q));
      expect(tr.stderr.replace(/^tsimg: /gm, '')).to.equal(qr.stderr.replace(/^qemu-img: /gm, ''));
    });
  }

  it('qcow2 output: the same disk, every cluster written (as qemu-img, zeros too)', async () => {
    const q = path.join(tmp.dir, 'q.qcow2');
    const t = path.join(tmp.dir, 't.qcow2');
    await runOk('qemu-img', ['dd', '-O', 'qcow2', 'bs=1M', 'skip=1', `if=${src}`, `of=${q}`]);
    expect((await tsimg(['dd', '-O', 'qcow2', 'bs=1M', 'skip=1', `if=${src}`, `of=${t}`])).code).to.equal(0);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', q, t]);
    const shape = (m: Awaited<ReturnType<typeof mapImage>>) => m.map((e) => [e.start, e.length, e.data, e.zero]);
    expect(shape(await mapImage(t, 'qcow2'))).to.deep.equal(shape(await mapImage(q, 'qcow2')));
  });

  it("refusals in qemu-img's words (on one line), nothing made", async () => {
    const out = path.join(tmp.dir, 'never');
    const cases: [string[], string][] = [
      [[`if=${src}`], 'Must specify both input and output files'],
      [[`if=${src}`, `of=${out}`, 'bs=0'], 'Invalid bs specified. Must be between 1 and 2147483647.'],
      [[`if=${src}`, `of=${out}`, 'bs=4G'], 'Invalid bs specified. Must be between 1 and 2147483647.'],
      [[`if=${src}`, `of=${out}`, 'foo=1'], 'unrecognized operand foo'],
      [[`if=${src}`, `of=${out}`, 'oops'], 'unrecognized operand oops'],
      [[`if=${src}`, `of=${out}`, 'count=-1'], 'Invalid count specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.'],
    ];
    for (const [ops, says] of cases) {
      const r = await tsimg(['dd', ...ops]);
      expect(r.code, ops.join(' ')).to.equal(1);
      expect(r.stderr.trim(), ops.join(' ')).to.equal(`tsimg: ${says}`);
      expect(fs.existsSync(out)).to.equal(false);
    }
  });

  it('tsimg create -f raw rounds the size up to whole sectors, as qemu-img create', async () => {
    const q = path.join(tmp.dir, 'odd-q.raw');
    const t = path.join(tmp.dir, 'odd-t.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', q, '7000']);
    expect((await tsimg(['create', '-q', '-f', 'raw', t, '7000'])).code).to.equal(0);
    expect(fs.statSync(t).size).to.equal(fs.statSync(q).size).and.to.equal(7168);
  });
});
