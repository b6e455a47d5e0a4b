// The benchmark runs end to end (--quick, two rows) and leaves no mount behind.
// Opt-in (TSMOUNT_BENCH=1): it takes a while and the machine is shared. Performance
// is never asserted here; only that the rows are measured and reported.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { parseArgs, runBench } from '../scripts/bench.js';
import { holdFreeMemory, warmFreeMemory } from '../scripts/bench/tools.js';
import { fuseMountsUnder } from './helpers/mount.js';

const enabled = process.env.TSMOUNT_BENCH === '1';

(enabled ? describe : describe.skip)('benchmark smoke run (TSMOUNT_BENCH=1)', function () {
  this.timeout(300_000);
  let out: string;

  before(() => {
    out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'bench-tsmount-smoke-')), 'BENCHMARKS.md');
  });

  after(() => fs.rmSync(path.dirname(out), { recursive: true, force: true }));

  it('measures the qcow2 sequential read and mount-time rows against qemu-storage-daemon and writes the report', async () => {
    const rows = await runBench(parseArgs(['--quick', '--rows', '1,6', '--out', out]));
    expect(rows.map((r) => r.id)).to.include.members(['1', '6a', '6b']);
    const seq = rows.find((r) => r.id === '1')!;
    expect(seq.tsmount).to.match(/MB\/s/);
    expect(seq.qsd).to.match(/MB\/s/);
    expect(seq.ratio).to.match(/^\d+\.\d\d/);
    expect(seq.ceiling).to.match(/MB\/s/);
    expect(seq.cratio).to.match(/^\d+\.\d\d/);
    const text = fs.readFileSync(out, 'utf8');
    expect(text).to.match(/nproc/).and.match(/load average/).and.match(/\| 6a \|/);
    expect(fuseMountsUnder(path.join(os.tmpdir(), 'bench-tsmount-'))).to.deep.equal([]);
  });
});

describe('benchmark: freeing memory before a measurement (warmFreeMemory)', () => {
  it('fills and frees tmpfs, leaving no file behind; --no-warm-memory turns it off', () => {
    const mine = (): string[] => (fs.existsSync('/dev/shm') ? fs.readdirSync('/dev/shm').filter((f) => f === `tsmount-bench-warm-${process.pid}`) : []);
    warmFreeMemory(8 * 1024 * 1024);
    expect(mine()).to.deep.equal([]);
    expect(parseArgs(['--quick']).warmMemory).to.be.greaterThan(0);
    expect(parseArgs(['--quick', '--no-warm-memory']).warmMemory).to.equal(0);
  });
});

describe('benchmark: holding freed memory back from the hypervisor (holdFreeMemory)', () => {
  it('raises min_free_ms for the run and puts the old value back, where the kernel has it', () => {
    const param = '/sys/module/page_reporting/parameters/min_free_ms';
    const before = fs.existsSync(param) ? fs.readFileSync(param, 'utf8').trim() : undefined;
    const release = holdFreeMemory();
    try {
      if (before !== undefined && process.getuid?.() === 0) expect(fs.readFileSync(param, 'utf8').trim()).to.equal('100000');
    } finally {
      release();
      release();
    }
    if (before !== undefined) expect(fs.readFileSync(param, 'utf8').trim()).to.equal(before);
  });
});
