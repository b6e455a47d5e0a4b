// node dist/scripts/make-fixtures.js [--no-big] DIR: make (or reuse) the test fixtures in DIR and list them.
import { makeFixtures } from './fixtures.js';

async function main(argv: string[]): Promise<number> {
  const big = !argv.includes('--no-big');
  const rest = argv.filter((a) => a !== '--no-big');
  const dir = rest[0];
  if (rest.length !== 1 || dir === undefined || dir.startsWith('-')) {
    process.stderr.write('usage: make-fixtures [--no-big] DIR\n');
    return 2;
  }
  const t0 = performance.now();
  const fixtures = await makeFixtures(dir, { big });
  const seconds = ((performance.now() - t0) / 1000).toFixed(1);
  const rows = [['name', 'format', 'size', 'md5'], ...fixtures.map((f) => [f.name, f.format, String(f.size), f.rawMd5])];
  const widths = [0, 1, 2].map((i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  for (const r of rows) {
    const [name = '', format = '', size = '', md5 = ''] = r;
    process.stdout.write(`${name.padEnd(widths[0] ?? 0)}  ${format.padEnd(widths[1] ?? 0)}  ${size.padStart(widths[2] ?? 0)}  ${md5}\n`);
  }
  process.stderr.write(`${fixtures.length} fixtures in ${dir} (${seconds} s)\n`);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`make-fixtures: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  },
);
