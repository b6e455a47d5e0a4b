// The read map (fs/read-map.ts) on damaged images, against the graph it maps. The FUSE
// workers answer a READ from the map alone (pread, inflate or decrypt of the host bytes
// it names: read-map-runs.ts), never asking the format driver, so every granule the map
// publishes must read as the graph reads it: the same bytes, or, where the graph gives an
// error, no answer from the map (fillRuns refuses, and the main thread gives the error).
// Each image of scripts/lib/seeds.ts, mutated by each kind of scripts/lib/mutate.ts, is
// opened as the server opens it (openGraph), its map walked over the first 16 MiB, and
// every published granule read both ways. Short in CI; TSMOUNT_SOAK=1 runs many more.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { openGraph } from '../drivers/open.js';
import type { BlockNode } from '../drivers/types.js';
import { ReadMap, readableAround } from '../fs/read-map.js';
import { fillRuns, readRuns } from '../fs/read-map-runs.js';
import { granuleOf, lookup } from '../fs/read-map-table.js';
import { MUTATION_KINDS, mutate, shapeOf } from '../scripts/lib/mutate.js';
import { makeSeeds, SEED_FORMATS, type Seed } from '../scripts/lib/seeds.js';
import { isClean, rng, withDeadline } from './helpers/corrupt.js';
import { tempDir } from './helpers/qemu.js';
import { threadCiphers } from './helpers/read-map.js';

const MiB = 1024 * 1024;
const SOAK = process.env.TSMOUNT_SOAK === '1';
/** Mutations per kind and seed (CI: one kind per seed in turn, as corruption.test.ts). */
const PER_KIND = SOAK ? 12 : 1;
/** The part of each disk whose map is walked and compared. */
const SPAN = 16 * MiB;
/** Reads of any offset and length (as a READ may be) per image, besides every granule alone. */
const RANGES = 16;
/** The longest of them: a READ's largest (fuse-session.ts max_write, 1 MiB - 4 KiB). */
const MAX_RANGE = MiB - 4096;
/** The mutations' seed: fixed in CI; TSMOUNT_MAP_SEED=N repeats a soak run's (each prints its own). */
const SEED = Number(process.env.TSMOUNT_MAP_SEED ?? (SOAK ? Date.now() & 0xffffff : 0x5eed));

interface Tally {
  images: number;
  refused: number;
  granules: number;
  served: number;
  /** Granules the map published whose graph read failed and which the map refused too. */
  refusedBoth: number;
}

/**
 * Open `file` as the server does, walk its map over the first SPAN bytes and compare
 * every published granule, and RANGES reads across granules, with the graph's read of
 * it. Returns how many were served from the map; throws what disagrees.
 */
