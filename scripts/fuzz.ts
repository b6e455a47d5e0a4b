// A coverage-guided fuzzer over each format's open-and-read path (issue 20).
//
//   node dist/scripts/fuzz.js [--seconds N] [--format F]... [--out DIR] [--seed S]
//   node dist/scripts/fuzz.js --replay FILE --format F     (one input, as the fuzzer ran it)
//
// Seeds are made at run time by qemu-img (scripts/lib/seeds.ts). Each format is
// fuzzed in a child process: it mutates inputs from its corpus (scripts/lib/mutate.ts:
// bit flips, tables pointed at each other, at metadata, past the end, absurd sizes,
// descriptor names and extent lists), opens and reads each one in-process
// (scripts/lib/exercise.ts: a clean one-line error or a working node, every open and
// read within a deadline, no Buffer over the cache plus a fixed bound, the file never
// written), and keeps an input when V8's precise block coverage of drivers/ and cache/
// (node:inspector, Profiler.takePreciseCoverage) shows a block or a hit-count bucket
// not seen before. The parent watches each child: one that stops answering (a
// synchronous loop) or dies is a finding too, its input kept.
//
// The budget is --seconds per format, or TSMOUNT_FUZZ_SECONDS (default 10). Exit 1
// when anything was found; findings are written under --out (default: a temp dir),
// and the last line printed is a JSON summary.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Session } from 'node:inspector/promises';
import { exerciseBounded } from './lib/exercise.js';
import { mutate, rng, shapeOf, type MutationKind, type Shape } from './lib/mutate.js';
import { makeSeeds, SEED_FORMATS, type Seed } from './lib/seeds.js';

const SELF = fileURLToPath(import.meta.url);
/** A child silent this long is stuck (a read slow past 5 s is retried with 30 s). */
const STUCK_MS = 75_000;
/** Peak RSS a child may reach: the node runtime, the corpus, and the bounded cache. */
const MAX_RSS = 1024 * 1024 * 1024;
/** The corpus of one format is kept under this many bytes. */
const CORPUS_BYTES = 96 * 1024 * 1024;

export interface Finding {
  format: string;
  seed: string;
  kind: 'error' | 'hang' | 'crash' | 'memory';
  message: string;
  /** The input, saved under the output folder. */
  file?: string;
}

export interface FormatStats {
  format: string;
  seconds: number;
  execs: number;
  corpus: number;
  features: number;
  refused: number;
  read: number;
  mutations: Partial<Record<MutationKind, number>>;
  findings: Finding[];
}

interface Args {
  seconds: number;
  formats: string[];
  out?: string;
  seed: number;
  child?: boolean;
  seedsDir?: string;
  replay?: string;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { seconds: Number(process.env.TSMOUNT_FUZZ_SECONDS ?? 10), formats: [], seed: Date.now() & 0xffffffff };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    switch (argv[i]) {
      case '--seconds': a.seconds = Number(v); i++; break;
      case '--format': a.formats.push(v!); i++; break;
      case '--out': a.out = v; i++; break;
      case '--seed': a.seed = Number(v); i++; break;
      case '--seeds-dir': a.seedsDir = v; i++; break;
      case '--replay': a.replay = v; i++; break;
      case '--child': a.child = true; break;
      default: throw new Error(`fuzz: unknown argument ${argv[i]}`);
    }
  }
  return a;
}

/** One line of JSON to the parent. */
function say(o: object): void {
  process.stdout.write(`${JSON.stringify(o)}\n`);
}

/** Coverage features: block ranges of drivers/ and cache/ run since the last call, with a hit-count bucket. */
class Coverage {
  private readonly session = new Session();
  readonly seen = new Set<string>();
  private readonly urls = new Map<string, number>();

  async start(): Promise<void> {
    this.session.connect();
    await this.session.post('Profiler.enable');
    await this.session.post('Profiler.startPreciseCoverage', { callCount: true, detailed: true });
  }

