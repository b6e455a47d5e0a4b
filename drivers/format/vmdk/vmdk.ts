// The vmdk format node: extents strung end to end, reads through the shared mapped
// path, writes that allocate under one lock, and the CID rewritten on the first
// write after open (QEMU 7.2's vmdk_pwritev / vmdk_write_cid).
import crypto from 'node:crypto';
import type { BlockNode, CheckReport } from '../../types.js';
import type { MappedRun } from '../mapped.js';
import { MappedNode } from '../mapped-node.js';
import { readFromBacking } from '../backing.js';
import { emptyReport } from '../check-report.js';
import { DESC_SIZE, rewriteCid } from './descriptor.js';
import { FlatExtent, SparseExtent, type VmdkExtent, type WriteContext } from './extent.js';
import { SeSparseExtent } from './sesparse.js';

export interface VmdkNodeOptions {
  /** The image file: the descriptor, or the monolithic sparse file. */
  file: BlockNode;
  extents: VmdkExtent[];
  readOnly: boolean;
  backing: BlockNode | undefined;
  /** Where CID= and parentCID= are read and rewritten (0 for a descriptor file, 0x200 in a sparse file). */
  descOffset: number;
  cid: number;
  parentCid: number;
  createType: string;
  /** Flush between data and the table entries that point at it (false for cache=unsafe). */
  barriers: boolean;
  /** Each extent file's name as the descriptor gives it. */
  fileNames?: ReadonlyMap<BlockNode, string>;
}

export class VmdkNode extends MappedNode {
  /** Each extent guards its own file's metadata (the runs it maps carry it). */
  readonly metadata = undefined;
  readonly extents: readonly VmdkExtent[];
  private readonly fileNames: ReadonlyMap<BlockNode, string> | undefined;
  readonly createType: string;
  readonly parentCid: number;
  private readonly descOffset: number;
  private readonly ctx: WriteContext;
  private currentCid: number;
  private cidUpdate: Promise<void> | undefined;
  /** The first write's new CID is in the descriptor (updateCid ran): overwrites may go around the node. */
  private cidWritten = false;

  constructor(o: VmdkNodeOptions) {
    const last = o.extents[o.extents.length - 1];
    const grain = o.extents.reduce((g, e) => Math.max(g, 'grainBytes' in e && typeof e.grainBytes === 'number' ? e.grainBytes : 0), 0);
    super({ file: o.file, size: last ? last.start + last.length : 0, readOnly: o.readOnly, barriers: o.barriers, backing: o.backing, allocationUnit: grain || undefined });
    this.extents = o.extents;
    this.fileNames = o.fileNames;
    this.descOffset = o.descOffset;
    this.currentCid = o.cid;
    this.parentCid = o.parentCid;
    this.createType = o.createType;
    this.ctx = {
      hasBacking: o.backing !== undefined,
      backingEnd: o.backing?.size ?? 0,
      readBacking: (off, dst) => readFromBacking(this.backing, off, dst),
      barrier: async (f) => {
        if (this.barriers) await f.flush();
      },
    };
  }

  /** Sectors: grain tables and flat extents are addressed in them. */
  readonly requestAlignment = 512;

  get vmdkCid(): number {
    return this.cid;
  }

  /** The image's CID as on disk now. */
  get cid(): number {
    return this.currentCid;
  }

  nameOf(file: BlockNode): string | undefined {
    return this.fileNames?.get(file);
  }

