// The qcow2 format node: read, write, zero, flush, grow, block status (QEMU's qcow2.c).
// Mapping lives in cluster.ts, allocation in refcount.ts; this file does the I/O
// and decides the order in which data and metadata reach the disk.
import { writeEncrypted } from '../../util/write-encrypted.js';
import type { BitmapBits, BitmapControl, BlockNode, WriteLog, CheckReport, Extent, ExtentKind, HostCipher, ImageDescription, Preallocation, SnapshotControl, SnapshotView, TruncateOptions, ZeroOptions } from '../../types.js';
import type { CreateOptions } from '../../options.js';
// Snapshot operations, amend and downgrade are imported when called: reading needs none of them.
import type { SnapshotContext, SnapshotState } from './snapshot-ops.js';
import type { Downgrader } from './amend.js';
import { IoError, UnsupportedError, UsageError } from '../../errors.js';
import type { Table, TableCache } from '../../../cache/table-cache.js';
import { closeLayers, readFromBacking } from '../backing.js';
import { splitByHoles } from '../mapped.js';
import { sizable } from '../../resize.js';
import type { ClusterMap, Run } from './cluster.js';
import type { Refcounts } from './refcount.js';
import type { BitmapTracker } from './bitmap.js';
import { ALL_SUBCLUSTERS, LO, SUBCLUSTERS, bitRange, encodeL1, encodeL2, encodeL2Compressed, encodeL2Ext, subclusterKind, type L2Entry } from './entries.js';
import { compressBlock, type CompressCodec } from '../../util/compress.js';
import { COMPRESSION } from './compress.js';
import { acquireInflatePool, decompressClusters } from './inflate-pool.js';
import { EXT, HDR, INCOMPAT, LIMITS } from './header.js';
import { Mutex } from '../../util/mutex.js';
import { SECTOR, type DataCrypt } from './crypt.js';
import { OL, type MetadataGuard } from './overlap.js';
import { constants as osc } from 'node:os';
import createDebug from '../../util/debug.js';

const debug = createDebug('tsmount:qcow2');

export interface Qcow2NodeOptions {
  file: BlockNode;
  size: number;
  readOnly: boolean;
  version: 2 | 3;
  backing: BlockNode | undefined;
  map: ClusterMap;
  refcounts: Refcounts;
  refcountCache: TableCache;
  /** Flush the file between dependent metadata writes (false for cache=unsafe). */
  barriers: boolean;
  /** External data file (qcow2.txt, "data file"); guest data lives there, not in `file`. */
  dataFile?: BlockNode;
  /** The data file's name as the header gives it (Extent.elsewhere's). */
  dataFileName?: string;
  /** data_file_raw: the data file is a valid raw image (host offset = guest offset). */
  dataFileRaw?: boolean;
  /** Header compression_type: 0 zlib, 1 zstd. */
  compressionType?: number;
  /** A snapshot view: shares the file, caches and backing node with the active node; close() leaves them open. */
  view?: boolean;
  /** The snapshot name, for a view (used in its name). */
  viewName?: string;
  /** Encrypted data clusters (requests then arrive 512-byte aligned: requestAlignment). */
  crypt?: DataCrypt;
  /** Runs once before the first change to the image (bitmaps, autoclear bits). */
  beforeFirstChange?: () => Promise<void>;
  /** The image's persistent bitmaps (bitmap.ts): loaded by beforeFirstChange, marked by every change, stored at close. */
  bitmaps?: BitmapTracker;
  /** A bitmap's bits as the file holds them (the active node: read-only or not). */
  readBitmap?: (name: string) => Promise<BitmapBits>;
  /** Metadata overlap checks (writable nodes): where the tables are, and the corrupt state. */
  guard?: MetadataGuard;
  /** What tsimg info shows (the active node only). */
  description?: ImageDescription;
  /** The read-only consistency check (check.ts), for the active node only. */
  check?: () => Promise<CheckReport>;
  /** Rebuild the refcounts from the references (repair.ts), for the active node only. */
  repair?: (leaksOnly: boolean) => Promise<void>;
  /** The header's snapshot fields, for the active node: what snapshot-ops.ts changes. */
  snapshotState?: SnapshotState;
}

/** Zeros written per request when zeroing has to write data (v2 with a backing file). */
const ZERO_CHUNK = 1 << 20;
/** Decompressed clusters kept per node, for sequential reads inside one cluster. */
const DECOMPRESSED_KEEP = 8;
/** Compressed clusters of one read whose bytes are at most this far apart share one file read. */
const COMPRESSED_GAP = 4096;
/** Bytes of the file one shared read of compressed clusters may cover. */
const COMPRESSED_SPAN = 4 << 20;
/** Shared reads up to this size use pooled buffers of this size; a few are kept per node. */
const COMPRESSED_POOL_BYTES = 1 << 20;
const COMPRESSED_POOL_KEEP = 4;

/** Zeros nobody writes into, grown to the largest piece asked for (a cluster: 2 MiB at most). */
let zeroPad = Buffer.alloc(0);
function sharedZeros(n: number): Uint8Array {
  if (zeroPad.length < n) zeroPad = Buffer.alloc(n);
  return zeroPad.subarray(0, n);
}

export class Qcow2Node implements BlockNode {
  private currentSize: number;
  readonly readOnly: boolean;
  readonly backing: BlockNode | undefined;
  private readonly file: BlockNode;
  /** Where guest data clusters live: the external data file or the image file. */
  private readonly data: BlockNode;
  private readonly dataFileRaw: boolean;
  private readonly dataFileName: string;
  private readonly compressionType: number;
  private readonly cs: number;
  private readonly v3: boolean;
  private readonly map: ClusterMap;
  private readonly refcounts: Refcounts;
  private readonly refcountCache: TableCache;
  private readonly barriers: boolean;
  private readonly isView: boolean;
  private readonly viewName: string | undefined;
  private readonly mutex = new Mutex();
  /** In-place writes in flight; freed clusters are not handed out again until they end. */
  private readonly inflight = new Set<Promise<boolean>>();
  private readonly decompressed = new Map<number, Promise<Buffer>>();
  /** Decompressions another read took from `decompressed` (see takeDecompressed). */
  private readonly handedOut = new WeakSet<Promise<Buffer>>();
  /** Input buffers for shared reads of compressed clusters, reused (see readCompressedGroup). */
  private readonly inputPool: Buffer[] = [];
  private snapshotViews: SnapshotView[] = [];
  private readonly beforeFirstChange: (() => Promise<void>) | undefined;
  private readonly bitmaps: BitmapTracker | undefined;
  private readonly readBitmapFn: ((name: string) => Promise<BitmapBits>) | undefined;
  private readonly crypt: DataCrypt | undefined;
  readonly encrypted: boolean;
  private readonly guard: MetadataGuard | undefined;
  private readonly description: ImageDescription;
  private readonly checkFn: (() => Promise<CheckReport>) | undefined;
  private readonly snapshotState: SnapshotState | undefined;
  private readonly repairFn: ((leaksOnly: boolean) => Promise<void>) | undefined;
  readonly requestAlignment: number | undefined;
  private prepared: Promise<void> | undefined;
  private preparedDone = false;
  private closed = false;
  /** Releases this node's use of the inflate workers (taken at the first compressed read). */
  private releaseInflate: (() => void) | undefined;
  /**
   * Where the next compressed cluster may start: the byte after the last one, inside a
   * host cluster that holds it (QEMU's free_byte_offset); 0 for none.
   */
  private compressedTail = 0;
  /** The refcounts' decrement count when compressedTail was set: a free since then forgets the tail. */
  private tailDecrements = 0;

  constructor(o: Qcow2NodeOptions) {
    this.file = o.file;
    this.data = o.dataFile ?? o.file;
    this.dataFileRaw = o.dataFileRaw ?? false;
    this.dataFileName = o.dataFileName ?? this.data.name;
    this.compressionType = o.compressionType ?? 0;
    this.currentSize = o.size;
    this.readOnly = o.readOnly;
    this.v3 = o.version === 3;
    this.backing = o.backing;
    this.map = o.map;
    this.cs = o.map.clusterSize;
    this.refcounts = o.refcounts;
    this.refcountCache = o.refcountCache;
    this.barriers = o.barriers;
    this.isView = o.view ?? false;
    this.viewName = o.viewName;
    this.beforeFirstChange = o.beforeFirstChange;
    this.bitmaps = o.bitmaps;
    this.readBitmapFn = o.readBitmap;
    this.crypt = o.crypt;
    this.encrypted = o.crypt !== undefined;
    this.guard = o.guard;
    this.description = o.description ?? { clusterSize: this.cs };
    this.checkFn = o.check;
    this.snapshotState = o.snapshotState;
    this.repairFn = o.repair;
    // Encrypted sectors are the unit: unaligned requests become aligned ones above.
    this.requestAlignment = o.crypt ? SECTOR : undefined;
  }

  /** Data cluster bytes at `host` that guest offset `guest` maps to, decrypted. */
  private async readData(host: number, guest: number, dst: Uint8Array): Promise<void> {
    await this.data.read(host, dst);
    if (this.crypt) this.crypt.cipher.decrypt(dst, (this.crypt.physical ? host : guest) / SECTOR);
  }

  private writeData(host: number, guest: number, src: Uint8Array): Promise<void> {
    // A data cluster that is really a table of ours: refuse, mark the image corrupt.
    // The data file holds no metadata (QEMU skips the check there too).
    if (this.guard && this.data === this.file) {
      const refused = this.guard.check(host, src.length);
      if (refused) return refused;
    }
    if (!this.crypt) return this.data.write(host, src);
    return writeEncrypted(this.crypt.cipher, src, (this.crypt.physical ? host : guest) / SECTOR, (buf) => this.data.write(host, buf));
  }

  /**
   * Data laid end to end from `host` as one write: a pwritev where the data node
   * offers it (the file protocol), else one buffer. Encrypted data is joined anyway,
   * since it is encrypted in a copy.
   */
  private writeDataParts(host: number, guest: number, parts: Uint8Array[]): Promise<void> {
    if (parts.length === 1) return this.writeData(host, guest, parts[0]!);
    if (this.crypt || !this.data.writev) return this.writeData(host, guest, Buffer.concat(parts));
    if (this.guard && this.data === this.file) {
      let length = 0;
      for (const p of parts) length += p.length;
      const refused = this.guard.check(host, length);
      if (refused) return refused;
    }
    return this.data.writev(host, parts);
  }

