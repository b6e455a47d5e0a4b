// Image files in memory that record how a format writes them: every write (with
// pwritev's parts), and, for ZeroingFile, the file protocol's allocateZeros.
import { MemoryNode } from './memory-node.js';

/** The image file in memory, growing as a file does, counting writes, with a pwritev as the file protocol has. */
export class CountingFile extends MemoryNode {
  readonly writes: { offset: number; length: number; parts: number }[] = [];

  constructor(data: Buffer) {
    super(data);
    // Zeroing past the end grows the file, as the file protocol's zero does.
    const zero = this.zero!;
    this.zero = (offset, length, unmap) => {
      this.grow(offset + length);
      return zero(offset, length, unmap);
    };
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    this.writes.push({ offset, length: src.length, parts: 1 });
    this.grow(offset + src.length);
    await super.write(offset, src);
  }

  async writev(offset: number, parts: Uint8Array[]): Promise<void> {
    const length = parts.reduce((n, p) => n + p.length, 0);
    this.writes.push({ offset, length, parts: parts.length });
    this.grow(offset + length);
    let at = offset;
    for (const p of parts) {
      await super.write(at, p);
      at += p.length;
    }
  }

  protected grow(end: number): void {
    if (end <= this.data.length) return;
    const next = Buffer.alloc(end);
    this.data.copy(next);
    this.data = next;
  }
}

/** CountingFile with the file protocol's allocateZeros (fallocate ZERO_RANGE), which can be told to refuse. */
export class ZeroingFile extends CountingFile {
  readonly zeroed: { offset: number; length: number }[] = [];
  refuse = false;

  async allocateZeros(offset: number, length: number): Promise<boolean> {
    if (this.refuse) return false;
    this.zeroed.push({ offset, length });
    // Grows the file as a write does, and reads as zeros.
    this.grow(offset + length);
    this.data.fill(0, offset, offset + length);
    return true;
  }
}
