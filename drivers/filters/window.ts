// A window onto part of a node (nbdkit's offset filter): offset 0 of the window is
// `offset` of the node below, and the window is `length` bytes long. tsmount shows each
// partition of a disk through one (fs/partitions.ts). Requests stay inside the window
// because callers keep them inside `size`; the window only shifts them.
import type { BlockNode, Extent } from '../types.js';
import { Filter } from './filter.js';

export class WindowFilter extends Filter {
  private backingWindow: BlockNode | undefined;

  /** `label` names the window in messages ("p1"). */
  constructor(next: BlockNode, private readonly offset: number, private readonly length: number, private readonly label: string) {
    super(next);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > next.size) {
      throw new RangeError(`window ${offset}+${length} outside a node of ${next.size} bytes`);
    }
  }

  override get size(): number {
    return this.length;
  }
  override get name(): string {
    return `${this.next.name} (${this.label})`;
  }

  override read(offset: number, dst: Uint8Array): Promise<void> {
    return this.next.read(this.offset + offset, dst);
  }
  override write(offset: number, src: Uint8Array): Promise<void> {
    return this.next.write(this.offset + offset, src);
  }
  override async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const start = this.offset + offset;
    const out: Extent[] = [];
    for (const e of await this.next.blockStatus(start, length)) {
      const s = Math.max(e.offset, start);
      const t = Math.min(e.offset + e.length, start + length);
      if (t > s) out.push({ offset: s - this.offset, length: t - s, kind: e.kind });
    }
    return out;
  }
  /** The node below belongs to the whole disk's file, which closes it. */
  override close(): Promise<void> {
    return Promise.resolve();
  }

  override get zero(): ((offset: number, length: number, unmap: boolean) => Promise<void>) | undefined {
    const next = this.next;
    return next.zero && ((offset, length, unmap) => next.zero!(this.offset + offset, length, unmap));
  }
  /** A partition need not start on a cluster of the image: its writes are never whole clusters of it. */
  override get writeCompressed(): undefined {
    return undefined;
  }
  override get compressedClusterSize(): undefined {
    return undefined;
  }
  /** A partition does not grow: its neighbour starts where it ends. */
  override get truncate(): undefined {
    return undefined;
  }
  /** Snapshots are of the whole disk, shown beside it. */
  override get snapshots(): undefined {
    return undefined;
  }
  /** The same window onto the next layer, so the chain walk (fs/extents.ts) asks the right bytes. */
  override get backing(): BlockNode | undefined {
    const below = this.next.backing;
    if (!below) return undefined;
    if (!this.backingWindow) {
      const start = Math.min(this.offset, below.size);
      this.backingWindow = new WindowFilter(below, start, Math.max(0, Math.min(this.length, below.size - start)), this.label);
    }
    return this.backingWindow;
  }
}