  /** Run the before-first-change hook once; a failure is retried by the next change. */
  private prepare(): Promise<void> {
    if (!this.beforeFirstChange) return Promise.resolve();
    this.prepared ??= this.beforeFirstChange().then(
      () => {
        this.preparedDone = true;
      },
      (err: unknown) => {
        this.prepared = undefined;
        throw err;
      },
    );
    return this.prepared;
  }

  /**
   * Overwrites of plain COPIED clusters may go around this node (blockStatus marks them
   * inPlace), as writeInPlace() would write them: once the first change's hook ran,
   * where the data is plain (in the image file, or in an external data file that takes
   * such writes too), and never once corrupt.
   */
  get inPlaceWrites(): boolean {
    return !this.readOnly && !this.isView && !this.crypt && (this.preparedDone || !this.beforeFirstChange) && (this.bitmaps?.aroundWrites ?? true) && !this.guard?.corrupt && this.file.inPlaceWrites === true && this.data.inPlaceWrites === true;
  }

  /** Where writes around this node are recorded for its persistent bitmaps (bitmap.ts), from the open on. */
  get writeLog(): WriteLog | undefined {
    return this.readOnly || this.isView ? undefined : this.bitmaps?.writeLog;
  }

  /**
   * Refcounts changed other than for data clusters a write allocated: a table or
   * refcount block may now be where a writable cluster was (a corrupt image's refcounts
   * can call a cluster in use free), or space was freed. A new data cluster is not one
   * of these: it holds guest data only, and where a corrupt image's L2 entry names it
   * too, this node's own writes to either guest cluster land there alike.
   */
  get layoutGeneration(): number {
    return this.refcounts.changes - this.refcounts.dataChanges;
  }

  /** Refcounts changed at all: host clusters were allocated (data too) or freed. */
  get allocationGeneration(): number {
    return this.refcounts.changes;
  }

  /** A write allocates whole clusters. */
  get allocationUnit(): number {
    return this.cs;
  }

  get size(): number {
    return this.currentSize;
  }

  get name(): string {
    return this.viewName === undefined ? this.file.name : `${this.file.name}@${this.viewName}`;
  }

  /** Internal snapshots as read-only nodes (fs/ shows them as <stem>@<name>.raw). */
  snapshots(): SnapshotView[] {
    return this.snapshotViews;
  }

  describe(): ImageDescription {
    return this.description;
  }

  /** Only the active node checks; an unflushed writer's refcounts would not be on disk yet. */
  get checkMetadata(): (() => Promise<CheckReport>) | undefined {
    const check = this.checkFn;
    return check && this.readOnly ? check : undefined;
  }

  /** qemu-img check -r: the refcounts rebuilt from what references each cluster (writable active node). */
  get repairMetadata(): ((mode: 'leaks' | 'all') => Promise<void>) | undefined {
    const repair = this.repairFn;
    if (!repair || this.readOnly || this.isView) return undefined;
    return async (mode) => {
      await this.flush();
      await this.mutex.run(() => repair(mode === 'leaks'));
    };
  }

  setSnapshots(views: SnapshotView[]): void {
    this.snapshotViews = views;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    const runs = await this.map.map(offset, dst.length);
    if (debug.enabled) debug('%s: read %d+%d maps to %s', this.name, offset, dst.length, runs.map((r) => `${r.kind} ${r.guest}+${r.length}${r.kind === 'compressed' ? ` at ${r.cOffset}` : r.kind === 'data' ? ` at ${r.host}` : ''}`).join(', '));
    if (runs.length === 1) return this.readRun(runs[0]!, offset, dst);
    const parts: Promise<void>[] = [];
    let i = 0;
    while (i < runs.length) {
      const run = runs[i]!;
      if (run.kind !== 'compressed') {
        parts.push(this.readRun(run, offset, dst));
        i++;
        continue;
      }
      // Compressed clusters of one request whose bytes lie together in the file
      // (qemu-img convert -c packs them back to back) are read with one pread and
      // inflated in parallel on the thread pool.
      const j = this.compressedGroupEnd(runs, i);
      if (j - i === 1) parts.push(this.readRun(run, offset, dst));
      else parts.push(this.readCompressedGroup(runs.slice(i, j), offset, dst));
      i = j;
    }
    await Promise.all(parts);
  }

  /**
   * The end (exclusive) of the group of compressed runs starting at runs[i] that one
   * file read covers: each next cluster's bytes start at or after the previous one's,
   * within COMPRESSED_GAP of the group's end, and the group spans at most
   * COMPRESSED_SPAN bytes of the file. Clusters already decompressed end a group.
   */
  private compressedGroupEnd(runs: Run[], i: number): number {
    const first = runs[i]!;
    if (this.decompressed.has(first.cOffset)) return i + 1;
    const start = first.cOffset;
    let end = first.cOffset + first.cLength;
    let prev = first.cOffset;
    let j = i + 1;
    while (j < runs.length) {
      const r = runs[j]!;
      if (r.kind !== 'compressed' || r.cOffset < prev || r.cOffset > end + COMPRESSED_GAP || this.decompressed.has(r.cOffset)) break;
      const e = Math.max(end, r.cOffset + r.cLength);
      if (e - start > COMPRESSED_SPAN) break;
      end = e;
      prev = r.cOffset;
      j++;
    }
    return j;
  }

  /** Compressed runs (see compressedGroupEnd) read with one file read, inflated in parallel. */
  private async readCompressedGroup(group: Run[], base: number, dst: Uint8Array): Promise<void> {
    const start = group[0]!.cOffset;
    let end = start;
    for (const r of group) end = Math.max(end, r.cOffset + r.cLength);
    // Past the end of the file there is nothing to read (a corrupt length); each
    // cluster then gets what there is, and fails to decompress as it would alone.
    const stop = Math.max(start, Math.min(end, this.file.size));
    // Shared memory, so that the inflate workers read the compressed bytes in place.
    const pooled = stop - start <= COMPRESSED_POOL_BYTES ? this.inputPool.pop() : undefined;
    const buf = (pooled ?? Buffer.from(new SharedArrayBuffer(Math.max(stop - start, COMPRESSED_POOL_BYTES)))).subarray(0, stop - start);
    const shared = stop > start ? this.file.read(start, buf).then(() => buf) : Promise.resolve(buf);
    // Each cluster's promise is made now (so that overlapping reads share it) and
    // settled once the bytes are read and the workers have inflated them. This
    // request's own clusters are copied into dst straight from the workers' memory;
    // a cluster's promise gets a copy of its bytes only if it is still kept or another
    // read took it.
    const others = new Map<number, Promise<Buffer>>();
    const mine = new Map<number, { runs: Run[]; q: Promise<Buffer>; resolve: (b: Buffer) => void; reject: (e: unknown) => void }>();
    for (const run of group) {
      const m = mine.get(run.cOffset);
      if (m) m.runs.push(run);
      if (m || others.has(run.cOffset)) continue;
      const p = this.takeDecompressed(run.cOffset);
      if (p) {
        others.set(run.cOffset, p);
        continue;
      }
      let settle!: { resolve: (b: Buffer) => void; reject: (e: unknown) => void };
      const q = new Promise<Buffer>((resolve, reject) => (settle = { resolve, reject }));
      mine.set(run.cOffset, { runs: [run], q, ...settle });
      // A cluster this request reads whole is not kept for later reads: a sequential
      // reader never comes back to it, and keeping it cost a 64 KiB copy out of the
      // workers' memory (and its garbage) per cluster. Partly read clusters are kept,
      // for the next small read that continues into them.
      if (run.guest !== run.clusterGuest || run.length !== this.cs) this.keepDecompressed(run.cOffset, q);
    }
    const copy = (run: Run, c: Uint8Array): void => {
      dst.set(c.subarray(run.guest - run.clusterGuest, run.guest - run.clusterGuest + run.length), run.guest - base);
    };
    const todo = [...mine.values()];
    shared.then(
      (b) => {
        const parts = todo.map((t) => {
          const run = t.runs[0]!;
          const from = run.cOffset - start;
          return {
            from,
            to: Math.max(from, Math.min(run.cOffset + run.cLength, stop) - start),
            what: `${this.name}: guest offset 0x${run.clusterGuest.toString(16)}`,
            use: (bytes: Uint8Array) => {
              for (const r of t.runs) copy(r, bytes);
            },
            keep: () => this.decompressed.get(run.cOffset) === t.q || this.handedOut.has(t.q),
          };
        });
        try {
          this.useInflate();
          decompressClusters(this.compressionType, b, parts, this.cs).forEach((p, i) => p.then(todo[i]!.resolve, todo[i]!.reject));
        } catch (err) {
          for (const t of todo) t.reject(err);
        }
      },
      (err: unknown) => {
        for (const t of todo) t.reject(err);
      },
    );
    const done: Promise<void>[] = todo.map((t) => t.q.then(() => undefined));
    for (const run of group) {
      const p = others.get(run.cOffset);
      if (p) done.push(p.then((c) => copy(run, c)));
    }
    // The input buffer goes back to the pool only once no inflate reads it any more.
    const settled = await Promise.allSettled(done);
    if (buf.buffer.byteLength === COMPRESSED_POOL_BYTES && this.inputPool.length < COMPRESSED_POOL_KEEP) this.inputPool.push(Buffer.from(buf.buffer, buf.byteOffset, COMPRESSED_POOL_BYTES));
    for (const r of settled) if (r.status === 'rejected') throw r.reason;
  }

  private readRun(run: Run, base: number, dst: Uint8Array): Promise<void> {
    const sub = dst.subarray(run.guest - base, run.guest - base + run.length);
    switch (run.kind) {
      case 'data':
        return this.readData(run.host, run.guest, sub);
      case 'zero':
        sub.fill(0);
        return Promise.resolve();
      case 'unallocated':
        return readFromBacking(this.backing, run.guest, sub);
      case 'compressed':
        return this.readCompressed(run.cOffset, run.cLength, run.clusterGuest).then((c) => {
          sub.set(c.subarray(run.guest - run.clusterGuest, run.guest - run.clusterGuest + run.length));
        });
    }
  }

