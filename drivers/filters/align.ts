// Request alignment, once, for every node that needs it (nbdkit's cow filter shape):
// a write that does not start and end on `align` becomes read-modify-write of its
// unaligned head and tail, and the aligned body passes through. A node declares its
// unit as `requestAlignment` (sector-based formats: vdi, vpc, vmdk, vhdx, parallels,
// luks, encrypted qcow/qcow2; NBD exports with a minimum block size) and the graph
// builder (drivers/open.ts) puts this filter over it through `aligned()`. Overlapping
// read-modify-writes are serialised so two unaligned writes into one sector cannot
// lose each other's bytes.
import type { BlockNode, SnapshotView } from '../types.js';
import { SameBytesFilter } from './filter.js';

interface Range {
  start: number;
  end: number;
  done: Promise<void>;
}

/** `node` itself where it takes any request, else `node` behind the alignment filter. */
export function aligned(node: BlockNode): BlockNode {
  const a = node.requestAlignment ?? 1;
  return a > 1 ? new AlignFilter(node, a) : node;
}

/**
 * Only the shape of requests changes here, never the bytes, so going around it is the
 * same (SameBytesFilter): an O_DIRECT file offers no host descriptor, and a node offers
 * passthrough only on a file that takes any request; a range the node below calls
 * writable in place is plain data in its host file, where a pwrite(2) of part of a
 * sector is what this filter's read-modify-write would do, and the workers never write
 * while a change through the graph (this filter's included) runs (fs/read-map.ts).
 */
export class AlignFilter extends SameBytesFilter {
  private readonly busy = new Set<Range>();
  private views: SnapshotView[] | undefined;

  constructor(next: BlockNode, readonly align: number) {
    super(next);
  }

  /** Above this filter any request is fine. */
  override get requestAlignment(): number | undefined {
    return undefined;
  }

  /** Snapshot views share the image's unit: they get the filter too. */
  override get snapshots(): (() => SnapshotView[]) | undefined {
    const next = this.next;
    if (!next.snapshots) return undefined;
    return () => (this.views ??= next.snapshots!().map((s) => ({ ...s, node: aligned(s.node) })));
  }

  override async read(offset: number, dst: Uint8Array): Promise<void> {
    const a = this.align;
    if (offset % a === 0 && dst.length % a === 0) return this.next.read(offset, dst);
    const start = offset - (offset % a);
    const end = roundUp(offset + dst.length, a);
    const buf = new Uint8Array(end - start);
    // A node whose size is not a multiple of its unit: its last unit is partial, and
    // nothing past its end is asked for.
    await this.next.read(start, buf.subarray(0, Math.min(end, this.next.size) - start));
    dst.set(buf.subarray(offset - start, offset - start + dst.length));
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    const a = this.align;
    const end = offset + src.length;
    if (offset % a === 0 && end % a === 0) {
      await this.exclusive(offset, end, () => this.next.write(offset, src));
      return;
    }
    const start = offset - (offset % a);
    const alignedEnd = Math.min(roundUp(end, a), Math.max(end, this.next.size));
    await this.exclusive(start, alignedEnd, async () => {
      const buf = new Uint8Array(alignedEnd - start);
      // Only the head and tail units need their old bytes (a partial last unit of
      // the node only up to its end).
      await this.next.read(start, buf.subarray(0, Math.min(a, alignedEnd - start)));
      const tail = alignedEnd - (alignedEnd % a === 0 ? a : alignedEnd % a);
      if (tail > start) await this.next.read(tail, buf.subarray(tail - start));
      buf.set(src, offset - start);
      await this.next.write(start, buf);
    });
  }

  /** Run fn once no overlapping request is in flight, and keep others out meanwhile. */
  private async exclusive(start: number, end: number, fn: () => Promise<void>): Promise<void> {
    for (;;) {
      const clash = [...this.busy].find((r) => r.start < end && start < r.end);
      if (!clash) break;
      await clash.done.catch(() => undefined);
    }
    let release!: () => void;
    const range: Range = { start, end, done: new Promise<void>((r) => (release = r)) };
    this.busy.add(range);
    try {
      await fn();
    } finally {
      this.busy.delete(range);
      release();
    }
  }

  /** Always offered: where the node below cannot zero, zeros are written. */
  override get zero(): (offset: number, length: number, unmap: boolean) => Promise<void> {
    return (offset, length, unmap) => this.alignedZero(offset, length, unmap);
  }

  private async alignedZero(offset: number, length: number, unmap: boolean): Promise<void> {
    const a = this.align;
    const end = offset + length;
    const bodyStart = roundUp(offset, a);
    const bodyEnd = end - (end % a);
    if (bodyStart >= bodyEnd || !this.next.zero) {
      await this.write(offset, new Uint8Array(length));
      return;
    }
    if (bodyStart > offset) await this.write(offset, new Uint8Array(bodyStart - offset));
    await this.exclusive(bodyStart, bodyEnd, () => this.next.zero!(bodyStart, bodyEnd - bodyStart, unmap));
    if (end > bodyEnd) await this.write(bodyEnd, new Uint8Array(end - bodyEnd));
  }
}

function roundUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}
