// The raw format: the guest disk is the file's bytes.
import type { BlockNode, Extent, FormatDriver } from '../types.js';

class RawNode implements BlockNode {
  constructor(private readonly file: BlockNode) {}
  /** QEMU counts every node in 512-byte sectors, rounding a file's length up. */
  get size(): number {
    return Math.ceil(this.file.size / 512) * 512;
  }
  get readOnly(): boolean {
    return this.file.readOnly;
  }
  get name(): string {
    return this.file.name;
  }
  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.file.read(offset, dst);
  }
  write(offset: number, src: Uint8Array): Promise<void> {
    return this.file.write(offset, src);
  }
  zero(offset: number, length: number, unmap: boolean): Promise<void> {
    if (this.file.zero) return this.file.zero(offset, length, unmap);
    return this.file.write(offset, new Uint8Array(length));
  }
  flush(): Promise<void> {
    return this.file.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.file.blockStatus(offset, length);
  }
  async truncate(size: number): Promise<void> {
    if (!this.file.truncate) throw new Error(`${this.name}: cannot be resized`);
    await this.file.truncate(size);
  }
  close(): Promise<void> {
    return this.file.close();
  }
}

export const rawDriver: FormatDriver = {
  name: 'raw',
  // QEMU's raw_probe answers 1: raw is only ever the last resort.
  probe: () => 1,
  open: async (file) => new RawNode(file),
};
