// Test images made with QEMU's own tools at test time (shared/DESIGN.md, "Where the truth comes
// from"). Each fixture comes with the md5 of what `qemu-img convert -O raw` makes of it, which is
// what a flat file served by tsmount must hash to.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, imageInfo, qemuIo, rawMd5Sparse } from './lib/qemu.js';

export interface Fixture {
  name: string; // unique, readable: 'qcow2-v3-c512-refcount1', 'qcow2-backing-chain3-top'
  file: string; // absolute path of the image to open
  format: 'raw' | 'qcow2';
  size: number; // virtual size in bytes (from qemu-img info)
  rawMd5: string; // md5 of `qemu-img convert -O raw` of the image (run from the image's folder)
  description: string; // one line: what it covers
  tags: string[];
}

export interface MakeFixturesOptions {
  only?: (name: string) => boolean;
  big?: boolean; // images over 2 GiB virtual (sparse on disk); default true
}

// Bump when a change to this file changes images without changing a recipe's data below.
const GENERATOR_VERSION = 1;
const CONCURRENCY = 2;

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** One image; layers of a recipe are made in order, so a layer may name an earlier one as backing. */
interface Layer {
  name: string;
  format: 'raw' | 'qcow2';
  size: number;
  options?: Record<string, string | number>;
  backing?: string; // name of an earlier layer of the same recipe
  io?: string[]; // qemu-io commands, run in one process
  truncateTo?: number; // cut the file afterwards (raw only: a size that is not a multiple of 512)
  description: string;
  tags: string[];
}

/** Images made together: a backing chain is one recipe, so it is reused or rebuilt as a whole. */
interface Recipe {
  id: string;
  layers: Layer[];
}

const fileName = (l: { name: string; format: string }): string => `${l.name}.${l.format}`;

/** Distinct non-zero pattern bytes, so a read from the wrong place shows in the md5. */
function patterns(seed: number): () => string {
  let i = 0;
  return () => {
    const b = ((seed * 41 + i++ * 23) % 255) + 1;
    return `0x${b.toString(16).padStart(2, '0')}`;
  };
}

const write = (p: string, off: number, len: number): string => `write -P ${p} ${off} ${len}`;
const zero = (off: number, len: number): string => `write -z ${off} ${len}`;
const discard = (off: number, len: number): string => `discard ${off} ${len}`;
const compressed = (p: string, off: number, len: number): string => `write -c -P ${p} ${off} ${len}`;

/**
 * The workload every qcow2 option variant gets, in units of the cluster size so that it hits the
 * same cases at every size: full clusters, an unaligned write across a cluster boundary, a partly
 * written cluster, zero clusters over data and over nothing, a zero write inside a data cluster,
 * a discard, and data up to the last byte of the disk. Needs size >= 16 clusters.
 */
function clusterWorkload(cs: number, size: number, pat: () => string): string[] {
  return [
    write(pat(), 0, 3 * cs),
    write(pat(), cs - 100, 300),
    write(pat(), 4 * cs + cs / 4 + 3, cs / 2),
    write(pat(), 6 * cs, 2 * cs),
    zero(6 * cs, cs),
    zero(7 * cs + 7, cs / 2),
    write(pat(), 9 * cs, 3 * cs),
    discard(10 * cs, cs),
    zero(13 * cs, 2 * cs),
    write(pat(), size / 2 - 1, 2),
    write(pat(), size - cs - 333, cs + 333),
  ];
}

const WORKLOAD_DESC = 'unaligned writes across cluster boundaries, a partial cluster, zero clusters, a discard, data up to the last byte';

const sizeName = (cs: number): string => (cs >= MiB ? `${cs / MiB}m` : cs >= KiB ? `${cs / KiB}k` : `${cs}`);

