// A file node that "loses power" after a number of changes, for crash tests of
// format drivers that write through a BlockNode (vhdx's log, tsimg check's fixtures).
import type { BlockNode, Extent } from '../../drivers/types.js';

/**
 * A file that "loses power" after `budget` changing operations: every write or
 * truncate after that fails and changes nothing. What was written before stays.
 */
export class CrashingFile implements BlockNode {
  ops = 0;
  constructor(
    private readonly inner: BlockNode,
    private readonly budget: number,
  ) {}
  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get name(): string {
    return this.inner.name;
  }
  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.inner.read(offset, dst);
  }
  private spend(): void {
    if (this.ops++ >= this.budget) throw new Error('power lost');
  }
  async write(offset: number, src: Uint8Array): Promise<void> {
    this.spend();
    await this.inner.write(offset, src);
  }
  async truncate(size: number): Promise<void> {
    this.spend();
    await this.inner.truncate!(size);
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
