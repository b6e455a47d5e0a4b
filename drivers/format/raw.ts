// The raw format: the guest disk is the file's bytes.
import type { Creatable, CreateRequest, Extent, FormatDriver, ImageDescription } from '../types.js';
import { SameBytesFilter } from '../filters/filter.js';
import { UsageError } from '../errors.js';

/**
 * The file itself, but for its size: a pass-through that changes no byte
 * (SameBytesFilter, drivers/filters/filter.ts): block status gives the file's own
 * offsets, and nothing of the format changes on a write, so where the file allows it
 * reads and writes may go around.
 */
class RawNode extends SameBytesFilter {
  /** QEMU counts every node in 512-byte sectors, rounding a file's length up. */
  override get size(): number {
    return Math.ceil(this.next.size / 512) * 512;
  }
  /** The file's bytes 1:1, unless the size was rounded up to a sector (the tail reads as zeros here). */
  override get passthroughFd(): number | undefined {
    return this.next.size % 512 === 0 ? this.next.passthroughFd : undefined;
  }
  /** raw_get_info: no cluster size, never dirty. */
  override get describe(): () => ImageDescription {
    return () => ({ dirty: false });
  }
  /** The file's own status, at the same offsets (qemu-img map gives raw data its offset). */
  override async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return (await this.next.blockStatus(offset, length)).map((e) => ({ ...e, host: e.offset }));
  }
  /** Always offered: where the file cannot zero, zeros are written. */
  override get zero(): (offset: number, length: number, unmap: boolean) => Promise<void> {
    const file = this.next;
    return (offset, length, unmap) => (file.zero ? file.zero(offset, length, unmap) : file.write(offset, new Uint8Array(length)));
  }
}

async function create(req: CreateRequest): Promise<void> {
  const prealloc = req.options.choice('preallocation', ['off', 'falloc', 'full'] as const) ?? 'off';
  req.options.finish('raw');
  if (req.size === undefined) throw new UsageError(`${req.spec}: raw images need a size`);
  const file = req.file;
  if (!file.truncate) throw new UsageError(`${req.spec}: this protocol cannot be sized`);
  // The file's own preallocation, as QEMU's raw create is file-posix's (a protocol
  // without it refuses any but off); its size rounded up to whole sectors, as QEMU's protocols do.
  await file.truncate(Math.ceil(req.size / 512) * 512, prealloc === 'off' ? {} : { prealloc });
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