function qcow2Variant(seed: number, compat: 'v2' | 'v3', cs: number, refcountBits?: number): Recipe {
  const size = Math.max(4 * MiB, 16 * cs);
  const name = `qcow2-${compat}-c${sizeName(cs)}${refcountBits ? `-refcount${refcountBits}` : ''}`;
  const options: Record<string, string | number> = { compat: compat === 'v2' ? '0.10' : '1.1', cluster_size: cs };
  if (refcountBits) options.refcount_bits = refcountBits;
  const tags = [compat, 'zero-clusters', 'discard', 'unaligned-writes', 'partial-clusters'];
  if (refcountBits) tags.push('refcount');
  return {
    id: name,
    layers: [
      {
        name,
        format: 'qcow2',
        size,
        options,
        io: clusterWorkload(cs, size, patterns(seed)),
        description: `qcow2 compat=${options.compat} cluster_size=${cs}${refcountBits ? ` refcount_bits=${refcountBits}` : ''}: ${WORKLOAD_DESC}`,
        tags,
      },
    ],
  };
}

function recipes(): Recipe[] {
  const out: Recipe[] = [];
  let seed = 0;
  const pat = (): (() => string) => patterns(++seed);
  const one = (layer: Layer): Recipe => ({ id: layer.name, layers: [layer] });

  {
    const p = pat();
    const io: string[] = [];
    for (let i = 0; i < 16; i++) io.push(write(p(), i * 64 * KiB, 64 * KiB));
    io.push(write(p(), 1000, 3000), write(p(), 64 * KiB - 7, 14));
    out.push(one({ name: 'raw-small-1m', format: 'raw', size: MiB, io, description: 'raw, 1 MiB filled with 64 KiB pattern runs and unaligned overwrites', tags: [] }));
  }
  {
    const p = pat();
    const size = MiB + 512;
    const io = [write(p(), 0, 4096), write(p(), 600 * KiB + 3, 5000), write(p(), size - 1000, 1000)];
    out.push(one({ name: 'raw-unaligned-1m512', format: 'raw', size, io, description: 'raw of 1 MiB + 512 bytes, data up to the last byte', tags: ['unaligned-size'] }));
  }
  {
    const p = pat();
    const io = [write(p(), 0, 1024), write(p(), 100, 900)];
    out.push(
      one({
        name: 'raw-odd-1000',
        format: 'raw',
        size: 1024,
        io,
        truncateTo: 1000,
        description: 'raw file of 1000 bytes: QEMU rounds it up to a 1024-byte disk whose last 24 bytes read as zeros',
        tags: ['unaligned-size'],
      }),
    );
  }
  {
    const p = pat();
    const size = 3 * GiB;
    const io = [write(p(), 0, 4096), write(p(), 2 ** 31 - 1000, 3000), write(p(), 2 ** 31 + MiB + 5, 70000), write(p(), size - 512, 512)];
    out.push(one({ name: 'raw-sparse-3g', format: 'raw', size, io, description: 'sparse raw of 3 GiB with data across 2^31 and at the last sector', tags: ['sparse', 'big'] }));
  }

  for (const compat of ['v3', 'v2'] as const) {
    for (const cs of [512, 4 * KiB, 64 * KiB, 2 * MiB]) out.push(qcow2Variant(++seed, compat, cs));
  }
  for (const [cs, bits] of [
    [512, 1],
    [4 * KiB, 2],
    [64 * KiB, 1],
    [64 * KiB, 2],
    [64 * KiB, 4],
    [64 * KiB, 8],
    [64 * KiB, 32],
    [64 * KiB, 64],
  ] as const) {
    out.push(qcow2Variant(++seed, 'v3', cs, bits));
  }

  for (const [compat, cs, size] of [
    ['v3', 64 * KiB, MiB + 4608],
    ['v2', 64 * KiB, MiB + 4608],
    ['v3', 2 * MiB, 3 * MiB + 512],
    ['v3', 4 * KiB, 100 * KiB + 512],
  ] as const) {
    const p = pat();
    // The last cluster is partial: write into it from the cluster before, and up to the last byte.
    const lastCluster = Math.floor(size / cs) * cs;
    const io = [write(p(), 0, 1000), write(p(), lastCluster - 700, 700 + (size - lastCluster) / 2), write(p(), size - 512 - 3, 515)];
    out.push(
      one({
        name: `qcow2-${compat}-c${sizeName(cs)}-size-unaligned`,
        format: 'qcow2',
        size,
        options: { compat: compat === 'v2' ? '0.10' : '1.1', cluster_size: cs },
        io,
        description: `qcow2 ${compat} of ${size} bytes with ${cs}-byte clusters: the last cluster is partial and holds data up to the last byte`,
        tags: [compat, 'unaligned-size'],
      }),
    );
  }

  for (const compat of ['v3', 'v2'] as const) {
    out.push(
      one({
        name: `qcow2-${compat}-empty`,
        format: 'qcow2',
        size: 64 * MiB,
        options: { compat: compat === 'v2' ? '0.10' : '1.1' },
        description: `qcow2 ${compat} of 64 MiB never written: no L2 tables at all, reads as zeros`,
        tags: [compat, 'empty'],
      }),
    );
  }

  {
    // base (64k clusters, v3) <- mid (4k clusters, v2) <- top (64k clusters, v3); each layer
    // overwrites parts of the one below, also partially inside its clusters so that qemu copies
    // the rest up from below; top zeroes clusters over data below.
    const p = pat();
    const size = 8 * MiB;
    const base: Layer = {
      name: 'qcow2-backing-chain3-base',
      format: 'qcow2',
      size,
      options: { compat: '1.1', cluster_size: 64 * KiB },
      io: [write(p(), 0, 2 * MiB), write(p(), 3 * MiB, MiB), write(p(), 6 * MiB - 5, 10), write(p(), size - 64 * KiB, 64 * KiB)],
      description: 'bottom of a 3-layer chain: qcow2 v3, 64 KiB clusters, data in 4 runs',
      tags: ['v3', 'backing'],
    };
    const mid: Layer = {
      name: 'qcow2-backing-chain3-mid',
      format: 'qcow2',
      size,
      options: { compat: '0.10', cluster_size: 4 * KiB },
      backing: base.name,
      io: [write(p(), 100 * KiB + 17, 10000), write(p(), 2 * MiB - 2048, 4096), zero(3 * MiB + 8 * KiB, 8 * KiB), discard(3 * MiB + 64 * KiB, 64 * KiB), write(p(), 5 * MiB, 4 * KiB)],
      description: 'middle of a 3-layer chain: qcow2 v2, 4 KiB clusters over 64 KiB ones; partial overwrites, a v2 zero write and a discard over backing data',
      tags: ['v2', 'backing', 'partial-clusters', 'discard'],
    };
    const top: Layer = {
      name: 'qcow2-backing-chain3-top',
      format: 'qcow2',
      size,
      options: { compat: '1.1', cluster_size: 64 * KiB },
      backing: mid.name,
      io: [write(p(), 64 * KiB + 1, 100), zero(MiB, 128 * KiB), zero(3 * MiB + 256 * KiB, 64 * KiB), write(p(), 2 * MiB - 3000, 6000), discard(size - 64 * KiB, 64 * KiB), write(p(), 7 * MiB, 512)],
      description: 'top of a 3-layer chain: qcow2 v3 with zero clusters and a discard over backing data, partial writes copied up from two layers below',
      tags: ['v3', 'backing', 'zero-clusters', 'partial-clusters', 'discard'],
    };
    out.push({ id: 'qcow2-backing-chain3', layers: [base, mid, top] });
  }
  {
    const p = pat();
    const baseSize = MiB + 1536;
    const size = 4 * MiB;
    const base: Layer = {
      name: 'qcow2-backing-short-base',
      format: 'qcow2',
      size: baseSize,
      options: { compat: '1.1' },
      io: [write(p(), 0, 64 * KiB), write(p(), baseSize - 4096, 4096)],
      description: 'backing file of 1 MiB + 1536 bytes for a 4 MiB overlay, data up to its last byte',
      tags: ['v3', 'backing', 'unaligned-size'],
    };
    const top: Layer = {
      name: 'qcow2-backing-short-top',
      format: 'qcow2',
      size,
      options: { compat: '1.1' },
      backing: base.name,
      io: [write(p(), 1000, 100), write(p(), MiB + 1000, 100), write(p(), 3 * MiB, 5000)],
      description: 'qcow2 of 4 MiB over a backing file that ends mid-cluster at 1 MiB + 1536: zeros past the backing end, a cluster copied up across it',
      tags: ['v3', 'backing', 'short-backing', 'partial-clusters'],
    };
    out.push({ id: 'qcow2-backing-short', layers: [base, top] });
  }
  {
    const p = pat();
    const base: Layer = {
      name: 'qcow2-backing-raw-base',
      format: 'raw',
      size: 2 * MiB,
      io: [write(p(), 0, 2 * MiB), write(p(), 300 * KiB + 3, 200 * KiB)],
      description: 'raw backing file of 2 MiB, fully written',
      tags: ['backing'],
    };
    const top: Layer = {
      name: 'qcow2-backing-raw-top',
      format: 'qcow2',
      size: 4 * MiB,
      options: { compat: '1.1' },
      backing: base.name,
      io: [write(p(), 64 * KiB + 5, 1000), zero(512 * KiB, 128 * KiB), write(p(), 2 * MiB - 100, 200), write(p(), 3 * MiB, 64 * KiB)],
      description: 'qcow2 of 4 MiB over a 2 MiB raw backing file: partial writes copied up from raw, zero clusters over raw data',
      tags: ['v3', 'backing', 'raw-backing', 'zero-clusters', 'partial-clusters', 'short-backing'],
    };
    out.push({ id: 'qcow2-backing-raw', layers: [base, top] });
  }
  {
    const p = pat();
    const size = 5 * GiB;
    out.push(
      one({
        name: 'qcow2-sparse-5g',
        format: 'qcow2',
        size,
        options: { compat: '1.1' },
        io: [
          write(p(), 0, 4096),
          write(p(), 2 ** 31 - 1000, 3000),
          write(p(), 2 ** 32 - 70000, 140000),
          zero(2 ** 32 + MiB, 128 * KiB),
          write(p(), size - 4096, 4096),
        ],
        description: 'qcow2 of 5 GiB virtual, sparse: data straddling 2^31 and 2^32 (across clusters), zero clusters past 2^32, the last 4 KiB',
        tags: ['v3', 'big', 'sparse', 'zero-clusters'],
      }),
    );
  }

  // Beyond the options above: clusters qemu can produce that a reader must also handle.
  for (const [compat, type] of [
    ['v3', 'zlib'],
    ['v3', 'zstd'],
    ['v2', 'zlib'],
  ] as const) {
    const p = pat();
    const options: Record<string, string | number> = { compat: compat === 'v2' ? '0.10' : '1.1' };
    if (type === 'zstd') options.compression_type = 'zstd';
    out.push(
      one({
        name: `qcow2-${compat}-compressed${type === 'zstd' ? '-zstd' : ''}`,
        format: 'qcow2',
        size: 4 * MiB,
        options,
        // A compressed cluster partly overwritten is decompressed and rewritten by qemu.
        io: [compressed(p(), 0, 256 * KiB), compressed(p(), MiB, 64 * KiB), write(p(), 64 * KiB + 100, 200), write(p(), 2 * MiB, 64 * KiB)],
        description: `qcow2 ${compat} with ${type}-compressed clusters next to plain ones, one compressed cluster partly overwritten`,
        tags: [compat, 'compressed', ...(type === 'zstd' ? ['zstd'] : [])],
      }),
    );
  }
  {
    const p = pat();
    out.push(
      one({
        name: 'qcow2-v3-extended-l2',
        format: 'qcow2',
        size: 4 * MiB,
        options: { compat: '1.1', extended_l2: 'on' },
        io: [write(p(), 0, 64 * KiB), write(p(), 128 * KiB + 2048, 2048), write(p(), 200 * KiB + 5, 3000), zero(8 * KiB, 4 * KiB), zero(MiB, 64 * KiB)],
        description: 'qcow2 v3 with extended L2 entries (32 subclusters of 2 KiB): partly allocated clusters, zero subclusters',
        tags: ['v3', 'extended-l2', 'zero-clusters', 'partial-clusters'],
      }),
    );
  }
  {
    const p = pat();
    out.push(
      one({
        name: 'qcow2-v3-prealloc-metadata',
        format: 'qcow2',
        size: 4 * MiB,
        options: { compat: '1.1', preallocation: 'metadata' },
        io: [write(p(), 100 * KiB + 1, 1000), write(p(), 3 * MiB, 64 * KiB)],
        description: 'qcow2 v3 with preallocation=metadata: every cluster allocated (zero-flagged) before a few writes',
        tags: ['v3', 'preallocated'],
      }),
    );
  }
  return out;
}