  /** The decompressed bytes of a compressed cluster (kept for a few clusters). */
  private readCompressed(cOffset: number, cLength: number, guest: number): Promise<Buffer> {
    let p = this.takeDecompressed(cOffset);
    if (p) return p;
    p = (async () => {
      const n = Math.max(0, Math.min(cLength, this.file.size - cOffset));
      const buf = Buffer.allocUnsafe(n);
      if (n > 0) await this.file.read(cOffset, buf);
      this.useInflate();
      return decompressClusters(this.compressionType, buf, [{ from: 0, to: n, what: `${this.name}: guest offset 0x${guest.toString(16)}` }], this.cs)[0]!;
    })();
    this.keepDecompressed(cOffset, p);
    return p;
  }

  /** A kept cluster's decompression, marked as taken (readCompressedGroup then keeps its bytes). */
  private takeDecompressed(cOffset: number): Promise<Buffer> | undefined {
    const p = this.decompressed.get(cOffset);
    if (p) this.handedOut.add(p);
    return p;
  }

  /** Count this node as a user of the inflate workers (until close). */
  private useInflate(): void {
    if (!this.releaseInflate && !this.closed) this.releaseInflate = acquireInflatePool();
  }

  /** Remember a cluster's decompression (a failed one is forgotten, so a retry reads again). */
  private keepDecompressed(cOffset: number, p: Promise<Buffer>): void {
    this.decompressed.set(cOffset, p);
    p.catch(() => {
      if (this.decompressed.get(cOffset) === p) this.decompressed.delete(cOffset);
    });
    if (this.decompressed.size > DECOMPRESSED_KEEP) this.decompressed.delete(this.decompressed.keys().next().value!);
  }

  /** Refuse changes to an image marked corrupt since it was opened (read-only nodes: drivers/filters/read-only.ts). */
  private checkWritable(): void {
    if (this.guard?.corrupt) throw this.guard.refusal();
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    this.checkWritable();
    await this.prepare();
    this.bitmaps?.mark(offset, src.length);
    const inPlace = this.writeInPlace(offset, src);
    this.inflight.add(inPlace);
    let done: boolean;
    try {
      done = await inPlace;
    } finally {
      this.inflight.delete(inPlace);
    }
    if (!done) await this.mutex.run(() => this.writeLocked(offset, src));
  }

  /** The common case, without the mutex: every cluster is allocated and ours alone. */
  private async writeInPlace(offset: number, src: Uint8Array): Promise<boolean> {
    const runs = await this.map.map(offset, src.length);
    if (!runs.every((r) => r.kind === 'data' && r.copied)) return false;
    const sub = (r: Run): Uint8Array => src.subarray(r.guest - offset, r.guest - offset + r.length);
    if (runs.length === 1) await this.writeData(runs[0]!.host, offset, src);
    else await Promise.all(runs.map((r) => this.writeData(r.host, r.guest, sub(r))));
    return true;
  }

  /** The codec of this image's compressed clusters, where this node may write them. */
  private compressCodec(): CompressCodec | undefined {
    // QEMU refuses compressed writes with an external data file; encrypted clusters are never compressed.
    if (this.readOnly || this.isView || this.data !== this.file || this.crypt) return undefined;
    return this.compressionType === COMPRESSION.zlib ? 'deflate-raw' : this.compressionType === COMPRESSION.zstd ? 'zstd' : undefined;
  }

  get compressedClusterSize(): number | undefined {
    return this.compressCodec() ? this.cs : undefined;
  }

  get writeCompressed(): ((offset: number, data: Uint8Array) => Promise<void>) | undefined {
    const codec = this.compressCodec();
    return codec && ((offset, data) => this.compressedWrite(codec, offset, data));
  }

  /**
   * One whole cluster, compressed (QEMU's qcow2_co_pwritev_compressed): compressed off
   * the event loop, then under the mutex given bytes packed after the last compressed
   * cluster, a reference on every host cluster they touch, and the L2 entry. A cluster
   * that does not shrink is written normally; one that already has a host cluster is
   * refused, as QEMU refuses it (qemu-img convert -n -c onto an allocated image).
   */
  private async compressedWrite(codec: CompressCodec, offset: number, data: Uint8Array): Promise<void> {
    const cs = this.cs;
    if (offset % cs !== 0 || data.length === 0 || data.length > cs || (data.length < cs && offset + data.length !== this.size)) {
      throw new UsageError(`${this.name}: a compressed write must be one whole cluster (${data.length} bytes at ${offset})`);
    }
    this.checkWritable();
    await this.prepare();
    this.bitmaps?.mark(offset, data.length);
    let whole = data;
    if (data.length < cs) {
      // The last cluster of a disk whose size is not a multiple of clusters: zero padded.
      whole = new Uint8Array(cs);
      whole.set(data);
    }
    const packed = await compressBlock(codec, whole, cs - 1);
    if (!packed) return this.write(offset, data);
    await this.mutex.run(async () => {
      const gc = offset / cs;
      const l1i = Math.floor(offset / this.map.l2Span);
      const baseIndex = l1i * this.map.l2Entries;
      const l2Offset = await this.l2ForWrite(l1i);
      const old = this.map.entry(await this.map.l2Cache.get(l2Offset), gc - baseIndex, gc);
      // QEMU 7.2's qcow2_alloc_compressed_cluster_offset: compressed data never overwrites
      // a cluster that has a host offset (data, preallocated zeros, or compressed), -EIO,
      // before anything is allocated, so the image stays consistent.
      if (old.kind === 'compressed' || hasHost(old)) throw new IoError(`${this.name}: error while writing at byte ${offset}: Input/output error (compressed data cannot overwrite an allocated cluster)`);
      const host = await this.allocateBytes(packed.length);
      // Written to the end of its last sector, so the file never ends inside one (the
      // padding is the next compressed cluster's place, which overwrites it).
      const end = Math.ceil((host + packed.length) / SECTOR) * SECTOR;
      const out = Buffer.alloc(end - host);
      out.set(packed);
      await this.writeData(host, offset, out);
      const table = await this.map.l2Cache.get(l2Offset);
      encodeL2Compressed(table.view(), gc - baseIndex, this.map.extended, this.map.clusterBits, host, packed.length);
      this.map.l2Cache.markDirty(table);
    });
  }

  /**
   * `size` bytes (less than a cluster) for compressed data, counted (QEMU's
   * qcow2_alloc_bytes): after the last compressed cluster while they fit in its host
   * cluster or the one after it is free, else at the start of a new cluster. Every host
   * cluster the bytes touch gets one reference more. The caller holds the mutex.
   */
  private async allocateBytes(size: number): Promise<number> {
    const cs = this.cs;
    let offset = this.compressedTail;
    if (offset !== 0) {
      const stale = this.refcounts.decrements !== this.tailDecrements;
      if (stale || (await this.refcounts.refcount(Math.floor(offset / cs))) >= this.refcounts.maxRefcount) offset = 0;
    }
    const room = offset === 0 ? 0 : cs - (offset % cs);
    if (offset !== 0 && room >= size) {
      await this.refcounts.adjust(Math.floor(offset / cs), 1);
    } else {
      const { start } = await this.refcounts.allocate(1);
      // The new cluster counts its reference already; the one before it, when the bytes start there, gets one more.
      if (offset !== 0 && start * cs === offset + room) await this.refcounts.adjust(Math.floor(offset / cs), 1);
      else offset = start * cs;
    }
    const end = offset + size;
    this.compressedTail = end % cs === 0 ? 0 : end;
    this.tailDecrements = this.refcounts.decrements;
    return offset;
  }

