// tsimg convert: copy what a source image reads into a new image of any writable
// format. The source is read through its whole chain (drivers/open.ts), the target is
// made by the format's create() (tsimg create) and written through its node. Sparse:
// ranges the chain reports as holes are skipped, and 4 KiB blocks of zeros inside data
// are not written (qemu-img convert's default -S 4k), so the new image stays unallocated there.
// Several sources are concatenated, as qemu-img does. -c writes whole clusters through
// the node's writeCompressed (qcow2, qcow); vmdk takes -c and compresses exactly when the
// extents are streamOptimized, as QEMU's vmdk; every other format refuses it.
import type { BlockNode, Extent } from '../../drivers/types.js';
import { chainStatus } from '../../fs/extents.js';
import { openImage } from '../../drivers/open.js';
import { protocolFor } from '../../drivers/protocol/index.js';
import { createImage } from '../../drivers/create.js';
import { ReadOnlyError, UsageError } from '../../drivers/errors.js';
import { openForRead, progress, readOnlyOptions, readSecret, type OpenCli } from './common.js';

export interface ConvertCli extends OpenCli {
  outputFormat: string;
  options: string[];
  progress?: boolean;
  targetSecret?: string;
  targetSecretFile?: string;
  /** -B: the new image is an overlay of this file, holding only the differences. */
  backingFile?: string;
  /** -F: the format of the -B file. */
  backingFormat?: string;
  /** -n: write into an existing image. */
  skipCreate?: boolean;
  /** -W: out-of-order writes, several requests in flight. */
  parallel?: boolean;
  /** -c: compress where the format can (qcow2, qcow; vmdk streamOptimized always does). */
  compress?: boolean;
}

/** qemu-img convert's IO_BUF_SIZE: half the write requests of 1 MiB ones (counted with strace). */
const CHUNK = 2 << 20;
/** qemu-img convert's -S default: zero runs this long (and aligned) are left unwritten. */
const SPARSE = 4096;

function allZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** Write `buf` (guest bytes at `offset`) to `dst`, skipping aligned SPARSE blocks of zeros. */
async function writeSparse(dst: BlockNode, offset: number, buf: Uint8Array): Promise<void> {
  let start = -1;
  for (let i = 0; i < buf.length; ) {
    const next = Math.min(buf.length, i + SPARSE - ((offset + i) % SPARSE));
    const zero = allZero(buf.subarray(i, next));
    if (!zero && start < 0) start = i;
    if (zero && start >= 0) {
      await dst.write(offset + start, buf.subarray(start, i));
      start = -1;
    }
    i = next;
  }
  if (start >= 0) await dst.write(offset + start, buf.subarray(start));
}

/** Requests in flight with -W (qemu-img convert's default -m 8). */
const IN_FLIGHT = 8;
/** With -B, the unit compared against the backing file and written where it differs. */
const UNIT = 64 << 10;

export interface CopyOptions {
  /** Share done, 0..1. */
  progress?: (done: number) => void;
  /** -W: several chunks in flight, written out of order. */
  parallel?: boolean;
  /** -B: dst reads a backing file; write only what reads differently from it. */
  onlyDifferences?: boolean;
  /** -c: whole clusters of data go through dst.writeCompressed. */
  compress?: boolean;
}

/** Whether any of `runs` holds data inside [a, b). */
function dataIn(runs: { offset: number; length: number; data: boolean }[], a: number, b: number): boolean {
  return runs.some((f) => f.data && f.offset < b && f.offset + f.length > a);
}

/**
 * Copy every data run of `src` into `dst`, a new image; `progress` gets the share done,
 * 0..1. Where the source is a hole and the new image does not read as one (LUKS: its
 * empty payload decrypts to noise; qemu's has_zero_init false; a backing file under
 * -B), zeros are written.
 */
