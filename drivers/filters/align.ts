// Request alignment, once, for every driver that needs it (nbdkit's cow filter shape):
// a write that does not start and end on `align` becomes read-modify-write of its
// unaligned head and tail, and the aligned body passes through. Drivers whose
// on-disk unit is a sector (vdi, vpc, vmdk, vhdx, parallels, luks) sit under this
// and see only aligned writes. Overlapping read-modify-writes are serialised so two
// unaligned writes into one sector cannot lose each other's bytes.
import type { BlockNode, Extent } from '../types.js';

interface Range {
  start: number;
  end: number;
  done: Promise<void>;
}

export class AlignFilter implements BlockNode {
  private readonly busy = new Set<Range>();

  constructor(private readonly inner: BlockNode, readonly align: number) {}

  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get name(): string {
    return this.inner.name;
  }
  get encrypted(): boolean | undefined {
    return this.inner.encrypted;
  }
  get backing(): BlockNode | undefined {
    return (this.inner as { backing?: BlockNode }).backing;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    const a = this.align;
    if (offset % a === 0 && dst.length % a === 0) return this.inner.read(offset, dst);
    const start = offset - (offset % a);
    const end = Math.min(roundUp(offset + dst.length, a), roundUp(this.inner.size, a));
    const buf = new Uint8Array(end - start);
    await this.inner.read(start, buf);
    dst.set(buf.subarray(offset - start, offset - start + dst.length));
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    const a = this.align;
    const end = offset + src.length;
    if (offset % a === 0 && end % a === 0) {
      await this.exclusive(offset, end, () => this.inner.write(offset, src));
      return;
    }
    const start = offset - (offset % a);
    const alignedEnd = roundUp(end, a);
    await this.exclusive(start, alignedEnd, async () => {
      const buf = new Uint8Array(alignedEnd - start);
      // Only the head and tail sectors need their old bytes.
      await this.inner.read(start, buf.subarray(0, a));
      if (alignedEnd - a > start) await this.inner.read(alignedEnd - a, buf.subarray(buf.length - a));
      buf.set(src, offset - start);
      await this.inner.write(start, buf);
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

  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    const a = this.align;
    const end = offset + length;
    const bodyStart = roundUp(offset, a);
    const bodyEnd = end - (end % a);
    if (bodyStart >= bodyEnd || !this.inner.zero) {
      await this.write(offset, new Uint8Array(length));
      return;
    }
    if (bodyStart > offset) await this.write(offset, new Uint8Array(bodyStart - offset));
    await this.exclusive(bodyStart, bodyEnd, () => this.inner.zero!(bodyStart, bodyEnd - bodyStart, unmap));
    if (end > bodyEnd) await this.write(bodyEnd, new Uint8Array(end - bodyEnd));
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

function roundUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}