  /** Write with allocation; the caller holds the mutex. */
  private async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    const end = offset + src.length;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / this.map.l2Span);
      const chunkEnd = Math.min(end, (l1i + 1) * this.map.l2Span);
      const l2Offset = await this.l2ForWrite(l1i);
      await this.writeInTable(l2Offset, l1i, pos, src.subarray(pos - offset, chunkEnd - offset));
      pos = chunkEnd;
    }
  }

  /**
   * The L2 table for L1 index l1i, made writable: allocated if missing, its COPIED
   * flag set if its refcount is one. A new table's L1 entry reaches the file with the
   * L2 cache's next flush, after the table and a barrier (ClusterMap.l1Tail): QEMU's
   * l2_allocate flushes the file twice here instead, which in a long write is a
   * writeback of everything written so far.
   */
  private async l2ForWrite(l1i: number): Promise<number> {
    const e = this.map.l1Entry(l1i);
    if (e.offset !== 0) {
      if (!e.copied) {
        const rc = await this.refcounts.refcount(e.offset / this.cs);
        if (rc !== 1) return this.copyL2(l1i, e.offset);
        await this.map.setL1Entry(l1i, e.offset, true);
      }
      return e.offset;
    }
    const { start } = await this.refcounts.allocate(1);
    const offset = start * this.cs;
    this.guard?.add(offset, this.cs, OL.activeL2);
    this.map.l2Cache.getNew(offset);
    await this.coverTable(offset);
    this.map.setL1EntryLater(l1i, offset, true);
    return offset;
  }

  /**
   * A new table past the end of the file is written (empty) at once, so that the
   * file covers what the L1 entry names (decodeL1 checks it); its bytes proper follow
   * with the cache's, before the entry is written.
   */
  private async coverTable(offset: number): Promise<void> {
    if (offset + this.cs > this.file.size) await this.file.write(offset, Buffer.alloc(this.cs));
  }


  /**
   * Copy an L2 table shared with a snapshot (QEMU's qcow2-cluster.c l2_allocate with
   * an existing table): the copy's refcount, the copy, then the L1 entry (with the L2
   * cache's next flush); the old table loses this reference only once the L1 entry is on disk. The data clusters
   * keep their counts: the snapshot's table and the copy each hold them once.
   */
  private async copyL2(l1i: number, oldOffset: number): Promise<number> {
    const { start } = await this.refcounts.allocate(1);
    const offset = start * this.cs;
    this.guard?.add(offset, this.cs, OL.activeL2);
    const old = await this.map.l2Cache.get(oldOffset);
    const table = this.map.l2Cache.getNew(offset);
    old.data.copy(table.data);
    this.map.l2Cache.markDirty(table);
    await this.coverTable(offset);
    this.map.setL1EntryLater(l1i, offset, true);
    // The old table is now only a snapshot's (inactive L2: QEMU's cached mode does not check those).
    // Its reference goes at the flush, after the new entry is on disk (the L2 cache's tail, then the frees).
    this.guard?.remove(oldOffset, OL.activeL2);
    this.refcounts.queueFree(oldOffset);
    return offset;
  }

  private snapshotEntries(table: Table, first: number, count: number, baseIndex: number): L2Entry[] {
    const entries: L2Entry[] = [];
    for (let k = 0; k < count; k++) entries.push(this.map.entry(table, first + k - baseIndex, first + k));
    return entries;
  }

  /** Subclusters [s0, s1) of guest cluster gc that [pos, end) touches, as a bitmap. */
  private touched(gc: number, pos: number, end: number): number {
    const cs = this.cs;
    const scs = this.map.subclusterSize;
    const a = Math.max(pos, gc * cs) - gc * cs;
    const b = Math.min(end, (gc + 1) * cs) - gc * cs;
    return bitRange(Math.floor(a / scs), Math.ceil(b / scs));
  }

  /** Write data that lies inside one L2 table's range. */
  private async writeInTable(l2Offset: number, l1i: number, pos: number, data: Uint8Array): Promise<void> {
    const cs = this.cs;
    const ext = this.map.extended;
    const end = pos + data.length;
    const first = Math.floor(pos / cs);
    const count = Math.ceil(end / cs) - first;
    const baseIndex = l1i * this.map.l2Entries;
    // Tables are never held across an await: a clean table may be evicted and
    // read back as another object. Snapshot the entries, re-get to modify.
    let entries = this.snapshotEntries(await this.map.l2Cache.get(l2Offset), first, count, baseIndex);

    // A compressed cluster the write covers only in part becomes a normal one first.
    let expanded = false;
    for (let k = 0; k < count; k++) {
      const gc = first + k;
      const covered = pos <= gc * cs && end >= Math.min((gc + 1) * cs, this.size);
      if (entries[k]!.kind === 'compressed' && !covered) {
        await this.expandCompressed(l2Offset, baseIndex, gc, entries[k]!);
        expanded = true;
      }
    }
    if (expanded) entries = this.snapshotEntries(await this.map.l2Cache.get(l2Offset), first, count, baseIndex);

    const mask = (k: number): number => (ext ? this.touched(first + k, pos, end) : ALL_SUBCLUSTERS);
    const inPlace = (k: number): boolean => {
      const e = entries[k]!;
      return e.kind === 'data' && e.copied && (!ext || ((e.alloc & mask(k)) >>> 0) === mask(k));
    };
    // A host cluster of ours that the write may fill without moving it: a
    // preallocated zero cluster, or (extended L2) one with unallocated subclusters.
    const reusable = (k: number): boolean => {
      const e = entries[k]!;
      return hasHost(e) && e.copied && !inPlace(k);
    };

    let i = 0;
    while (i < count) {
      const e = entries[i]!;
      if (inPlace(i)) {
        let j = i + 1;
        while (j < count && inPlace(j) && entries[j]!.host === e.host + (j - i) * cs) j++;
        const from = Math.max(pos, (first + i) * cs);
        const to = Math.min(end, (first + j) * cs);
        await this.writeData(e.host + (from - (first + i) * cs), from, data.subarray(from - pos, to - pos));
        i = j;
        continue;
      }
      if (reusable(i)) {
        // A run of them, contiguous on the host, is one write.
        let j = i + 1;
        while (j < count && reusable(j) && entries[j]!.host === e.host + (j - i) * cs) j++;
        await this.writeUnits(first + i, first + j, e.host, entries.slice(i, j), pos, data);
        const table = await this.map.l2Cache.get(l2Offset);
        const dv = table.view();
        for (let k = i; k < j; k++) {
          const old = entries[k]!;
          const m = mask(k);
          if (ext) encodeL2Ext(dv, first + k - baseIndex, old.host, true, (old.alloc | m) >>> 0, (old.zeros & ~m) >>> 0);
          else encodeL2(dv, first + k - baseIndex, old.host, true, false);
        }
        this.map.l2Cache.markDirty(table);
        i = j;
        continue;
      }
      let j = i + 1;
      while (j < count && !inPlace(j) && !reusable(j)) j++;
      let host: number;
      if (this.data !== this.file) {
        // With a data file, QEMU puts each data cluster at its guest offset and counts none of them.
        host = (first + i) * cs;
      } else {
        const got = await this.refcounts.allocate(j - i, true);
        j = i + got.count;
        host = got.start * cs;
      }
      // Extended L2: the copy of a cluster shared with a snapshot spans its allocated subclusters too.
      const span = ext ? this.cowSpan(first + i, first + j, entries[i]!, entries[j - 1]!, pos, end) : undefined;
      // New data first; the L2 entries that point at it after.
      await this.writeUnits(first + i, first + j, host, entries.slice(i, j), pos, data, span, this.data === this.file);
      const table = await this.map.l2Cache.get(l2Offset);
      const dv = table.view();
      for (let k = i; k < j; k++) {
        const old = entries[k]!;
        const at = host + (k - i) * cs;
        if (ext) {
          const m = this.touched(first + k, span!.a, span!.b);
          encodeL2Ext(dv, first + k - baseIndex, at, true, m, (old.zeros & ~m) >>> 0);
        } else encodeL2(dv, first + k - baseIndex, at, true, false);
        this.freeEntry(old);
      }
      this.map.l2Cache.markDirty(table);
      i = j;
    }
  }

  /**
   * Give back what an entry pointed at, once the change is on disk; `discard`: freed at
   * the guest's request (a zero that may free), so the space goes back to the file too.
   */
  private freeEntry(old: L2Entry, discard = false): void {
    if (this.data !== this.file) return; // data file clusters are not refcounted
    if (old.kind === 'compressed') {
      // Every host cluster the compressed bytes touch holds one reference (qcow2_free_any_cluster).
      const firstCluster = Math.floor(old.cOffset / this.cs);
      const lastCluster = Math.floor((old.cOffset + old.cLength - 1) / this.cs);
      for (let c = firstCluster; c <= lastCluster; c++) this.refcounts.queueFree(c * this.cs, discard);
      this.decompressed.delete(old.cOffset);
    } else if (old.host !== 0) {
      this.refcounts.queueFree(old.host, discard);
    }
  }

  /**
   * Give free host clusters back to the file (a hole punched, QEMU's discard passed
   * down as with discard=unmap), in runs; never where a table of ours lies (a corrupt
   * image's data entry may have named one).
   */
  private async discardHost(clusters: number[]): Promise<void> {
    if (!this.file.discard || clusters.length === 0 || !this.guard) return;
    const cs = this.cs;
    for (let i = 0; i < clusters.length; ) {
      let j = i + 1;
      while (j < clusters.length && clusters[j] === clusters[j - 1]! + 1) j++;
      const offset = clusters[i]! * cs;
      const length = (j - i) * cs;
      if (!this.guard.touches(offset, length)) await this.file.discard(offset, length);
      i = j;
    }
  }

  /** Replace compressed cluster gc by a normal cluster with the same bytes. */
  private async expandCompressed(l2Offset: number, baseIndex: number, gc: number, e: L2Entry): Promise<void> {
    const bytes = await this.readCompressed(e.cOffset, e.cLength, gc * this.cs);
    const { start } = await this.refcounts.allocate(1);
    const host = start * this.cs;
    await this.writeData(host, gc * this.cs, bytes);
    const table = await this.map.l2Cache.get(l2Offset);
    if (this.map.extended) encodeL2Ext(table.view(), gc - baseIndex, host, true, ALL_SUBCLUSTERS, 0);
    else encodeL2(table.view(), gc - baseIndex, host, true, false);
    this.map.l2Cache.markDirty(table);
    this.freeEntry(e);
  }

  /**
   * Extended L2: the guest range a write of [pos, end) into new host clusters for guest
   * clusters [c0, c1) fills, as QEMU's calculate_l2_meta: subclusters the write touches,
   * and where the old first or last cluster has a host cluster (shared with a snapshot,
   * so copied), from its first allocated subcluster and to its last one, so that the new
   * cluster holds every subcluster the old one held; zero and unallocated subclusters
   * outside stay so.
   */
  private cowSpan(c0: number, c1: number, first: L2Entry, last: L2Entry, pos: number, end: number): { a: number; b: number } {
    const cs = this.cs;
    const scs = this.map.subclusterSize;
    let a = Math.floor(Math.max(pos, c0 * cs) / scs) * scs;
    let b = Math.min(Math.ceil(Math.min(end, c1 * cs) / scs) * scs, c1 * cs);
    if (hasHost(first) && first.alloc !== 0) a = Math.min(a, c0 * cs + ctz32(first.alloc) * scs);
    if (hasHost(last) && last.alloc !== 0) b = Math.max(b, c1 * cs - Math.clz32(last.alloc) * scs);
    return { a, b };
  }

  /**
   * Write guest clusters [c0, c1) to host clusters from `host`: the written bytes,
   * and the parts of the first and last unit (subcluster with extended L2, else
   * cluster) the write does not cover with what they read as before. `span` (extended
   * L2, cowSpan) widens them to that guest range. One write for all of it
   * (QEMU's merge_cow): the old head, the new bytes, the old tail, with no copy of
   * the new bytes. `fresh`: the host clusters were just allocated for this write, so
   * where the head and tail read as zeros, zeros allocated without writing them do
   * (QEMU's handle_alloc_space): a 4 KiB write into a new 64 KiB cluster, 136 us as one
   * zero-filled write, 14 us so (scripts/BENCHMARKS.md, session 18).
   */
  private async writeUnits(c0: number, c1: number, host: number, olds: L2Entry[], pos: number, data: Uint8Array, span?: { a: number; b: number }, fresh = false): Promise<void> {
    const cs = this.cs;
    const u = this.map.subclusterSize;
    const from = Math.max(pos, c0 * cs);
    const to = Math.min(pos + data.length, c1 * cs);
    const a = span?.a ?? Math.floor(from / u) * u;
    const b = span?.b ?? Math.ceil(to / u) * u;
    const body = data.subarray(from - pos, to - pos);
    if (a === from && b === to) return this.writeData(host + (from - c0 * cs), from, body);
    if (fresh && !this.crypt && this.data === this.file && this.file.allocateZeros && this.readsAsZeros(c0, olds, a, from) && this.readsAsZeros(c0, olds, to, b)) {
      // Free by the refcounts is not proof in a corrupt image: the zeros must overlap no table either.
      const at = host + (a - c0 * cs);
      const refused = this.guard?.check(at, b - a);
      if (refused) return refused;
      if (await this.file.allocateZeros(at, b - a)) return this.writeData(host + (from - c0 * cs), from, body);
    }
    const head = from > a ? this.cowPart(c0, olds, a, from) : undefined;
    const tail = b > to ? this.cowPart(c0, olds, to, b) : undefined;
    await Promise.all([head?.fill, tail?.fill]);
    const parts: Uint8Array[] = [];
    if (head) parts.push(head.bytes);
    parts.push(body);
    if (tail) parts.push(tail.bytes);
    await this.writeDataParts(host + (a - c0 * cs), a, parts);
  }

  /**
   * The old bytes of guest [ga, gb) to write around new data: where all of it reads as
   * zeros without a read (zero or unallocated over no backing data, past the disk's end:
   * a fresh cluster of a disk without a backing file), a piece of one shared zero buffer,
   * which nothing writes into; else a zeroed buffer `fill` reads the old bytes into.
   * A new zeroed buffer per allocating write cost a third of a convert of 4 KiB writes
   * into 64 KiB clusters (allocation, zeroing, GC: scripts/BENCHMARKS.md, session 14).
   */
  private cowPart(c0: number, olds: L2Entry[], ga: number, gb: number): { bytes: Uint8Array; fill?: Promise<void> } {
    if (this.readsAsZeros(c0, olds, ga, gb)) return { bytes: sharedZeros(gb - ga) };
    // Zeroed: cowFill leaves zero subclusters and bytes past the disk's end as they are.
    const bytes = Buffer.alloc(gb - ga);
    return { bytes, fill: this.cowFill(c0, olds, ga, gb, bytes) };
  }

  /** Whether guest bytes [ga, gb) read as zeros before the write with no read at all (olds: entries of clusters from c0). */
  private readsAsZeros(c0: number, olds: L2Entry[], ga: number, gb: number): boolean {
    const cs = this.cs;
    const scs = this.map.subclusterSize;
    const backingEnd = this.backing?.size ?? 0;
    for (let g = ga; g < gb && g < this.size; ) {
      const gc = Math.floor(g / cs);
      const s = Math.floor((g - gc * cs) / scs);
      const next = Math.min(gb, gc * cs + (s + 1) * scs);
      const kind = subclusterKind(olds[gc - c0]!, this.map.extended, s);
      if (kind === 'data' || kind === 'compressed' || (kind === 'unallocated' && g < backingEnd)) return false;
      g = next;
    }
    return true;
  }

  /** Guest bytes [ga, gb) as they read before the write (olds: entries of clusters from c0). */
  private async cowFill(c0: number, olds: L2Entry[], ga: number, gb: number, dst: Uint8Array): Promise<void> {
    if (gb <= ga) return;
    const cs = this.cs;
    const scs = this.map.subclusterSize;
    const parts: Promise<void>[] = [];
    let g = ga;
    while (g < gb) {
      const gc = Math.floor(g / cs);
      const s = Math.floor((g - gc * cs) / scs);
      const next = Math.min(gb, gc * cs + (s + 1) * scs);
      const old = olds[gc - c0]!;
      // Past the end of the disk stays zero.
      const limit = Math.min(next, Math.max(g, this.size));
      const part = dst.subarray(g - ga, limit - ga);
      if (part.length > 0) {
        switch (subclusterKind(old, this.map.extended, s)) {
          case 'unallocated':
            parts.push(readFromBacking(this.backing, g, part));
            break;
          case 'data':
            parts.push(this.readData(old.host + (g - gc * cs), g, part));
            break;
          case 'compressed':
            parts.push(this.readCompressed(old.cOffset, old.cLength, gc * cs).then((c) => part.set(c.subarray(g - gc * cs, limit - gc * cs))));
            break;
          case 'zero':
            break; // the buffer already is
        }
      }
      g = next;
    }
    await Promise.all(parts);
  }

  async zero(offset: number, length: number, unmap: boolean, o: ZeroOptions = {}): Promise<void> {
    this.checkWritable();
    await this.prepare();
    this.bitmaps?.mark(offset, length);
    await this.mutex.run(() => this.zeroLocked(offset, length, unmap, o.ignoreBacking === true, o.writeZeroes === true));
  }

  /**
   * `every`: unallocated clusters are marked zero even where no backing file reaches
   * (ZeroOptions.ignoreBacking). Without `unmap` (a write of zeros, QEMU's
   * qcow2_co_pwrite_zeroes without BDRV_REQ_MAY_UNMAP: fallocate ZERO_RANGE, commit,
   * convert) a v3 image marks every cluster of the range zero as QEMU's zero_in_l2_slice
   * does, unallocated ones too (their L2 tables made where missing); with `unmap` (a
   * punched hole: QEMU's discard) unallocated clusters no backing file reaches stay so.
   * `writeZeroes` with `unmap` (ZeroOptions.writeZeroes: qemu-img convert's zeros, write_zeroes
   * with BDRV_REQ_MAY_UNMAP) marks as a write of zeros does and frees allocated clusters.
   */
  private async zeroLocked(offset: number, length: number, unmap: boolean, every = false, writeZeroes = false): Promise<void> {
    const cs = this.cs;
    const end = offset + length;
    const alignedStart = Math.ceil(offset / cs) * cs;
    // The last, partial cluster of the disk counts as whole.
    const alignedEnd = end === this.size ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
    const markAll = this.v3 && (!unmap || writeZeroes);
    const partUnmap = unmap && markAll;
    if (alignedStart >= alignedEnd) {
      // No whole cluster: part of one, or the ends of two.
      if (alignedStart <= offset || alignedStart >= end) return this.zeroPartial(offset, end, every, markAll, partUnmap);
      await this.zeroPartial(offset, alignedStart, every, markAll, partUnmap);
      return this.zeroPartial(alignedStart, end, every, markAll, partUnmap);
    }
    if (offset < alignedStart) await this.zeroPartial(offset, alignedStart, every, markAll, partUnmap);
    await this.zeroClusters(alignedStart, alignedEnd, unmap, every, markAll);
    if (alignedEnd < end) await this.zeroPartial(alignedEnd, end, every, markAll, partUnmap);
  }

  /**
   * Zeros in part of one cluster (never across two). `markAll` (v3, a write of zeros, no subclusters): as
   * qcow2_co_pwrite_zeroes, a cluster that is unallocated or zero, whose other bytes
   * read as zeros, is marked zero whole; any other is written.
   */
  private async zeroPartial(a: number, b: number, every = false, markAll = false, unmap = false): Promise<void> {
    if (markAll && this.map.extended) return this.zeroSubclusters(a, b, every);
    if (markAll && !this.map.extended) {
      const cs = this.cs;
      const c0 = Math.floor(a / cs) * cs;
      const c1 = Math.min(c0 + cs, this.size);
      const [run] = await this.map.map(c0, c1 - c0);
      const restZero = run!.kind === 'zero' || (run!.kind === 'unallocated' && !every && (await this.restReadsZero(c0, c1, a, b)));
      // Counted whole, as qcow2_co_pwrite_zeroes does (a preallocated zero cluster freed if it may unmap).
      if (restZero) return this.zeroClusters(c0, c0 + cs, unmap, every, true);
    }
    const runs = await this.map.map(a, b - a);
    const readsZero = runs.every((r) => r.kind === 'zero' || (r.kind === 'unallocated' && !every && !this.backingCovers(r.guest)));
    if (!readsZero) await this.writeLocked(a, Buffer.alloc(b - a));
  }

  /**
   * Zeros in part of one cluster with subclusters (extended L2), as QEMU splits it: a
   * partial subcluster at either end that is unallocated or zero, whose other bytes
   * read as zeros, counts as whole; whole subclusters get their zero bits set and their
   * allocation bits cleared (zero_l2_subclusters; the host cluster stays); the rest, and
   * anything in a compressed cluster, is written.
   */
  private async zeroSubclusters(a: number, b: number, every: boolean): Promise<void> {
    const cs = this.cs;
    const sc = this.map.subclusterSize;
    const c0 = Math.floor(a / cs) * cs;
    const l1i = Math.floor(c0 / this.map.l2Span);
    const gc = c0 / cs;
    const idx = gc - l1i * this.map.l2Entries;
    const current = async (): Promise<L2Entry> => {
      const l2 = this.map.l1Entry(l1i).offset;
      if (l2 === 0) return { kind: 'unallocated', host: 0, copied: false, alloc: 0, zeros: 0, cOffset: 0, cLength: 0 };
      return this.map.entry(await this.map.l2Cache.get(l2), idx, gc);
    };
    // The end of the disk ends the last subcluster (QEMU's tail is 0 there).
    const end = b === this.size ? Math.ceil(b / sc) * sc : b;
    const first = Math.ceil(a / sc) * sc;
    const last = Math.floor(end / sc) * sc;
    const partial = async (p: number, q: number): Promise<void> => {
      const e = await current();
      const s = Math.floor((p - c0) / sc);
      const bit = 1 << s;
      const zero = e.kind !== 'compressed' && (e.zeros & bit) !== 0;
      const unallocated = e.kind !== 'compressed' && !zero && (e.alloc & bit) === 0;
      const start = c0 + s * sc;
      const restZero = zero || (unallocated && !every && (await this.restReadsZero(start, Math.min(start + sc, this.size), p, q)));
      if (restZero) await this.markSubclusters(l1i, idx, gc, s, s + 1);
      else await this.writeLocked(p, Buffer.alloc(q - p));
    };
    // Strictly inside one subcluster.
    if (first > last) return partial(a, b);
    if (a < first) await partial(a, first);
    if (last > first) {
      const e = await current();
      if (e.kind === 'compressed') await this.writeLocked(first, Buffer.alloc(Math.min(last, this.size) - first));
      else await this.markSubclusters(l1i, idx, gc, (first - c0) / sc, (last - c0) / sc);
    }
    if (last < end) await partial(last, b);
  }

  /** Subclusters [s0, s1) of cluster gc read as zeros: zero bits set, allocation bits cleared. */
  private async markSubclusters(l1i: number, idx: number, gc: number, s0: number, s1: number): Promise<void> {
    const l2Offset = await this.l2ForWrite(l1i);
    const table = await this.map.l2Cache.get(l2Offset);
    const e = this.map.entry(table, idx, gc);
    const mask = s1 - s0 >= SUBCLUSTERS ? ALL_SUBCLUSTERS : (((1 << (s1 - s0)) - 1) << s0) >>> 0;
    const zeros = (e.zeros | mask) >>> 0;
    const alloc = (e.alloc & ~mask) >>> 0;
    if (zeros === e.zeros >>> 0 && alloc === e.alloc >>> 0) return;
    encodeL2Ext(table.view(), idx, e.host, e.copied, alloc, zeros);
    this.map.l2Cache.markDirty(table);
  }

  /**
   * Whether [u0, u1) but [a, b), unallocated in this layer, reads as zeros through the
   * backing chain (QEMU's is_zero: zero clusters, unallocated to the bottom, or past a
   * layer's end; data is not, whatever it holds).
   */
  private async restReadsZero(u0: number, u1: number, a: number, b: number): Promise<boolean> {
    return (await readsZeroBelow(this.backing, u0, a - u0)) && readsZeroBelow(this.backing, b, u1 - b);
  }

  private backingCovers(guest: number): boolean {
    return this.backing !== undefined && this.backing.size > guest;
  }

  /**
   * Zero whole clusters [a, b) (b may pass the disk end by less than a cluster).
   * Unallocated clusters no backing file reaches are left so, unless `every` (a grown
   * disk's new area, which qcow2_co_truncate zeroes whole) or `markAll` (a write of
   * zeros on v3, zeroLocked).
   */
  private async zeroClusters(a: number, b: number, unmap: boolean, every = false, markAll = false): Promise<void> {
    const backingCovers = (guest: number): boolean => every || markAll || this.backingCovers(guest);
    const cs = this.cs;
    const ext = this.map.extended;
    if (!this.v3 && (this.backing || every)) {
      // v2 has no zero flag, and unallocated would show the backing file (the next one, with `every`).
      const limit = Math.min(b, this.size);
      for (let pos = a; pos < limit; pos += ZERO_CHUNK) {
        const n = Math.min(ZERO_CHUNK, limit - pos);
        await this.writeLocked(pos, Buffer.alloc(n));
      }
      return;
    }
    if (this.dataFileRaw) {
      // The data file must stay a valid raw image: zero it there first, keep every mapping.
      const limit = Math.min(b, this.size);
      if (this.data.zero) await this.data.zero(a, limit - a, unmap);
      else for (let pos = a; pos < limit; pos += ZERO_CHUNK) await this.data.write(pos, Buffer.alloc(Math.min(ZERO_CHUNK, limit - pos)));
    }
    let pos = a;
    while (pos < b) {
      const l1i = Math.floor(pos / this.map.l2Span);
      const chunkEnd = Math.min(b, (l1i + 1) * this.map.l2Span);
      const here = pos;
      pos = chunkEnd;
      if (this.map.l1Entry(l1i).offset === 0 && !backingCovers(here)) continue;
      const l2Offset = await this.l2ForWrite(l1i);
      const table = await this.map.l2Cache.get(l2Offset);
      const dv = table.view();
      const baseIndex = l1i * this.map.l2Entries;
      const first = here / cs;
      const last = chunkEnd / cs;
      let changed = false;
      for (let gc = first; gc < last; gc++) {
        const idx = gc - baseIndex;
        if (this.v3 && !ext) {
          // Unallocated and plain zero entries, told by their words (no decode: a write of
          // zeros over a 1 TiB disk has 16M of them).
          const hi = dv.getUint32(idx * 8);
          const lo = dv.getUint32(idx * 8 + 4);
          if (hi === 0 && lo === LO.zero) continue;
          if (hi === 0 && lo === 0) {
            if (!backingCovers(gc * cs)) continue;
            dv.setUint32(idx * 8 + 4, LO.zero);
            changed = true;
            continue;
          }
        }
        const e = this.map.entry(table, idx, gc);
        // Keep the host cluster when not unmapping and always for a raw data file, as
        // QEMU's zero_in_l2_slice keeps the entry: one shared with a snapshot (not
        // COPIED) too, which the next write copies (the write path allocates for it).
        const keep = (this.v3 || this.dataFileRaw) && hasHost(e) && (!unmap || this.dataFileRaw);
        if (ext) {
          if (e.kind !== 'compressed' && e.alloc === 0 && (e.zeros >>> 0 === ALL_SUBCLUSTERS || !backingCovers(gc * cs)) && (!hasHost(e) || keep)) continue;
          encodeL2Ext(dv, idx, keep ? e.host : 0, keep && e.copied, 0, ALL_SUBCLUSTERS);
        } else if (this.v3) {
          if (e.kind === 'zero' && (!hasHost(e) || keep)) continue;
          if (e.kind === 'unallocated' && !backingCovers(gc * cs)) continue;
          encodeL2(dv, idx, keep ? e.host : 0, keep && e.copied, true);
        } else {
          if (e.kind === 'unallocated') continue;
          encodeL2(dv, idx, 0, false, false);
        }
        // Freed at the guest's request (QEMU's QCOW2_DISCARD_REQUEST), as unmap, a compressed cluster or v2 may.
        if (!keep) this.freeEntry(e, true);
        changed = true;
      }
      if (changed) this.map.l2Cache.markDirty(table);
    }
  }

  /**
   * Resize the disk, as QEMU's qcow2_co_truncate. Shrinking: the clusters past the new
   * end become unallocated, L2 tables past it are freed, then refcount blocks that count
   * nothing but themselves, and the file is cut after its last cluster in use. Growing:
   * a larger L1 table if needed; `prealloc` allocates the new clusters (metadata: the
   * tables; falloc, full: the host space too), a raw data file forcing metadata; and
   * `zeroNew` (a backing file longer than the old disk) makes the new area read as
   * zeros: zero clusters, refused on v2, which has none. The size field goes last.
   */
  async truncate(size: number, o: TruncateOptions = {}): Promise<void> {
    this.checkWritable();
    const old = this.size;
    let prealloc = o.prealloc ?? 'off';
    if (size === old && prealloc === 'off') return;
    if (size % 512 !== 0) throw new UsageError(`${this.name}: The new size must be a multiple of 512`);
    if (!this.v3 && (this.snapshotState?.snapshots.length ?? 0) > 0) throw new UnsupportedError(`${this.name}: Can't resize a v2 image which has snapshots`);
    if (size < old && prealloc !== 'off') throw new UsageError(`${this.name}: Preallocation can't be used for shrinking an image`);
    // QEMU preallocates these too, and they then read as noise: the clusters hold zeros, not encrypted zeros.
    if (prealloc !== 'off' && this.crypt) throw new UnsupportedError(`${this.name}: preallocation of an encrypted image is not supported (its new clusters would read as noise)`);
    if (size > old && this.dataFileRaw && prealloc === 'off') prealloc = 'metadata';
    // A protocol that extends with zeros covers falloc and full without a zero flag (QEMU's subclusters_need_allocation).
    const zeroFlags = o.zeroNew === true && size > old && !(this.data === this.file && (prealloc === 'falloc' || prealloc === 'full'));
    if (zeroFlags && !this.v3) throw new UnsupportedError(`${this.name}: Failed to zero out new clusters: Operation not supported`);
    await this.prepare();
    await this.mutex.run(async () => {
      if (size < old) await this.shrinkLocked(size);
      else {
        const needed = Math.ceil(size / this.map.l2Span);
        if (needed > this.map.l1Size) await this.growL1(needed);
      }
      if (prealloc === 'off') {
        if (this.data !== this.file) await sizable(this.data).truncate(size);
      } else {
        await this.preallocate(old, size, prealloc, o.zeroNew === true);
      }
      if (zeroFlags) {
        const zeroStart = Math.ceil(old / this.map.subclusterSize) * this.map.subclusterSize;
        // The old last cluster's part past the old end: explicit zeros (what it held before stays).
        if (zeroStart > old) await this.zeroPartial(old, Math.min(zeroStart, size));
        if (size > zeroStart) await this.zeroClusters(zeroStart, Math.ceil(size / this.cs) * this.cs, false, true);
      }
      // Tables first: the new size must not name what they do not hold yet.
      await this.flushLocked();
      await this.setSize(size);
      // The bitmaps follow, their new bits clean (QEMU's bdrv_dirty_bitmap_truncate).
      this.bitmaps?.resize(size);
    });
    await this.flush();
  }

  /**
   * Allocate guest clusters [old, size) of this layer that hold nothing (QEMU's
   * preallocate_co and its falloc/full path): each becomes a plain data cluster at new
   * host space past the end of the file (never a freed cluster, whose old bytes would
   * show), reading as zeros there; falloc reserves that space, full writes its zeros.
   * With a data file the clusters are their guest offsets there, and the data file is
   * sized with the same mode. Extended L2: the subclusters stay unallocated (they read
   * zeros) unless the backing file would show through (`zeroNew`).
   */
  private async preallocate(old: number, size: number, mode: Preallocation, zeroNew: boolean): Promise<void> {
    const cs = this.cs;
    const ext = this.map.extended;
    const external = this.data !== this.file;
    // falloc, full: every L2 table first, so the new data clusters follow them in one run
    // as QEMU's do (only a new refcount block, at the start of the range it counts, may
    // cut it); metadata: each table before its clusters, as QEMU's allocation goes.
    if (mode !== 'metadata') for (let l1i = Math.floor(old / this.map.l2Span); l1i * this.map.l2Span < size; l1i++) await this.l2ForWrite(l1i);
    // New host clusters only past the end of the file: nothing was ever there.
    let from = Math.ceil(this.file.size / cs);
    for (let pos = Math.floor(old / cs) * cs; pos < size; ) {
      const l1i = Math.floor(pos / this.map.l2Span);
      const chunkEnd = Math.min(Math.ceil(size / cs) * cs, (l1i + 1) * this.map.l2Span);
      const here = pos;
      pos = chunkEnd;
      const l2Offset = await this.l2ForWrite(l1i);
      const baseIndex = l1i * this.map.l2Entries;
      const first = here / cs;
      const entries = this.snapshotEntries(await this.map.l2Cache.get(l2Offset), first, chunkEnd / cs - first, baseIndex);
      // The host offset of each cluster, -1 where it stays as it is (a data file's first cluster is at 0).
      const hosts: number[] = [];
      for (let k = 0; k < entries.length; ) {
        // A cluster the old disk ends in keeps what it reads as (QEMU would allocate it; the bytes are the same).
        if (hasHost(entries[k]!) || entries[k]!.kind === 'compressed' || (first + k) * cs < old) {
          hosts.push(-1);
          k++;
          continue;
        }
        if (external) {
          hosts.push((first + k) * cs);
          k++;
          continue;
        }
        let n = 1;
        while (k + n < entries.length && !hasHost(entries[k + n]!) && entries[k + n]!.kind !== 'compressed') n++;
        const got = await this.refcounts.allocate(n, true, from);
        from = got.start + got.count;
        const host = got.start * cs;
        const end = host + got.count * cs;
        await this.guard?.check(host, end - host);
        if (end > this.file.size) await sizable(this.file).truncate(end);
        if (mode === 'falloc' && !(this.file.allocateZeros && (await this.file.allocateZeros(host, end - host)))) mode = 'full';
        if (mode === 'full') for (let at = host; at < end; at += ZERO_CHUNK) await this.file.write(at, sharedZeros(Math.min(ZERO_CHUNK, end - at)));
        for (let c = 0; c < got.count; c++) hosts.push(host + c * cs);
        k += got.count;
      }
      const table = await this.map.l2Cache.get(l2Offset);
      const dv = table.view();
      for (let k = 0; k < hosts.length; k++) {
        const at = hosts[k]!;
        if (at < 0) continue;
        if (ext) encodeL2Ext(dv, first + k - baseIndex, at, true, zeroNew ? ALL_SUBCLUSTERS : 0, 0);
        else encodeL2(dv, first + k - baseIndex, at, true, false);
      }
      this.map.l2Cache.markDirty(table);
    }
    // The data file covers the last new cluster whole, as preallocate_co leaves it.
    const covered = Math.ceil(size / cs) * cs;
    if (external && this.data.size < covered) await sizable(this.data).truncate(covered, mode === 'metadata' ? {} : { prealloc: mode });
  }

  /**
   * The shrinking half of qcow2_co_truncate, under the mutex: clusters past the new
   * end unallocated (qcow2_cluster_discard), L2 tables past it freed
   * (qcow2_shrink_l1_table), refcount blocks counting only themselves dropped
   * (qcow2_shrink_reftable), the file cut after its last cluster in use.
   */
  private async shrinkLocked(size: number): Promise<void> {
    const cs = this.cs;
    // The partial last cluster stays as QEMU leaves it.
    await this.discardClusters(Math.ceil(size / cs) * cs, Math.ceil(this.size / cs) * cs);
    await this.releaseTables(size);
  }

  /**
   * After the clusters from guest offset `size` on were discarded: the L2 tables that map
   * only those are freed (qcow2_shrink_l1_table), then the refcount blocks that count
   * nothing but themselves (qcow2_shrink_reftable), and the file is cut after its last
   * cluster in use. The caller holds the mutex.
   */
  private async releaseTables(size: number): Promise<void> {
    const cs = this.cs;
    await this.flushLocked();
    const keep = Math.ceil(size / this.map.l2Span);
    const freed: number[] = [];
    for (let i = keep; i < this.map.l1Size; i++) {
      const e = this.map.l1Entry(i);
      if (e.offset === 0) continue;
      await this.map.setL1Entry(i, 0, false);
      freed.push(e.offset);
    }
    if (freed.length > 0) {
      await this.barrier();
      for (const t of freed) {
        this.map.l2Cache.drop(t);
        this.guard?.remove(t, OL.activeL2);
        await this.refcounts.adjust(t / cs, -1);
      }
      await this.flushLocked();
    }
    await this.refcounts.shrinkTable();
    const last = await this.refcounts.lastInUse(Math.ceil(this.file.size / cs));
    if ((last + 1) * cs < this.file.size && this.file.truncate) await this.file.truncate((last + 1) * cs);
  }

  private async setSize(size: number): Promise<void> {
    const field = Buffer.alloc(8);
    field.writeBigUInt64BE(BigInt(size));
    await this.file.write(HDR.size, field);
    await this.barrier();
    this.currentSize = size;
  }

  /**
   * Make guest clusters [a, b) unallocated in this layer (QEMU's full discard): the
   * entries are cleared, and what they held is freed once the change is on disk.
   * The caller holds the mutex.
   */
  private async discardClusters(a: number, b: number): Promise<void> {
    const cs = this.cs;
    for (let pos = a; pos < b; ) {
      const l1i = Math.floor(pos / this.map.l2Span);
      const chunkEnd = Math.min(b, (l1i + 1) * this.map.l2Span);
      const here = pos;
      pos = chunkEnd;
      if (this.map.l1Entry(l1i).offset === 0) continue;
      const l2Offset = await this.l2ForWrite(l1i);
      const table = await this.map.l2Cache.get(l2Offset);
      const baseIndex = l1i * this.map.l2Entries;
      const es = this.map.extended ? 16 : 8;
      let changed = false;
      for (let gc = here / cs; gc < chunkEnd / cs; gc++) {
        const idx = gc - baseIndex;
        const e = this.map.entry(table, idx, gc);
        if (e.kind === 'unallocated' && e.zeros === 0 && e.alloc === 0) continue;
        this.freeEntry(e);
        table.data.fill(0, idx * es, (idx + 1) * es);
        changed = true;
      }
      if (changed) this.map.l2Cache.markDirty(table);
    }
  }

  /** Every cluster of this layer unallocated, so that it reads its backing file (qemu-img commit's make_empty). */
  /**
   * Every cluster of this layer unallocated (tsimg commit), as qcow2_make_empty: where
   * QEMU empties the file itself (v3, no snapshots, no LUKS header, no data file) the L2
   * tables go too and the file ends after the tables left, as small as QEMU's; otherwise
   * the clusters are discarded and the file keeps its size, as QEMU's fallback does.
   */
  async makeEmpty(): Promise<void> {
    this.checkWritable();
    await this.prepare();
    const whole = this.v3 && (this.snapshotState?.snapshots.length ?? 0) === 0 && !this.crypt?.physical && this.data === this.file;
    await this.mutex.run(async () => {
      await this.discardClusters(0, Math.ceil(this.size / this.cs) * this.cs);
      if (whole) await this.releaseTables(0);
    });
    await this.flush();
  }

  /** Rewrite the backing file name and format in the header (qemu-img rebase). */
  async setBacking(file: string | undefined, format: string | undefined): Promise<void> {
    this.checkWritable();
    await this.prepare();
    await this.mutex.run(async () => {
      const h = await (await import('./amend.js')).rewriteHeader(this.file, this.cs, { setBacking: true, backingFile: file, backingFormat: file === undefined ? undefined : format });
      if (this.snapshotState) this.snapshotState.header = h;
    });
  }

  /** qemu-img amend -o: header options changed in place (amend.ts). */
  async amend(options: CreateOptions): Promise<void> {
    this.checkWritable();
    await this.flush();
    const ctx = this.snapshotContext();
    const [{ amendQcow2 }, { checkDowngrade, expandZeroClusters, hasCompressedClusters }] = await Promise.all([import('./amend.js'), import('./downgrade.js')]);
    // compat=0.10 (downgrade.ts): refusals first, then the zero clusters written out,
    // refcounts before the tables that name the new clusters.
    const downgrader: Downgrader | undefined = ctx && {
      check: async (h) => {
        checkDowngrade(h, ctx, h.extensions.some((e) => e.type === EXT.bitmaps));
        if ((h.incompatibleFeatures & INCOMPAT.compression) !== 0n && (await hasCompressedClusters(ctx))) {
          throw new UnsupportedError(`${this.name}: Cannot downgrade an image with zstd compression type and existing compressed clusters`);
        }
      },
      expand: async (h) => {
        await this.prepare();
        await expandZeroClusters(ctx, h.backingFile !== undefined);
        await this.refcountCache.flush();
        await this.barrier();
        await this.map.l2Cache.flush();
        await this.file.flush();
      },
    };
    await this.mutex.run(() => amendQcow2(this.file, this.cs, options, downgrader));
  }

  /** What snapshot-ops.ts and downgrade.ts work on: this node's tables, refcounts and snapshot list. */
  private snapshotContext(state = this.snapshotState): SnapshotContext | undefined {
    return (
      state && {
        file: this.file,
        name: this.name,
        map: this.map,
        refcounts: this.refcounts,
        guard: this.guard,
        state,
        size: this.size,
        growL1: (entries) => this.growL1(entries),
        setSize: (size) => this.setSize(size),
      }
    );
  }

  /** Persistent dirty bitmaps changed (bitmap.ts), as qemu-img bitmap; stored at close. */
  get bitmapControl(): BitmapControl | undefined {
    const t = this.bitmaps;
    if (!t || this.readOnly || this.isView) return undefined;
    const run = async (op: () => void | Promise<void>): Promise<void> => {
      this.checkWritable();
      await this.prepare();
      await this.mutex.run(async () => op());
    };
    return {
      add: (name, granularity) => run(() => t.add(name, granularity)),
      remove: (name) => run(() => t.remove(name)),
      clear: (name) => run(() => t.clear(name)),
      enable: (name) => run(() => t.enable(name, true)),
      disable: (name) => run(() => t.enable(name, false)),
      merge: (target, source, from) =>
        run(() =>
          t.merge(target, async () => {
            if (!from) return t.bitsOf(source);
            if (!from.readBitmap) throw new UsageError(`Dirty bitmap '${source}' not found`);
            return from.readBitmap(source);
          }),
        ),
    };
  }

  get readBitmap(): ((name: string) => Promise<BitmapBits>) | undefined {
    return this.readBitmapFn;
  }

  /** Internal snapshots changed in place (snapshot-ops.ts); the active writable node only. */
  get snapshotControl(): SnapshotControl | undefined {
    const state = this.snapshotState;
    if (this.readOnly || this.isView || !state) return undefined;
    const ctx = this.snapshotContext(state)!;
    const run = (op: (c: SnapshotContext) => Promise<void>) => async (): Promise<void> => {
      this.checkWritable();
      await this.prepare();
      await this.flush();
      await this.mutex.run(async () => {
        ctx.size = this.size;
        await op(ctx);
        await this.refcountCache.flush();
        await this.barrier();
        await this.map.l2Cache.flush();
      });
      await this.flush();
    };
    return {
      create: (name) => run(async (c) => (await import('./snapshot-ops.js')).createSnapshot(c, name))(),
      remove: (id) => run(async (c) => (await import('./snapshot-ops.js')).deleteSnapshot(c, id))(),
      apply: async (id) => {
        // As QEMU's bdrv_snapshot_goto: the bitmaps could not say what changed (any bitmap, enabled or not).
        if (this.bitmaps?.any) throw new UnsupportedError(`${this.name}: Device has active dirty bitmaps`);
        await run(async (c) => (await import('./snapshot-ops.js')).applySnapshot(c, id))();
      },
    };
  }

  private async growL1(entries: number): Promise<void> {
    const cs = this.cs;
    if (entries * 8 > LIMITS.maxL1Bytes) throw new IoError(`${this.name}: qcow2 L1 table would exceed the 32 MiB limit`, osc.errno.EFBIG);
    const clusters = Math.ceil((entries * 8) / cs);
    const start = await this.refcounts.allocateContiguous(clusters);
    const offset = start * cs;
    // Clusters the refcounts call free may still hold metadata (a corrupt image): check first.
    await this.guard?.check(offset, clusters * cs);
    this.guard?.add(offset, entries * 8, OL.activeL1);
    // The new table is copied from memory: the entries of new L2 tables go to the old one first.
    await this.map.l2Cache.flush();
    const l1 = Buffer.alloc(entries * 8);
    this.map.l1Copy().copy(l1);
    // Every L1 entry in use is an L2 table of ours: QEMU writes them with COPIED set.
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < this.map.l1Size; i++) {
      const e = this.map.l1Entry(i);
      if (e.offset !== 0) encodeL1(dv, i, e.offset, e.copied);
    }
    // Refcounts of the new table, the table, then the header.
    await this.refcountCache.flush();
    await this.barrier();
    // Its bytes only, as qcow2_grow_l1_table writes it: a table at the end of the file leaves the file ending there.
    await this.file.write(offset, l1);
    await this.barrier();
    const hdr = Buffer.alloc(12);
    hdr.writeUInt32BE(entries, 0);
    hdr.writeBigUInt64BE(BigInt(offset), 4);
    await this.file.write(HDR.l1Size, hdr);
    await this.barrier();
    const oldOffset = this.map.l1TableOffset;
    const oldClusters = Math.ceil((this.map.l1Size * 8) / cs);
    this.map.replaceL1(l1, offset);
    this.guard?.remove(oldOffset, OL.activeL1);
    for (let c = 0; c < oldClusters; c++) await this.refcounts.adjust(oldOffset / cs + c, -1);
  }

  /**
   * Refcount blocks, barrier, L2 tables, then the file. Clusters freed since the
   * last flush are given back only now that no L2 table on disk points at them.
   */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    if (this.guard?.corrupt) return this.flushCorrupt(this.guard);
    await this.mutex.run(() => this.flushLocked());
  }

  /** flush(), then the bitmaps written back (close), unless the image is corrupt (they stay in use). */
  private async flushAndStoreBitmaps(): Promise<void> {
    await this.flush();
    const bitmaps = this.bitmaps;
    if (bitmaps && !this.guard?.corrupt) await this.mutex.run(() => bitmaps.store());
  }

  /** flush() for a caller that holds the mutex. */
  private async flushLocked(): Promise<void> {
    const frees = this.refcounts.takeFrees();
    await Promise.allSettled([...this.inflight]);
    if (this.data !== this.file) await this.data.flush();
    if (this.refcountCache.hasDirty()) {
      await this.refcountCache.flush();
      await this.barrier();
    }
    // The tables, then (behind a barrier) the L1 entries of new ones.
    await this.map.l2Cache.flush();
    await this.file.flush();
    if (frees.clusters.length > 0) {
      const free = await this.refcounts.applyFrees(frees);
      await this.refcountCache.flush();
      await this.discardHost(free);
      await this.file.flush();
    }
  }

  /**
   * Once the image is marked corrupt no table is written any more (QEMU stops using
   * the node altogether): what the caches still hold is dropped, and said so.
   */
  private async flushCorrupt(guard: MetadataGuard): Promise<void> {
    await this.file.flush();
    const pendingL1 = this.map.dropPendingL1();
    if (pendingL1 || this.map.l2Cache.hasDirty() || this.refcountCache.hasDirty()) throw guard.refusal();
  }

  private async barrier(): Promise<void> {
    if (this.barriers) await this.file.flush();
  }

  /**
   * blockStatus gives host offsets only in the image file itself (where compressed
   * clusters lie too), and never for encrypted clusters; an external data file's
   * clusters say where they lie there (Extent.elsewhere).
   */
  get hostFd(): number | undefined {
    return !this.crypt ? this.file.hostFd : undefined;
  }

  private around: HostCipher | undefined;

  /**
   * LUKS-encrypted clusters in the image file itself, their sectors numbered by host
   * offset: the FUSE workers can read and decrypt them (fs/read-map.ts). Not the legacy
   * AES, whose sectors count guest offsets.
   */
  get hostCipher(): HostCipher | undefined {
    const c = this.crypt;
    const fd = this.file.hostFd;
    if (!c || !c.physical || c.cipher.sectorSize !== SECTOR || this.data !== this.file || fd === undefined) return undefined;
    if (this.around?.fd !== fd) this.around = { fd, cipher: c.cipher, ivBase: 0 };
    return this.around;
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const runs = await this.map.map(offset, length);
    const out: Extent[] = [];
    // Host offsets as qemu-img map gives them: plain data clusters in the image file itself.
    const hostKnown = this.data === this.file && !this.crypt;
    // Plain data clusters in an external data file: where they lie there, for the read map.
    const dataFd = this.data !== this.file && !this.crypt ? this.data.hostFd : undefined;
    // Encrypted clusters have no host offset in the map, but the workers read their ciphertext there (hostCipher).
    const cipherKnown = this.hostCipher !== undefined;
    const writable = this.inPlaceWrites;
    // Whole compressed clusters, each with its stream (the read map's threads inflate them).
    const stream = this.compressionType === COMPRESSION.zlib ? 'deflate-raw' : this.compressionType === COMPRESSION.zstd ? 'zstd' : undefined;
    for (const r of runs) {
      if (r.kind === 'compressed' && stream && r.guest === r.clusterGuest && r.length === this.cs) {
        out.push({ offset: r.guest, length: r.length, kind: 'data', compressed: { host: r.cOffset, length: r.cLength, stream } });
        continue;
      }
      const kind: ExtentKind = r.kind === 'compressed' ? 'data' : r.kind;
      const host = hostKnown && (r.kind === 'data' || (r.kind === 'zero' && r.host !== 0)) ? r.host : undefined;
      const cipherHost = cipherKnown && r.kind === 'data' ? r.host : undefined;
      // A zero cluster that keeps its place (host 0: none, as QEMU's ZERO_PLAIN) says where too: qemu-img map's "offset".
      const elsewhere = dataFd !== undefined && (r.kind === 'data' || (r.kind === 'zero' && r.host !== 0)) ? { fd: dataFd, host: r.host, name: this.dataFileName } : undefined;
      // As writeInPlace() decides, and clear of every table (what writeData's guard checks;
      // the data file holds none).
      const inPlace = writable && r.kind === 'data' && r.copied && (host !== undefined ? !this.guard?.touches(r.host, r.length) : elsewhere !== undefined);
      const last = out[out.length - 1];
      const contiguous = last?.host === undefined ? host === undefined : host === last.host + last.length;
      const cipherContiguous = last?.cipherHost === undefined ? cipherHost === undefined : cipherHost === last.cipherHost + last.length;
      const elsewhereContiguous = last?.elsewhere === undefined ? elsewhere === undefined : elsewhere !== undefined && elsewhere.host === last.elsewhere.host + last.length;
      if (last && !last.compressed && last.kind === kind && contiguous && cipherContiguous && elsewhereContiguous && (last.inPlace === true) === inPlace) last.length += r.length;
      else if (cipherHost !== undefined) out.push({ offset: r.guest, length: r.length, kind, cipherHost });
      else if (elsewhere !== undefined) out.push(inPlace ? { offset: r.guest, length: r.length, kind, elsewhere, inPlace } : { offset: r.guest, length: r.length, kind, elsewhere });
      else if (host === undefined) out.push({ offset: r.guest, length: r.length, kind });
      else out.push(inPlace ? { offset: r.guest, length: r.length, kind, host, inPlace } : { offset: r.guest, length: r.length, kind, host });
    }
    if (!hostKnown || !(await this.metadataPreallocated())) return out;
    // Preallocated metadata: a data cluster may still be a hole of the file, which reads
    // as zeros; asked of the file as QEMU's block status does (BDRV_BLOCK_RECURSE).
    const split: Extent[] = [];
    for (const e of out) {
      if (e.kind !== 'data' || e.host === undefined) split.push(e);
      else split.push(...(await splitByHoles(this.file, e.host, e)));
    }
    return split;
  }

  private preallocated: Promise<boolean> | undefined;

  /**
   * QEMU's qcow2_detect_metadata_preallocation: more clusters counted by the refcounts
   * than the file holds on disk (10/9 of them, or 2 more) means preallocated metadata.
   * Asked once; answered at once (no scan) where the file is nearly all on disk.
   */
  private metadataPreallocated(): Promise<boolean> {
    this.preallocated ??= (async () => {
      const real = await this.file.allocatedBytes?.();
      if (real === undefined) return false;
      const realClusters = Math.floor(real / this.cs);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const end = Math.ceil(this.file.size / this.cs);
      if (threshold > end) return false;
      let counted = 0;
      for (let c = 0; c < end && counted < threshold; c++) if ((await this.refcounts.refcount(c)) !== 0) counted++;
      return counted >= threshold;
    })().catch(() => false);
    return this.preallocated;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.releaseInflate?.();
    if (this.isView) return;
    // The bitmaps go back after everything else reached the file (QEMU stores them at close).
    const node = { readOnly: this.readOnly, flush: () => this.flushAndStoreBitmaps() };
    await closeLayers(node, this.backing, this.data !== this.file ? this.data : undefined, this.file);
  }
}

/** Trailing zero bits of a non-zero 32-bit mask. */
function ctz32(x: number): number {
  return 31 - Math.clz32((x & -x) >>> 0);
}

/** The entry holds a host cluster (data, or a preallocated zero cluster). */
function hasHost(e: L2Entry): boolean {
  return e.kind === 'data' || (e.kind === 'zero' && e.host !== 0);
}

/** Whether `node` and the layers under it read [offset, offset + length) as zeros without data (is_zero). */
async function readsZeroBelow(node: BlockNode | undefined, offset: number, length: number): Promise<boolean> {
  if (!node || length <= 0) return true;
  const end = Math.min(offset + length, node.size);
  if (end <= offset) return true;
  for (const r of await node.blockStatus(offset, end - offset)) {
    if (r.kind === 'data') return false;
    if (r.kind === 'unallocated' && !(await readsZeroBelow(node.backing, r.offset, r.length))) return false;
  }
  return true;
}