  /** The extents that [offset, offset+length) touches, with extent-relative ranges. */
  private pieces(offset: number, length: number): { e: VmdkExtent; rel: number; at: number; n: number }[] {
    const out: { e: VmdkExtent; rel: number; at: number; n: number }[] = [];
    const end = offset + length;
    // Extents are few (2 GiB each at most for split images); binary search the first.
    let lo = 0;
    let hi = this.extents.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const m = this.extents[mid]!;
      if (m.start + m.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < this.extents.length; i++) {
      const e = this.extents[i]!;
      if (e.start >= end) break;
      const a = Math.max(offset, e.start);
      const b = Math.min(end, e.start + e.length);
      if (b > a) out.push({ e, rel: a - e.start, at: a - offset, n: b - a });
    }
    return out;
  }

  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const parts = await Promise.all(this.pieces(offset, length).map((p) => p.e.map(p.rel, p.n)));
    return parts.flat();
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    await super.write(offset, src);
    await this.updateCid();
  }

  protected async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    for (const p of this.pieces(offset, src.length)) await p.e.write(p.rel, src.subarray(p.at, p.at + p.n), this.ctx);
  }

  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    await this.mutex.run(async () => {
      for (const p of this.pieces(offset, length)) await p.e.zero(p.rel, p.n, unmap, this.ctx);
    });
    await this.updateCid();
  }

  /** Once per open, after the first write: a new random CID (vmdk_write_cid). */
  private updateCid(): Promise<void> {
    this.cidUpdate ??= (async () => {
      const len = Math.min(DESC_SIZE, Math.ceil(this.file.size / 512) * 512 - this.descOffset);
      if (len <= 0) return;
      const area = new Uint8Array(DESC_SIZE);
      await this.file.read(this.descOffset, area.subarray(0, len));
      const cid = crypto.randomBytes(4).readUInt32LE(0);
      const next = rewriteCid(area, cid);
      if (!next) return;
      await this.file.write(this.descOffset, next.subarray(0, len));
      await this.file.flush();
      this.currentCid = cid;
    })().then(
      () => {
        this.cidWritten = true;
      },
      (err: unknown) => {
        // Try again on the next write rather than failing every write from now on.
        this.cidUpdate = undefined;
        throw err;
      },
    );
    return this.cidUpdate;
  }

  /**
   * One flat extent that is its whole file, 1:1 (a monolithicFlat vmdk whose extent
   * starts at 0 and whose file is exactly the disk's size): the kernel may read the
   * file itself (FUSE passthrough, fs/fuse-session.ts backingFor). Read-only only: a
   * write must change the descriptor's CID first, which the kernel would not do.
   */
  get passthroughFd(): number | undefined {
    const e = this.extents[0];
    if (!this.readOnly || this.extents.length !== 1 || !(e instanceof FlatExtent)) return undefined;
    if (e.start !== 0 || e.flatOffset !== 0 || e.length !== this.size || e.file.size !== this.size) return undefined;
    return e.file.passthroughFd;
  }

  /**
   * Once the first write changed the CID, an overwrite of an allocated grain in the
   * image's own file (a monolithic sparse vmdk's; other extents' files have no host
   * offset in block status) needs nothing of the format: the FUSE workers may write it.
   * Grain tables never move after open (layoutGeneration stays undefined).
   */
  protected override writesAroundReady(): boolean {
    return this.cidWritten;
  }

  /**
   * qemu-img check for vmdk: each sparse extent's grain directory and tables (flat
   * extents hold no metadata to check), seSparse ones included.
   */
  async checkMetadata(): Promise<CheckReport> {
    return this.mutex.run(async () => {
      // The check reads the tables from the files: new grains' entries go there first.
      if (!this.readOnly) await this.writeWaiting();
      const report = emptyReport();
      for (const e of this.extents) if (e instanceof SparseExtent || e instanceof SeSparseExtent) await e.check(report);
      return report;
    });
  }

  private async writeWaiting(): Promise<void> {
    for (const e of this.extents) await e.writeWaiting?.(this.ctx);
  }

  /** New grains' table entries behind a barrier, then every file of the image. */
  protected override async flushLocked(): Promise<void> {
    await this.writeWaiting();
    const files = new Set<BlockNode>([this.file, ...this.extents.map((e) => e.file)]);
    await Promise.all([...files].map((f) => f.flush()));
  }

  /** The extent files too, before the backing node and the image file. */
  protected override async closeLayers(): Promise<void> {
    const files = new Set<BlockNode>(this.extents.map((e) => e.file));
    files.delete(this.file);
    try {
      if (!this.readOnly) await this.flush();
    } finally {
      for (const f of files) await f.close().catch(() => undefined);
      try {
        await this.backing?.close();
      } finally {
        await this.file.close();
      }
    }
  }
}