interface ManifestFixture extends Omit<Fixture, 'file'> {
  file: string; // relative to the manifest's folder
  fileSize: number;
  mtimeNs: string;
}
interface Manifest {
  version: number;
  recipes: Record<string, { hash: string; fixtures: ManifestFixture[] }>;
}

const MANIFEST = 'manifest.json';

function recipeHash(r: Recipe): string {
  return crypto.createHash('sha256').update(JSON.stringify({ v: GENERATOR_VERSION, r })).digest('hex');
}

function readManifest(dir: string): Manifest {
  try {
    const m = JSON.parse(fs.readFileSync(path.join(dir, MANIFEST), 'utf8')) as Manifest;
    if (m.version === GENERATOR_VERSION && typeof m.recipes === 'object' && m.recipes) return m;
  } catch {
    /* missing or unreadable: start afresh */
  }
  return { version: GENERATOR_VERSION, recipes: {} };
}

/** Merge with what another process may have written meanwhile, and replace atomically. */
function writeManifest(dir: string, made: Manifest['recipes']): void {
  const m = readManifest(dir);
  Object.assign(m.recipes, made);
  const tmp = path.join(dir, `.${MANIFEST}.${process.pid}.tmp`);
  fs.writeFileSync(tmp, JSON.stringify(m, null, 1) + '\n');
  fs.renameSync(tmp, path.join(dir, MANIFEST));
}

