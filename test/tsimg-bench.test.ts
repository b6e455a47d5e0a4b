// tsimg bench against qemu-img bench: the same report (but for the time taken), the same
// image after the same write load (qemu-img compare, check), qemu-img's refusals.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, createImage, run, tempDir } from './helpers/qemu.js';
import { tsimg } from './helpers/images.js';

const MiB = 1024 * 1024;
const TIME = /^Run completed in \d+\.\d{3} seconds\.$/;

describe('tsimg bench against qemu-img bench', function () {
  this.timeout(180_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('tsimg-bench')));
  after(() => tmp.cleanup());

  /** The report without its time line, and whether that line is there. */
  const report = (out: string): { lines: string[]; timed: boolean } => {
    const lines = out.trim().split('\n');
    return { lines: lines.filter((l) => !TIME.test(l)), timed: lines.some((l) => TIME.test(l)) };
  };

  const loads: string[][] = [
    ['-c', '2000'],
    ['-c', '3000', '-d', '8', '-s', '12k', '-S', '20k', '-o', '4k'],
    ['-w', '-c', '3000', '-d', '16', '-s', '12k', '-S', '20k', '-o', '4k', '--pattern', '7', '--flush-interval', '100'],
    ['-w', '-c', '2000', '-d', '4', '-s', '64k', '-S', '4k', '--pattern', '0x5a', '--flush-interval', '16', '--no-drain', '-t', 'none'],
    ['-w', '-c', '5000', '-s', '4k', '-S', '1M', '-o', '60M', '-q', '-n', '-t', 'none'],
  ];
  for (const format of ['qcow2', 'raw', 'vdi']) {
    it(`${format}: the same report and, after writes, the same image as qemu-img bench leaves`, async () => {
      for (const [i, args] of loads.entries()) {
        const theirs = path.join(tmp.dir, `${format}-${i}-q.img`);
        const ours = path.join(tmp.dir, `${format}-${i}-t.img`);
        await createImage(theirs, format, 64 * MiB);
        fs.copyFileSync(theirs, ours);
        const q = await run('qemu-img', ['bench', '-f', format, ...args, theirs]);
        const t = await tsimg(['bench', '-f', format, ...args, ours]);
        expect([q.code, t.code], `${args.join(' ')}: ${t.stderr}`).to.deep.equal([0, 0]);
        expect(report(t.stdout), args.join(' ')).to.deep.equal(report(q.stdout));
        expect(report(t.stdout).timed).to.equal(true);
        const cmp = await run('qemu-img', ['compare', '-f', format, '-F', format, theirs, ours]);
        expect(cmp.code, `${args.join(' ')}: ${cmp.stdout}`).to.equal(0);
        if (format !== 'raw') expect((await checkImage(ours, format)).code, args.join(' ')).to.equal(0);
      }
    });
  }

  it("refuses what qemu-img refuses, in its words, one line, the image untouched", async () => {
    const f = path.join(tmp.dir, 'refuse.qcow2');
    await createImage(f, 'qcow2', 64 * MiB);
    const cases = [
      ['-c', 'x'],
      ['-d', '99999999999'],
      ['--pattern', '256'],
      ['-s', '3G'],
      ['-s', 'abc'],
      ['-S', '-1'],
      ['--flush-interval', '10'],
      ['-w', '--flush-interval', '10'],
      ['-t', 'bogus'],
      ['-i', 'bogus'],
      ['-n'],
      ['-w', '-o', '70M', '-c', '1'],
    ];
    for (const args of cases) {
      const before = fs.readFileSync(f);
      const q = await run('qemu-img', ['bench', ...args, f]);
      const t = await tsimg(['bench', ...args, f]);
      expect([q.code, t.code], args.join(' ')).to.deep.equal([1, 1]);
      const theirs = q.stderr.trim().split('\n');
      const ours = t.stderr.trim().split('\n');
      expect(ours, args.join(' ')).to.have.length(1);
      // qemu-img says the suffix hint on two lines; tsimg on one.
      expect(ours[0]!.replace(/^tsimg:/, 'qemu-img:'), args.join(' ')).to.equal(theirs.length === 2 && /suffixes/.test(theirs[0]!) ? `${theirs[0]} ${theirs[1]!.replace(/^qemu-img: /, '')}` : theirs[0]);
      expect(fs.readFileSync(f).equals(before), `${args.join(' ')}: unchanged`).to.equal(true);
    }
  });
});
