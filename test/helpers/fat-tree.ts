// Directory trees for the virtual FAT tests: random sizes and nesting, long names,
// non-ASCII names, names that collide in 8.3 form; and the ways to compare a tree
// with what came back out of the disk.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pattern } from './images.js';
import { prng } from './random.js';

/** The seeded PRNG the trees are made with, so a failing tree can be made again. */
export { prng };

const NAMES = [
  'a.txt', 'README', 'Makefile', 'data.bin', 'x', 'UPPER.TXT', 'MiXeD.Case', '.hidden', 'a.b.c.d',
  'A rather long file name with spaces.text', 'longfilename1.txt', 'longfilename2.txt', 'longfilename3.txt',
  'ünïcødé.txt', 'Ωμέγα', 'ファイル名.dat', 'tab[1]+(2).x', 'name;with,odd=chars',
  'very-long-name-' + 'x'.repeat(150) + '.ext', 'résumé.pdf', 'Ärger', '~tilde', 'dots...in.middle.txt',
];
const SIZES = [0, 1, 511, 512, 4095, 4096, 8191, 8192, 8193, 65536, 100_000];

export interface TreeOptions {
  seed: number;
  depth: number;
  /** Entries per directory at most. */
  width: number;
  /** Bytes of file data at most, in all. */
  maxBytes: number;
}

/** Make a tree under `root`; returns the number of files. */
export function makeTree(root: string, o: TreeOptions): number {
  const rnd = prng(o.seed);
  let budget = o.maxBytes;
  let files = 0;
  const fill = (dir: string, depth: number): void => {
    fs.mkdirSync(dir, { recursive: true });
    const n = 1 + Math.floor(rnd() * o.width);
    const used = new Set<string>();
    for (let i = 0; i < n; i++) {
      let name = NAMES[Math.floor(rnd() * NAMES.length)]!;
      if (used.has(name.toUpperCase())) name = `${i}-${name}`;
      if (used.has(name.toUpperCase())) continue;
      used.add(name.toUpperCase());
      const p = path.join(dir, name);
      if (depth < o.depth && rnd() < 0.3) {
        fill(p, depth + 1);
      } else {
        let size = rnd() < 0.7 ? SIZES[Math.floor(rnd() * SIZES.length)]! : Math.floor(rnd() * 300_000);
        size = Math.min(size, budget);
        budget -= size;
        fs.writeFileSync(p, pattern(size, Math.floor(rnd() * 1e9)));
        // Times a FAT date can hold, at its two-second grain; some in the past.
        const t = new Date(2000 + Math.floor(rnd() * 30), Math.floor(rnd() * 12), 1 + Math.floor(rnd() * 28), 12, 30, 10);
        fs.utimesSync(p, t, t);
        files++;
      }
    }
  };
  fill(root, 0);
  // An empty directory and a deep one.
  fs.mkdirSync(path.join(root, 'empty dir'), { recursive: true });
  fs.mkdirSync(path.join(root, 'deep', 'a', 'b', 'c', 'd', 'e', 'f', 'g'), { recursive: true });
  fs.writeFileSync(path.join(root, 'deep', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'bottom.txt'), 'bottom\n');
  return files + 1;
}

export interface Listed {
  dir: boolean;
  size: number;
  md5: string;
  mtimeMs: number;
}

/** Every path under root (relative, NFC as written) with its kind, size and md5. */
export function listTree(root: string): Map<string, Listed> {
  const out = new Map<string, Listed>();
  const walk = (rel: string): void => {
    for (const name of fs.readdirSync(path.join(root, rel)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      const st = fs.statSync(path.join(root, r));
      if (st.isDirectory()) {
        out.set(r, { dir: true, size: 0, md5: '', mtimeMs: st.mtimeMs });
        walk(r);
      } else {
        out.set(r, { dir: false, size: st.size, md5: crypto.createHash('md5').update(fs.readFileSync(path.join(root, r))).digest('hex'), mtimeMs: st.mtimeMs });
      }
    }
  };
  walk('');
  return out;
}

/** Differences between two listings, as lines a person reads. */
export function treeDiff(want: Map<string, Listed>, got: Map<string, Listed>, opts: { mtimes?: boolean } = {}): string[] {
  const out: string[] = [];
  for (const [p, w] of want) {
    const g = got.get(p);
    if (!g) out.push(`missing: ${p}`);
    else if (w.dir !== g.dir || w.size !== g.size || w.md5 !== g.md5) out.push(`differs: ${p} (${w.size} -> ${g.size})`);
    // FAT keeps modification times to two seconds, in local time.
    else if (opts.mtimes && !w.dir && Math.floor(w.mtimeMs / 2000) !== Math.floor(g.mtimeMs / 2000)) out.push(`mtime: ${p} ${new Date(w.mtimeMs).toISOString()} -> ${new Date(g.mtimeMs).toISOString()}`);
  }
  for (const p of got.keys()) if (!want.has(p)) out.push(`extra: ${p}`);
  return out;
}