function stamp(file: string): { fileSize: number; mtimeNs: string } | undefined {
  try {
    const st = fs.statSync(file, { bigint: true });
    return { fileSize: Number(st.size), mtimeNs: String(st.mtimeNs) };
  } catch {
    return undefined;
  }
}

function reusable(dir: string, entry: Manifest['recipes'][string] | undefined, hash: string): boolean {
  if (!entry || entry.hash !== hash) return false;
  return entry.fixtures.every((f) => {
    const s = stamp(path.join(dir, f.file));
    return s !== undefined && s.fileSize === f.fileSize && s.mtimeNs === f.mtimeNs;
  });
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Staging folders and manifest drafts of processes that died mid-generation. */
function removeStaleStaging(dir: string): void {
  for (const e of fs.readdirSync(dir)) {
    const m = /^\.(?:staging-|manifest\.json\.)(\d+)[-.]/.exec(e);
    if (m && !isAlive(Number(m[1]))) fs.rmSync(path.join(dir, e), { recursive: true, force: true });
  }
}

/**
 * Make a recipe's images in a private staging folder and move them into `dir` only when all are
 * done, so `dir` never holds a half-made image and concurrent runs do not trip over each other.
 * Backing file names are relative, so the images keep working after the move.
 */
async function make(dir: string, r: Recipe): Promise<ManifestFixture[]> {
  const staging = fs.mkdtempSync(path.join(dir, `.staging-${process.pid}-`));
  try {
    const made: Omit<ManifestFixture, 'fileSize' | 'mtimeNs'>[] = [];
    for (const l of r.layers) {
      const file = path.join(staging, fileName(l));
      const b = l.backing === undefined ? undefined : r.layers.find((x) => x.name === l.backing);
      if (l.backing !== undefined && !b) throw new Error(`fixture ${l.name}: backing ${l.backing} is not an earlier layer`);
      await createImage(file, l.format, l.size, l.options, b && { file: fileName(b), format: b.format });
      if (l.io?.length) await qemuIo(file, l.format, l.io);
      if (l.truncateTo !== undefined) fs.truncateSync(file, l.truncateTo);
      const info = await imageInfo(file, l.format);
      made.push({
        name: l.name,
        file: fileName(l),
        format: l.format,
        size: info['virtual-size'],
        rawMd5: await rawMd5Sparse(file, l.format),
        description: l.description,
        tags: l.tags,
      });
    }
    // Bottom layer first: a reader that finds an overlay in `dir` finds its backing file there too.
    return made.map((f) => {
      const dst = path.join(dir, f.file);
      fs.renameSync(path.join(staging, f.file), dst);
      const s = stamp(dst);
      if (!s) throw new Error(`fixture ${f.name}: ${dst} vanished after it was made`);
      return { ...f, ...s };
    });
  } finally {
    fs.rmSync(staging, { recursive: true, force: true });
  }
}

/** Run `fn` over `items`, at most `limit` at a time; rejects with the first error once all started ones have settled. */
async function pool<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: { error: unknown } | undefined;
  const lane = async (): Promise<void> => {
    while (!failure && next < items.length) {
      const item = items[next++] as T;
      try {
        await fn(item);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
  if (failure) throw failure.error;
}

/**
 * Make (or reuse from an earlier run) the fixture images in `dir`. A recipe's images are reused
 * when `dir/manifest.json` lists them with the same recipe and each file still has the size and
 * mtime it had when made; otherwise they are made again.
 */
export async function makeFixtures(dir: string, opts: MakeFixturesOptions = {}): Promise<Fixture[]> {
  const root = path.resolve(dir);
  fs.mkdirSync(root, { recursive: true });
  removeStaleStaging(root);
  const selected = (name: string): boolean => opts.only?.(name) ?? true;
  const wanted = recipes().filter((r) => r.layers.some((l) => selected(l.name)) && (opts.big !== false || !r.layers.some((l) => l.tags.includes('big'))));

  const known = readManifest(root).recipes;
  const result = new Map<string, ManifestFixture[]>();
  const made: Manifest['recipes'] = {};
  const todo: Recipe[] = [];
  for (const r of wanted) {
    const entry = known[r.id];
    if (entry && reusable(root, entry, recipeHash(r))) result.set(r.id, entry.fixtures);
    else todo.push(r);
  }
  // Largest first, so the big images do not end up last on one lane.
  todo.sort((a, b) => Number(b.layers.some((l) => l.tags.includes('big'))) - Number(a.layers.some((l) => l.tags.includes('big'))));
  try {
    await pool(todo, CONCURRENCY, async (r) => {
      const fixtures = await make(root, r);
      made[r.id] = { hash: recipeHash(r), fixtures };
      result.set(r.id, fixtures);
    });
  } finally {
    if (Object.keys(made).length) writeManifest(root, made);
  }

  const out: Fixture[] = [];
  for (const r of wanted) {
    for (const f of result.get(r.id) ?? []) {
      if (!selected(f.name)) continue;
      out.push({ name: f.name, file: path.join(root, f.file), format: f.format, size: f.size, rawMd5: f.rawMd5, description: f.description, tags: [...f.tags] });
    }
  }
  return out;
}
