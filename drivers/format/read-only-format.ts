// What the formats QEMU only reads (bochs, cloop) share: the refusal of a writable
// open, and a mapped node that never writes. A read-only open is all they allow, so
// the graph builder puts the read-only filter over them and no write reaches them.
import type { BlockNode, OpenOptions } from '../types.js';
import { ReadOnlyError, UnsupportedError } from '../errors.js';
import { MappedNode } from './mapped-node.js';

/** One line for `--rw` on an image of a format that is read-only here (as in QEMU). */
export function refuseWritable(file: BlockNode, opts: OpenOptions, format: string): void {
  if (!opts.readOnly) throw new UnsupportedError(`${file.name}: ${format} images can only be opened read-only (convert the image to write to it)`);
}

export abstract class ReadOnlyMappedNode extends MappedNode {
  /** Nothing is written in place, so no metadata needs guarding. */
  readonly metadata = undefined;

  protected writeLocked(): Promise<void> {
    return Promise.reject(new ReadOnlyError(`${this.name}: opened read-only`));
  }
}
