// Counts what passes through (tsmount --list): requests, bytes, requests in flight,
// failures. A few integer additions per request; whoever wants the numbers reads the
// object it was given.
import type { BlockNode } from '../types.js';
import { SameBytesFilter } from './filter.js';

export interface IoCounters {
  reads: number;
  bytesRead: number;
  writes: number;
  bytesWritten: number;
  inFlight: number;
  errors: number;
}

export function newCounters(): IoCounters {
  return { reads: 0, bytesRead: 0, writes: 0, bytesWritten: 0, inFlight: 0, errors: 0 };
}

/**
 * Counts, changes nothing (SameBytesFilter): passthrough I/O is the kernel's alone and is
 * not counted (tsmount --list says so); the workers count their reads and writes
 * themselves (fs/read-map-table.ts).
 */
export class CountingFilter extends SameBytesFilter {
  constructor(next: BlockNode, readonly counters: IoCounters) {
    super(next);
  }

  override read(offset: number, dst: Uint8Array): Promise<void> {
    return this.count(this.next.read(offset, dst), dst.length, false);
  }

  override write(offset: number, src: Uint8Array): Promise<void> {
    return this.count(this.next.write(offset, src), src.length, true);
  }

  override get writeCompressed(): ((offset: number, data: Uint8Array) => Promise<void>) | undefined {
    const next = this.next;
    return next.writeCompressed && ((offset, data) => this.count(next.writeCompressed!(offset, data), data.length, true));
  }

  private async count(request: Promise<void>, bytes: number, write: boolean): Promise<void> {
    const c = this.counters;
    if (write) c.writes++;
    else c.reads++;
    c.inFlight++;
    try {
      await request;
      if (write) c.bytesWritten += bytes;
      else c.bytesRead += bytes;
    } catch (err) {
      c.errors++;
      throw err;
    } finally {
      c.inFlight--;
    }
  }
}