async function compare(file: string, format: string, tally: Tally, random: () => number): Promise<number> {
  let node: BlockNode;
  try {
    [node] = (await withDeadline(
      openGraph([file], { readOnly: true, format, cache: 'writeback', cacheSize: 4 * MiB, locking: 'off', forceShare: false, shareRw: false, secret: 'x' }),
      `${file}: open`,
    )) as [BlockNode];
  } catch (err) {
    if (isClean(err)) {
      tally.refused++;
      return 0;
    }
    throw err;
  }
  tally.images++;
  const servedBefore = tally.served;
  try {
    if (!readableAround(node)) return 0;
    const map = new ReadMap(node);
    const span = Math.min(node.size, SPAN);
    const granule = granuleOf(map.table);
    const ciphers = threadCiphers(map);
    for (let at = 0; at < span; at += 4 * MiB) map.miss(at, 1);
    await withDeadline(map.idle(), `${file}: the map's walk`);
    const hit = [0, 0, 0, 0, 0];
    const runs: number[] = [];
    const fromMap = Buffer.alloc(MAX_RANGE);
    // A read that failed may still have parts in flight that write into its buffer (a
    // node's read rejects at its first failed part): as the server does with its reply
    // buffers (fuse-session.ts read), such a buffer is not used again.
    let fromGraph = Buffer.alloc(MAX_RANGE);
    /** [at, at + n) both ways, where readRuns covers it. */
    const both = async (at: number, n: number): Promise<void> => {
      const count = readRuns(map.table, at, n, [0, 0, 0, 0, 0], runs);
      if (count < 0) return;
      fromMap.fill(0xee, 0, n);
      let mapRead = false;
      try {
        mapRead = fillRuns(runs, count, fromMap, 0, ciphers, granule);
      } catch (err) {
        throw new Error(`${at}+${n}: the map's read threw (a worker would die): ${(err as Error).stack ?? String(err)}`);
      }
      let graphError: unknown;
      try {
        await withDeadline(node.read(at, fromGraph.subarray(0, n)), `${file}: read at ${at}`);
      } catch (err) {
        if (!isClean(err)) throw err;
        graphError = err;
        fromGraph = Buffer.alloc(MAX_RANGE);
      }
      if (!mapRead) {
        if (graphError) tally.refusedBoth++;
        return;
      }
      tally.served++;
      const where = `${at}+${n} (runs ${JSON.stringify(runs.slice(0, Math.min(count, 60)))})`;
      if (graphError) throw new Error(`${where}: the map serves it, the graph fails it: ${(graphError as Error).message}`);
      if (!fromMap.subarray(0, n).equals(fromGraph.subarray(0, n))) {
        let i = 0;
        while (fromMap[i] === fromGraph[i]) i++;
        throw new Error(`${where}: the map's bytes differ from the graph's from ${at + i} on`);
      }
    };
    for (let g = 0; g * granule < span; g++) {
      if (!lookup(map.table, g, hit)) continue;
      tally.granules++;
      await both(g * granule, Math.min(granule, node.size - g * granule));
    }
    for (let i = 0; i < RANGES; i++) {
      const at = Math.floor(random() * span);
      const n = 1 + Math.floor(random() * Math.min(MAX_RANGE, span - at));
      await both(at, n);
    }
  } finally {
    await node.close().catch(() => undefined);
  }
  return tally.served - servedBefore;
}

describe('the read map on damaged images: what the workers would serve is what the graph reads', function () {
  this.timeout(SOAK ? 3_600_000 : 300_000);
  let tmp: ReturnType<typeof tempDir>;
  let seeds: Seed[] = [];
  const tally: Tally = { images: 0, refused: 0, granules: 0, served: 0, refusedBoth: 0 };
  before(async function () {
    this.timeout(300_000);
    tmp = tempDir('read-map-hostile');
    seeds = await makeSeeds(tmp.dir);
  });
  after(() => {
    tmp.cleanup();
    console.log(`      seed ${SEED}: ${tally.images} images opened (${tally.refused} refused): ${tally.granules} granules published, ${tally.served} served from the map and compared, ${tally.refusedBoth} failed by both`);
  });

  for (const format of SEED_FORMATS) {
    it(`${format}: every published granule of each mutation reads as the graph reads it, or is refused where the graph fails it`, async function () {
      const mine = seeds.filter((s) => s.format === format);
      if (mine.length === 0) this.skip();
      for (const [v, seed] of mine.entries()) {
        const image = fs.readFileSync(seed.file);
        const shape = shapeOf(image);
        const random = rng(SEED ^ (seed.name.length * 977) ^ seed.name.charCodeAt(0));
        const file = path.join(path.dirname(seed.file), `map.${path.extname(seed.file).slice(1)}`);
        // The seed itself first: undamaged, the map serves it (but cloop's, whose every
        // block is compressed in a way the map does not publish: the JS thread reads them).
        const served = await compare(seed.file, format, tally, random).catch((err: unknown) => {
          throw new Error(`${seed.name} (undamaged): ${(err as Error).message}`);
        });
        if (format !== 'cloop') expect(served, `${seed.name} (undamaged): reads served from its map`).to.be.greaterThan(0);
        for (const [k, kind] of MUTATION_KINDS.entries()) {
          if (!SOAK && k % mine.length !== v) continue;
          for (let round = 0; round < PER_KIND; round++) {
            const { out, kind: done } = mutate(image, shape, random, { kind, other: image, selfName: path.basename(file) });
            fs.writeFileSync(file, out);
            try {
              await compare(file, format, tally, random);
            } catch (err) {
              // Keep the image for whoever looks next.
              const kept = path.join(path.dirname(tmp.dir), `read-map-hostile-${seed.name}-${done}-${round}.${path.extname(file).slice(1)}`);
              fs.copyFileSync(file, kept);
              throw new Error(`${seed.name} ${done} round ${round} (kept: ${kept}): ${(err as Error).message}`);
            }
          }
        }
      }
    });
  }
});
