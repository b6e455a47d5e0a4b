// A node opened for its metadata only (OpenOptions.noIo, qemu-img info's view): an
// encrypted image opened without its passphrase must never hand out ciphertext as
// data, so every data request is refused here, once, for all formats.
import { UsageError } from '../errors.js';
import { Filter } from './filter.js';
import type { BlockNode, Extent } from '../types.js';

class NoIoFilter extends Filter {
  private refuse(): Promise<never> {
    return Promise.reject(new UsageError(`${this.name}: opened for its metadata only; its data cannot be read or written`));
  }
  override read(): Promise<void> {
    return this.refuse();
  }
  override write(): Promise<void> {
    return this.refuse();
  }
  override blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus(offset, length);
  }
  override get zero(): undefined {
    return undefined;
  }
  override get writeCompressed(): undefined {
    return undefined;
  }
  override get compressedClusterSize(): undefined {
    return undefined;
  }
  override get truncate(): undefined {
    return undefined;
  }
}

/** `node`, refusing data requests when it was opened for metadata only. */
export function metadataOnly(node: BlockNode, noIo: boolean | undefined): BlockNode {
  return noIo ? new NoIoFilter(node) : node;
}
