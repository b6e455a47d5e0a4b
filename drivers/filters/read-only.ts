// The read-only check, once for the whole graph: the graph builder (drivers/open.ts)
// puts this filter over every node opened read-only (a read-only mount, every backing
// file, a snapshot view), so no driver or protocol repeats it. Reads and everything
// else pass through; writes, zeroing and resizing fail with EROFS before any driver
// sees them.
import type { BlockNode } from '../types.js';
import { ReadOnlyError } from '../errors.js';
import { Filter } from './filter.js';

/** `node` itself when it is writable, else `node` behind the read-only filter. */
export function guarded(node: BlockNode): BlockNode {
  return node.readOnly && !(node instanceof ReadOnlyFilter) ? new ReadOnlyFilter(node) : node;
}

export class ReadOnlyFilter extends Filter {
  private views: { name: string; node: BlockNode }[] | undefined;

  override get readOnly(): boolean {
    return true;
  }

  /** Reads are unchanged; the flat file of a read-only node refuses opens for writing itself. */
  override get passthroughFd(): number | undefined {
    return this.next.passthroughFd;
  }

  override write(): Promise<void> {
    return Promise.reject(this.refusal());
  }

  override get zero(): ((offset: number, length: number, unmap: boolean) => Promise<void>) | undefined {
    return this.next.zero && (() => Promise.reject(this.refusal()));
  }

  override get truncate(): ((size: number) => Promise<void>) | undefined {
    return this.next.truncate && (() => Promise.reject(this.refusal()));
  }

  /** Snapshot views are read-only whatever the image is. */
  override get snapshots(): (() => { name: string; node: BlockNode }[]) | undefined {
    const next = this.next;
    if (!next.snapshots) return undefined;
    return () => (this.views ??= next.snapshots!().map((s) => ({ name: s.name, node: guarded(s.node) })));
  }

  private refusal(): ReadOnlyError {
    return new ReadOnlyError(`${this.name}: opened read-only`);
  }
}
