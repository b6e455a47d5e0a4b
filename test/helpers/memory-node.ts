// A BlockNode in memory, for unit tests of filters and helpers that sit on another
// node: it records every request it is given, can leave out zero(), can make writes
// fail, and can hold requests back until the test lets them go.
import type { BlockNode, Extent } from '../../drivers/types.js';

export type Op =
  | { op: 'read'; offset: number; length: number }
  | { op: 'write'; offset: number; length: number }
  | { op: 'zero'; offset: number; length: number; unmap: boolean }
  | { op: 'flush' }
  | { op: 'truncate'; size: number };

export interface MemoryNodeOptions {
  readOnly?: boolean;
  /** Leave zero() out, as nodes without a zero operation do. */
  noZero?: boolean;
  name?: string;
}

export class MemoryNode implements BlockNode {
  readonly ops: Op[] = [];
  data: Buffer;
  readonly readOnly: boolean;
  readonly name: string;
  closed = false;
  /** When set, the next write (or zero) fails with this error and changes nothing. */
  failNextWrite: Error | undefined;
  /** When set, every request waits for this promise before it touches the bytes. */
  gate: Promise<void> | undefined;
  zero?: (offset: number, length: number, unmap: boolean) => Promise<void>;

  constructor(sizeOrData: number | Buffer, opts: MemoryNodeOptions = {}) {
    this.data = typeof sizeOrData === 'number' ? Buffer.alloc(sizeOrData) : Buffer.from(sizeOrData);
    this.readOnly = opts.readOnly ?? false;
    this.name = opts.name ?? 'memory';
    if (!opts.noZero) this.zero = (o, l, u) => this.doZero(o, l, u);
  }

  get size(): number {
    return this.data.length;
  }

  /** The requests of one kind, in order. */
  count(op: Op['op']): number {
    return this.ops.filter((o) => o.op === op).length;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    this.ops.push({ op: 'read', offset, length: dst.length });
    this.check(offset, dst.length);
    await this.gate;
    dst.set(this.data.subarray(offset, offset + dst.length));
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    this.ops.push({ op: 'write', offset, length: src.length });
    this.check(offset, src.length);
    if (this.readOnly) throw new Error(`${this.name}: read-only`);
    await this.gate;
    this.takeFailure();
    this.data.set(src, offset);
  }

  private async doZero(offset: number, length: number, unmap: boolean): Promise<void> {
    this.ops.push({ op: 'zero', offset, length, unmap });
    this.check(offset, length);
    await this.gate;
    this.takeFailure();
    this.data.fill(0, offset, offset + length);
  }

  async flush(): Promise<void> {
    this.ops.push({ op: 'flush' });
    await this.gate;
  }

  async truncate(size: number): Promise<void> {
    this.ops.push({ op: 'truncate', size });
    const next = Buffer.alloc(size);
    this.data.copy(next, 0, 0, Math.min(size, this.data.length));
    this.data = next;
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, kind: 'data' }];
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private check(offset: number, length: number): void {
    if (offset < 0 || offset + length > this.data.length) throw new Error(`${this.name}: request [${offset}, ${offset + length}) outside [0, ${this.data.length})`);
  }

  private takeFailure(): void {
    const err = this.failNextWrite;
    if (err) {
      this.failNextWrite = undefined;
      throw err;
    }
  }
}

/** A promise and the function that settles it, to hold requests back in a test. */
export function latch(): { promise: Promise<void>; release: () => void } {
  let release!: () => void;
  const promise = new Promise<void>((r) => (release = r));
  return { promise, release };
}
