// The pass-through base of every filter (nbdkit's `next` model, shared/STYLE.md): a
// filter changes one thing and forwards everything else to the node below it,
// optional capabilities included. A capability is offered exactly when the next
// node offers it, so wrapping a node never hides what it can do and no caller has
// to reach through a filter. A filter that changes a capability overrides its
// getter and still returns undefined where the next node lacks it.
import type { BitmapBits, BitmapControl, BlockNode, WriteLog, HostCipher, CheckReport, Extent, ImageDescription, RepairFixed, SnapshotControl, SnapshotView, TruncateOptions, ZeroOptions } from '../types.js';
import type { CreateOptions } from '../options.js';
import type { ImageLock } from '../protocol/lock.js';

export class Filter implements BlockNode {
  constructor(protected readonly next: BlockNode) {}

  get size(): number {
    return this.next.size;
  }
  get readOnly(): boolean {
    return this.next.readOnly;
  }
  get name(): string {
    return this.next.name;
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.next.read(offset, dst);
  }
  write(offset: number, src: Uint8Array): Promise<void> {
    return this.next.write(offset, src);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.next.close();
  }

  // Optional capabilities: present where the next node has them.
  get zero(): ((offset: number, length: number, unmap: boolean, o?: ZeroOptions) => Promise<void>) | undefined {
    const next = this.next;
    return next.zero && ((offset, length, unmap, o) => next.zero!(offset, length, unmap, o));
  }
  get truncate(): ((size: number, o?: TruncateOptions) => Promise<void>) | undefined {
    const next = this.next;
    return next.truncate && ((size, o) => next.truncate!(size, o));
  }
  get snapshots(): (() => SnapshotView[]) | undefined {
    const next = this.next;
    return next.snapshots && (() => next.snapshots!());
  }
  get backing(): BlockNode | undefined {
    return this.next.backing;
  }
  get imageLock(): ImageLock | undefined {
    return this.next.imageLock;
  }
  get allocatedBytes(): (() => Promise<number>) | undefined {
    const next = this.next;
    return next.allocatedBytes && (() => next.allocatedBytes!());
  }
  get requestAlignment(): number | undefined {
    return this.next.requestAlignment;
  }
  get vmdkCid(): number | undefined {
    return this.next.vmdkCid;
  }
  get vhdxIdentity(): BlockNode['vhdxIdentity'] {
    return this.next.vhdxIdentity;
  }

  get chunkSize(): number | undefined {
    return this.next.chunkSize;
  }
  get mediumGeneration(): number | undefined {
    return this.next.mediumGeneration;
  }
  /**
   * Not forwarded: a filter exists to see (and maybe change) every request, and the
   * kernel would go around it. A filter that changes nothing overrides this.
   */
  get passthroughFd(): number | undefined {
    return undefined;
  }
  /** Not forwarded either, for the same reason (fs/read-map.ts reads around the filter). */
  get hostFd(): number | undefined {
    return undefined;
  }
  /** Nor is an encrypted layer's (BlockNode.hostCipher): forwarded where hostFd is. */
  get hostCipher(): HostCipher | undefined {
    return undefined;
  }
  /** Not forwarded: the FUSE workers would write around the filter. */
  get inPlaceWrites(): boolean | undefined {
    return undefined;
  }
  /** Forwarded with inPlaceWrites, by the filters that forward that (writes around them are logged below). */
  get writeLog(): WriteLog | undefined {
    return undefined;
  }
  get layoutGeneration(): number | undefined {
    return this.next.layoutGeneration;
  }
  get allocationGeneration(): number | undefined {
    return this.next.allocationGeneration;
  }
  get allocationUnit(): number | undefined {
    return this.next.allocationUnit;
  }
  get dropCachedData(): (() => void) | undefined {
    const next = this.next;
    return next.dropCachedData && (() => next.dropCachedData!());
  }
  get compressedClusterSize(): number | undefined {
    return this.next.writeCompressed ? this.next.compressedClusterSize : undefined;
  }
  get writeCompressed(): ((offset: number, data: Uint8Array) => Promise<void>) | undefined {
    const next = this.next;
    return next.writeCompressed && ((offset, data) => next.writeCompressed!(offset, data));
  }
  get encrypted(): boolean | undefined {
    return this.next.encrypted;
  }
  get describe(): (() => ImageDescription) | undefined {
    const next = this.next;
    return next.describe && (() => next.describe!());
  }
  get checkMetadata(): (() => Promise<CheckReport>) | undefined {
    const next = this.next;
    return next.checkMetadata && (() => next.checkMetadata!());
  }
  get repairMetadata(): ((mode: 'leaks' | 'all') => Promise<RepairFixed | void>) | undefined {
    const next = this.next;
    return next.repairMetadata && ((mode) => next.repairMetadata!(mode));
  }
  get snapshotControl(): SnapshotControl | undefined {
    return this.next.snapshotControl;
  }
  get bitmapControl(): BitmapControl | undefined {
    return this.next.bitmapControl;
  }
  get readBitmap(): ((name: string) => Promise<BitmapBits>) | undefined {
    const next = this.next;
    return next.readBitmap && ((name) => next.readBitmap!(name));
  }
  get makeEmpty(): (() => Promise<void>) | undefined {
    const next = this.next;
    return next.makeEmpty && (() => next.makeEmpty!());
  }
  get setBacking(): ((file: string | undefined, format: string | undefined) => Promise<void>) | undefined {
    const next = this.next;
    return next.setBacking && ((file, format) => next.setBacking!(file, format));
  }
  get amend(): ((options: CreateOptions) => Promise<void>) | undefined {
    const next = this.next;
    return next.amend && ((options) => next.amend!(options));
  }
}

/**
 * A filter that changes no byte a read returns (read-only, and every SameBytesFilter):
 * reading around it (the FUSE workers from the host descriptor, the kernel's passthrough)
 * is reading through it, so the descriptors of the node below are offered here too.
 */
export class SameReadsFilter extends Filter {
  override get passthroughFd(): number | undefined {
    return this.next.passthroughFd;
  }
  override get hostFd(): number | undefined {
    return this.next.hostFd;
  }
  override get hostCipher(): HostCipher | undefined {
    return this.next.hostCipher;
  }
}

/**
 * A filter that changes no byte and moves none, written or read (counting, alignment,
 * preallocation): what the FUSE layer does around it (the workers' writes in place too)
 * is what it would do through it, so the in-place writes of the node below are offered
 * here as well. Each such filter says in its own comment why going around it is the same.
 */
export class SameBytesFilter extends SameReadsFilter {
  override get inPlaceWrites(): boolean | undefined {
    return this.next.inPlaceWrites;
  }
  override get writeLog(): WriteLog | undefined {
    return this.next.writeLog;
  }
}
