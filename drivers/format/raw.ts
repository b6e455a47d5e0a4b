// The raw format: the guest disk is the file's bytes.
import type { BlockNode, Creatable, CreateRequest, Extent, FormatDriver } from '../types.js';
import { UsageError } from '../errors.js';

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

/** Bytes written per request by preallocation=full. */
const FILL_CHUNK = 1 << 20;

async function create(req: CreateRequest): Promise<void> {
  const prealloc = req.options.choice('preallocation', ['off', 'falloc', 'full'] as const) ?? 'off';
  req.options.finish('raw');
  if (req.size === undefined) throw new UsageError(`${req.spec}: raw images need a size`);
  const file = req.file;
  if (!file.truncate) throw new UsageError(`${req.spec}: this protocol cannot be sized`);
  await file.truncate(req.size);
  if (prealloc === 'falloc' && file.zero) {
    // Allocating zeroes: fallocate without punching, as posix_fallocate would.
    await file.zero(0, req.size, false);
  } else if (prealloc === 'full') {
    const zeros = new Uint8Array(Math.min(FILL_CHUNK, req.size));
    for (let off = 0; off < req.size; off += zeros.length) {
      await file.write(off, zeros.subarray(0, Math.min(zeros.length, req.size - off)));
    }
  }
  await file.flush();
}

export const rawDriver: FormatDriver & Creatable = {
  name: 'raw',
  // QEMU's raw_probe answers 1: raw is only ever the last resort.
  probe: () => 1,
  open: async (file) => new RawNode(file),
  createOptions: ['preallocation'],
  create,
};