export async function copyImage(src: BlockNode, dst: BlockNode, o: CopyOptions = {}): Promise<void> {
  const cs = o.compress ? dst.compressedClusterSize : undefined;
  if (o.compress && (cs === undefined || !dst.writeCompressed)) throw new UsageError(`${dst.name}: Compression not supported for this file format`);
  // A chunk holds whole clusters (qcow2's go up to 2 MiB).
  const chunkSize = cs === undefined ? CHUNK : Math.max(CHUNK, cs);
  const zeros = new Uint8Array(chunkSize);

  /** -c: the clusters of the chunk that hold data, read whole and written compressed, all in flight at once. */
  const compressed = async (pos: number, n: number, runs: { offset: number; length: number; data: boolean }[], fresh: typeof runs, buf: Buffer, cur: Buffer): Promise<void> => {
    const writes: Promise<void>[] = [];
    for (let a = pos; a < pos + n; a += cs!) {
      const b = Math.min(a + cs!, src.size);
      if (!dataIn(runs, a, b)) continue;
      writes.push(
        (async () => {
          const part = buf.subarray(a - pos, b - pos);
          await src.read(a, part);
          // Zeros are left out where the new image reads zeros already; -B writes only what differs.
          if (!dataIn(fresh, a, b)) {
            if (allZero(part)) return;
          } else if (o.onlyDifferences) {
            const now = cur.subarray(a - pos, b - pos);
            await dst.read(a, now);
            if (part.equals(now)) return;
          }
          // Only the disk's last cluster may be short; a shorter source's last cluster is written as it is.
          if (b - a === cs || b === dst.size) await dst.writeCompressed!(a, part);
          else await dst.write(a, part);
        })(),
      );
    }
    await Promise.all(writes);
  };

  const chunk = async (pos: number, buf: Buffer, cur: Buffer): Promise<void> => {
    const n = Math.min(chunkSize, src.size - pos);
    const inDst = Math.min(n, dst.size - pos);
    const fresh = inDst > 0 ? await chainStatus(dst, pos, inDst) : [];
    const runs = await chainStatus(src, pos, n);
    for (const r of runs) {
      if (r.data && cs !== undefined) continue;
      if (r.data) {
        const part = buf.subarray(0, r.length);
        await src.read(r.offset, part);
        // Zeros may be left out only where the new image already reads as zeros.
        const holeBelow = fresh.every((f) => !f.data || f.offset + f.length <= r.offset || f.offset >= r.offset + r.length);
        if (holeBelow) await writeSparse(dst, r.offset, part);
        else if (o.onlyDifferences) await writeDifferences(dst, r.offset, part, cur.subarray(0, r.length));
        else await dst.write(r.offset, part);
        continue;
      }
      for (const f of fresh) {
        const s = Math.max(f.offset, r.offset);
        const t = Math.min(f.offset + f.length, r.offset + r.length);
        if (!f.data || t <= s) continue;
        if (dst.zero) await dst.zero(s, t - s, false);
        else await dst.write(s, zeros.subarray(0, t - s));
      }
    }
    if (cs !== undefined) await compressed(pos, n, runs, fresh, buf, cur);
  };
  const chunks = Math.ceil(src.size / chunkSize);
  let next = 0;
  let done = 0;
  const worker = async (): Promise<void> => {
    const buf = Buffer.alloc(chunkSize);
    const cur = Buffer.alloc(o.onlyDifferences ? chunkSize : 0);
    while (next < chunks) {
      const i = next++;
      await chunk(i * chunkSize, buf, cur);
      done++;
      o.progress?.(done / chunks);
    }
  };
  await Promise.all(Array.from({ length: o.parallel ? Math.min(IN_FLIGHT, Math.max(1, chunks)) : 1 }, worker));
}

/** Write the UNIT pieces of `data` that differ from what `dst` reads there now (-B). */
async function writeDifferences(dst: BlockNode, offset: number, data: Buffer, cur: Buffer): Promise<void> {
  await dst.read(offset, cur);
  for (let i = 0; i < data.length; ) {
    const next = Math.min(data.length, i + UNIT - ((offset + i) % UNIT));
    if (!data.subarray(i, next).equals(cur.subarray(i, next))) await dst.write(offset + i, data.subarray(i, next));
    i = next;
  }
}

/**
 * Several sources as one disk, one after the other (qemu-img convert SRC1 SRC2 ... DST):
 * reads and block status go to the source that holds the bytes. Each source's status
 * is already resolved through its own chain, so this node has no backing.
 */
class Concatenation implements BlockNode {
  readonly readOnly = true;
  readonly size: number;
  private readonly starts: number[] = [];

  constructor(private readonly parts: BlockNode[]) {
    let at = 0;
    for (const p of parts) {
      this.starts.push(at);
      at += p.size;
    }
    this.size = at;
  }

