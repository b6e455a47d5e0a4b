// The read-only check, once for the whole graph: the graph builder (drivers/open.ts)
// puts this filter over every node opened read-only (a read-only mount, every backing
// file, a snapshot view), so no driver or protocol repeats it. Reads and everything
// else pass through; writes, zeroing and resizing fail with EROFS before any driver
// sees them.
import type { BitmapControl, BlockNode, RepairFixed, SnapshotControl, SnapshotView, TruncateOptions, ZeroOptions } from '../types.js';
import type { CreateOptions } from '../options.js';
import { ReadOnlyError } from '../errors.js';
import { SameReadsFilter } from './filter.js';

/** `node` itself when it is writable, else `node` behind the read-only filter. */
export function guarded(node: BlockNode): BlockNode {
  return node.readOnly && !(node instanceof ReadOnlyFilter) ? new ReadOnlyFilter(node) : node;
}

/** Reads are unchanged (SameReadsFilter); the flat file of a read-only node refuses opens for writing itself. */
export class ReadOnlyFilter extends SameReadsFilter {
  private views: SnapshotView[] | undefined;

  override get readOnly(): boolean {
    return true;
  }

  override write(): Promise<void> {
    return Promise.reject(this.refusal());
  }

  override get zero(): ((offset: number, length: number, unmap: boolean, o?: ZeroOptions) => Promise<void>) | undefined {
    return this.next.zero && (() => Promise.reject(this.refusal()));
  }

  override get writeCompressed(): ((offset: number, data: Uint8Array) => Promise<void>) | undefined {
    return this.next.writeCompressed && (() => Promise.reject(this.refusal()));
  }

  override get truncate(): ((size: number, o?: TruncateOptions) => Promise<void>) | undefined {
    return this.next.truncate && (() => Promise.reject(this.refusal()));
  }

  override get repairMetadata(): ((mode: 'leaks' | 'all') => Promise<RepairFixed | void>) | undefined {
    return this.next.repairMetadata && (() => Promise.reject(this.refusal()));
  }

  override get makeEmpty(): (() => Promise<void>) | undefined {
    return this.next.makeEmpty && (() => Promise.reject(this.refusal()));
  }

  override get setBacking(): ((file: string | undefined, format: string | undefined) => Promise<void>) | undefined {
    return this.next.setBacking && (() => Promise.reject(this.refusal()));
  }

  override get amend(): ((options: CreateOptions) => Promise<void>) | undefined {
    return this.next.amend && (() => Promise.reject(this.refusal()));
  }

  override get snapshotControl(): SnapshotControl | undefined {
    if (!this.next.snapshotControl) return undefined;
    const refuse = (): Promise<void> => Promise.reject(this.refusal());
    return { create: refuse, remove: refuse, apply: refuse };
  }

  override get bitmapControl(): BitmapControl | undefined {
    if (!this.next.bitmapControl) return undefined;
    const refuse = (): Promise<void> => Promise.reject(this.refusal());
    return { add: refuse, remove: refuse, clear: refuse, enable: refuse, disable: refuse, merge: refuse };
  }

  /** Snapshot views are read-only whatever the image is. */
  override get snapshots(): (() => SnapshotView[]) | undefined {
    const next = this.next;
    if (!next.snapshots) return undefined;
    return () => (this.views ??= next.snapshots!().map((s) => ({ ...s, node: guarded(s.node) })));
  }

  private refusal(): ReadOnlyError {
    return new ReadOnlyError(`${this.name}: opened read-only`);
  }
}