  /** How many features not seen before the last exec showed (and remembers them). */
  async take(): Promise<number> {
    const { result } = await this.session.post('Profiler.takePreciseCoverage');
    let fresh = 0;
    for (const script of result) {
      if (!/\/(drivers|cache)\//.test(script.url) || /node_modules/.test(script.url)) continue;
      let id = this.urls.get(script.url);
      if (id === undefined) this.urls.set(script.url, (id = this.urls.size));
      for (const fn of script.functions) {
        for (const r of fn.ranges) {
          if (r.count === 0) continue;
          const bucket = r.count < 4 ? r.count : r.count < 16 ? 4 : r.count < 128 ? 5 : 6;
          const key = `${id}:${r.startOffset}:${r.endOffset}:${bucket}`;
          if (!this.seen.has(key)) {
            this.seen.add(key);
            fresh++;
          }
        }
      }
    }
    return fresh;
  }
}

function extOf(format: string): string {
  return format === 'bochs' ? 'img' : format;
}

/** Where a mutated input of `seed` is written: beside the seed, so the files it names are found. */
function inputPath(seed: Seed): string {
  return path.join(path.dirname(seed.file), `mut.${extOf(seed.format)}`);
}

async function child(a: Args): Promise<void> {
  const format = a.formats[0]!;
  const seeds: Seed[] = JSON.parse(fs.readFileSync(path.join(a.seedsDir!, 'seeds.json'), 'utf8')).filter((s: Seed) => s.format === format);
  const random = rng(a.seed);
  const cov = new Coverage();
  await cov.start();
  interface Entry { seed: Seed; shape: Shape; data: Buffer }
  const corpus: Entry[] = [];
  let corpusBytes = 0;
  const stats: FormatStats = { format, seconds: a.seconds, execs: 0, corpus: 0, features: 0, refused: 0, read: 0, mutations: {}, findings: [] };
  const known = new Set<string>();
  const runOne = async (seed: Seed, data: Buffer): Promise<number> => {
    const file = inputPath(seed);
    fs.writeFileSync(file, data);
    say({ exec: stats.execs, seed: seed.name, file });
    stats.execs++;
    try {
      const r = await exerciseBounded(file, format);
      stats[r.outcome]++;
    } catch (err) {
      const message = ((err as Error).stack ?? String(err)).split('\n').slice(0, 4).join(' | ');
      // One finding per place in the code (the message's first frame), not per input.
      const where = message.replace(/0x[0-9a-f]+|\d+/g, 'N');
      if (!known.has(where)) {
        known.add(where);
        const kind = /no answer within/.test(message) ? 'hang' : 'error';
        // Kept under its own name before the next input overwrites this one.
        const kept = path.join(path.dirname(file), `finding-${known.size}.${extOf(format)}`);
        fs.writeFileSync(kept, data);
        say({ finding: { format, seed: seed.name, kind, message }, file: kept });
      }
    }
    if (process.memoryUsage().rss > MAX_RSS) say({ finding: { format, seed: seed.name, kind: 'memory', message: `RSS ${process.memoryUsage().rss} over ${MAX_RSS}` }, file });
    return cov.take();
  };
  for (const seed of seeds) {
    const data = fs.readFileSync(seed.file);
    await runOne(seed, data);
    corpus.push({ seed, shape: shapeOf(data), data });
    corpusBytes += data.length;
  }
  const end = Date.now() + a.seconds * 1000;
  while (Date.now() < end && corpus.length) {
    // Newer entries (which found something) a little more often than seeds.
    const pick = corpus[random() < 0.5 ? Math.floor(random() * corpus.length) : corpus.length - 1 - Math.floor(random() * Math.min(8, corpus.length))]!;
    let data = pick.data;
    const stack = 1 + Math.floor(random() * 3);
    for (let k = 0; k < stack; k++) {
      const other = corpus[Math.floor(random() * corpus.length)]!;
      const m = mutate(data, pick.shape, random, { other: other.seed.format === pick.seed.format && other.seed.name === pick.seed.name ? other.data : undefined, selfName: path.basename(inputPath(pick.seed)) });
      data = m.out;
      stats.mutations[m.kind] = (stats.mutations[m.kind] ?? 0) + 1;
    }
    const fresh = await runOne(pick.seed, data);
    if (fresh > 0 && corpusBytes + data.length <= CORPUS_BYTES) {
      corpus.push({ seed: pick.seed, shape: pick.shape, data });
      corpusBytes += data.length;
    }
  }
  stats.corpus = corpus.length;
  stats.features = cov.seen.size;
  say({ stats });
}

/** Fuzz one format in a child; resolves with its stats and the findings the parent saw. */
function fuzzFormat(format: string, a: Args, seedsDir: string, outDir: string, log: (m: string) => void): Promise<FormatStats> {
  return new Promise((resolve) => {
    const findings: Finding[] = [];
    let stats: FormatStats | undefined;
    let current: { file: string; seed: string } | undefined;
    let last = Date.now();
    let buf = '';
    const save = (f: Finding, file: string | undefined): void => {
      if (file && fs.existsSync(file)) {
        const dest = path.join(outDir, `${f.seed}-${findings.length}-${f.kind}.${extOf(format)}`);
        fs.copyFileSync(file, dest);
        f.file = dest;
      }
      findings.push(f);
      log(`FOUND ${f.kind} in ${f.seed}: ${f.message}${f.file ? ` (input: ${f.file})` : ''}`);
    };
    const p = spawn(process.execPath, [SELF, '--child', '--format', format, '--seconds', String(a.seconds), '--seeds-dir', seedsDir, '--seed', String(a.seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    p.stderr.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
    p.stdout.on('data', (d: Buffer) => {
      last = Date.now();
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let o: { exec?: number; seed?: string; file?: string; finding?: Finding; stats?: FormatStats };
        try {
          o = JSON.parse(line);
        } catch {
          continue;
        }
        if (o.exec !== undefined) current = { file: o.file!, seed: o.seed! };
        if (o.finding) save(o.finding, o.file);
        if (o.stats) stats = o.stats;
      }
    });
    const watch = setInterval(() => {
      // Starting (loading, the first input of each seed) may be slow on a loaded machine.
      if (Date.now() - last > (current ? STUCK_MS : 3 * STUCK_MS)) {
        clearInterval(watch);
        save({ format, seed: current?.seed ?? '?', kind: 'hang', message: `no progress for ${STUCK_MS} ms (a synchronous loop?)` }, current?.file);
        p.kill('SIGKILL');
      }
    }, 1000);
    p.on('close', (code, signal) => {
      clearInterval(watch);
      if (!stats && !findings.some((f) => f.kind === 'hang')) {
        save({ format, seed: current?.seed ?? '?', kind: 'crash', message: `child exited ${code ?? signal}: ${stderr.trim().split('\n').filter((l) => !/^\s+at /.test(l)).slice(-3).join(' | ')}` }, current?.file);
      }
      const s: FormatStats = stats ?? { format, seconds: a.seconds, execs: 0, corpus: 0, features: 0, refused: 0, read: 0, mutations: {}, findings: [] };
      s.findings = findings;
      resolve(s);
    });
  });
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  if (a.child) {
    await child(a);
    // Reads a deadline gave up on may still hold the loop: the stats are out, so go.
    process.exit(0);
  }
  if (a.replay) {
    const format = a.formats[0];
    if (!format) throw new Error('fuzz --replay needs --format');
    const r = await exerciseBounded(a.replay, format);
    console.log(`${a.replay}: ${r.outcome}, largest allocation ${r.maxAlloc} bytes`);
    return;
  }
  const formats = a.formats.length ? a.formats : SEED_FORMATS;
  const outDir = a.out ?? fs.mkdtempSync(path.join(os.tmpdir(), 'tsmount-fuzz-'));
  const seedsDir = path.join(outDir, 'seeds');
  fs.mkdirSync(seedsDir, { recursive: true });
  const log = (m: string): void => void process.stderr.write(`${m}\n`);
  const seeds: Seed[] = [];
  for (const f of formats) seeds.push(...(await makeSeeds(seedsDir, f, log)));
  fs.writeFileSync(path.join(seedsDir, 'seeds.json'), JSON.stringify(seeds));
  log(`fuzz: ${seeds.length} seeds, ${a.seconds} s per format, seed ${a.seed}, output ${outDir}`);
  const all: FormatStats[] = [];
  for (const f of formats) {
    if (!seeds.some((s) => s.format === f)) continue;
    const s = await fuzzFormat(f, a, seedsDir, outDir, log);
    log(`${f}: ${s.execs} inputs, ${s.corpus} kept, ${s.features} coverage features, ${s.refused} refused, ${s.read} read, ${s.findings.length} findings`);
    all.push(s);
  }
  const total = { formats: all.length, execs: all.reduce((n, s) => n + s.execs, 0), mutations: all.reduce((n, s) => n + Object.values(s.mutations).reduce((x, y) => x + y, 0), 0), findings: all.flatMap((s) => s.findings) };
  console.log(JSON.stringify({ total, perFormat: all.map(({ findings, ...s }) => ({ ...s, findings: findings.length })) }));
  if (!a.out && total.findings.length === 0) fs.rmSync(outDir, { recursive: true, force: true });
  process.exitCode = total.findings.length ? 1 : 0;
}

main().catch((err) => {
  console.error(`fuzz: ${(err as Error).stack ?? String(err)}`);
  process.exit(2);
});