  get name(): string {
    return this.parts.map((p) => p.name).join(' + ');
  }

  /** The pieces of [offset, offset + length) per source: [source, offset in it, length, offset here]. */
  private pieces(offset: number, length: number): [BlockNode, number, number, number][] {
    const out: [BlockNode, number, number, number][] = [];
    this.parts.forEach((p, i) => {
      const s = Math.max(offset, this.starts[i]!);
      const t = Math.min(offset + length, this.starts[i]! + p.size);
      if (t > s) out.push([p, s - this.starts[i]!, t - s, s]);
    });
    return out;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    await Promise.all(this.pieces(offset, dst.length).map(([p, at, n, here]) => p.read(at, dst.subarray(here - offset, here - offset + n))));
  }

  write(): Promise<void> {
    return Promise.reject(new ReadOnlyError(`${this.name}: the sources of a convert are read only`));
  }

  async flush(): Promise<void> {}

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    for (const [p, at, n, here] of this.pieces(offset, length)) {
      for (const r of await chainStatus(p, at, n)) out.push({ offset: r.offset - at + here, length: r.length, kind: r.data ? 'data' : 'zero' });
    }
    return out;
  }

  async close(): Promise<void> {
    for (const p of this.parts) await p.close();
  }
}

/** Open every source, read-only; one that fails closes those opened before it. */
async function openSources(specs: string[], o: ConvertCli): Promise<BlockNode> {
  const opened: BlockNode[] = [];
  try {
    for (const spec of specs) opened.push(await openForRead(spec, o));
  } catch (err) {
    for (const n of opened) await n.close().catch(() => undefined);
    throw err;
  }
  return opened.length === 1 ? opened[0]! : new Concatenation(opened);
}

/** Formats that take -c without a compressed write of their own: vmdk compresses its streamOptimized extents always (QEMU's vmdk_co_pwritev_compressed is its plain write). */
const COMPRESSING_FORMATS = new Set(['vmdk']);

export async function convert(srcSpecs: string[], dstSpec: string, o: ConvertCli): Promise<void> {
  if (srcSpecs.length === 0) throw new UsageError('convert needs a source and a target');
  const src = await openSources(srcSpecs, o);
  try {
    const targetSecret = readSecret({ secret: o.targetSecret, secretFile: o.targetSecretFile });
    if (!o.skipCreate) {
      await createImage(dstSpec, String(src.size), {
        format: o.outputFormat,
        options: o.options,
        secret: targetSecret,
        quiet: true,
        backing: o.backingFile,
        backingFormat: o.backingFormat,
      });
    }
    let ok = false;
    try {
      // With -B the new image opens with its backing file, so that only differences are written.
      // cache=unsafe, qemu-img convert's default for the target (-t): no flush until the
      // end is worth anything for an image nobody uses before convert returns; strace
      // counted 10 fdatasync calls for a 1 GiB convert before, qemu-img makes none.
      const dst = await openImage(dstSpec, readOnlyOptions({ format: o.outputFormat }, { readOnly: false, cache: 'unsafe', secret: targetSecret, namedFiles: 'owner', noBacking: o.backingFile === undefined && !o.skipCreate }));
      try {
        if (o.skipCreate && dst.size < src.size) throw new UsageError(`${dstSpec}: the target (${dst.size} bytes) is smaller than the source (${src.size} bytes)`);
        // qemu-img's refusal, before anything is written.
        const compress = o.compress === true && !COMPRESSING_FORMATS.has(o.outputFormat);
        if (compress && !dst.writeCompressed) throw new UsageError(`${dstSpec}: Compression not supported for this file format`);
        // Progress on a terminal, or anywhere with -p.
        const show = progress(o.progress);
        await copyImage(src, dst, { progress: show?.update, parallel: o.parallel, onlyDifferences: o.backingFile !== undefined || o.skipCreate === true, compress });
        await dst.flush();
        show?.done();
        ok = true;
      } finally {
        await dst.close();
      }
    } finally {
      // A convert that failed leaves no half-written image behind (-n: the image was there before).
      if (!ok && !o.skipCreate) await protocolFor(dstSpec).remove?.(dstSpec).catch(() => undefined);
    }
  } finally {
    await src.close();
  }
}
