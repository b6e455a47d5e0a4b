// The coverage-guided fuzzer (scripts/fuzz.ts) over every format's open-and-read
// path, for a fixed short budget in CI (TSMOUNT_FUZZ_SECONDS per format, 5 by
// default; set it higher for a long run). Nothing it finds is allowed: an unclean
// error, a hang, a crash, an allocation over the cache plus the fixed bound, or a
// write to the read-only image. Defects found so far are regression cases in
// corruption.test.ts and table-overlap.test.ts (the fuzzer itself found none).
import { expect } from 'chai';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from './helpers/qemu.js';
import { SEED_FORMATS } from '../scripts/lib/seeds.js';

const FUZZ = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../scripts/fuzz.js');
const SECONDS = Number(process.env.TSMOUNT_FUZZ_SECONDS ?? 5);

describe('fuzzer: every format, coverage-guided', function () {
  const budgetMs = (SEED_FORMATS.length * (SECONDS + 15) + 180) * 1000;
  this.timeout(budgetMs + 30_000);

  it(`${SECONDS} s per format: no crash, hang, unclean error, unbounded allocation or write`, async () => {
    const r = await run(process.execPath, [FUZZ, '--seconds', String(SECONDS), '--seed', String(Date.now() & 0xffff)], { timeoutMs: budgetMs });
    const last = r.stdout.trim().split('\n').pop() ?? '';
    expect(last, r.stderr).to.match(/^\{/);
    const summary = JSON.parse(last) as { total: { execs: number; mutations: number; findings: { format: string; kind: string; message: string; file?: string }[] }; perFormat: { format: string; execs: number; features: number }[] };
    console.log(`      fuzz: ${summary.total.execs} inputs, ${summary.total.mutations} mutations, ${summary.perFormat.length} formats (${summary.perFormat.map((p) => `${p.format} ${p.execs}`).join(', ')})`);
    expect(summary.total.findings, r.stderr).to.deep.equal([]);
    expect(r.code, r.stderr).to.equal(0);
    expect(summary.perFormat.map((p) => p.format).sort()).to.deep.equal([...SEED_FORMATS].sort());
    for (const p of summary.perFormat) expect(p.execs, `${p.format} ran inputs`).to.be.greaterThan(3);
  });
});
