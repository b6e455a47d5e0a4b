// tsimg resize: change the virtual size, as qemu-img resize does ([+|-]SIZE; a shrink
// only with --shrink; --preallocation for the new area). The work is drivers/resize.ts
// resizeNode: the node's `truncate` capability, the backing file kept out of the new area.
import { UsageError } from '../../drivers/errors.js';
import { parseSize } from '../../drivers/options.js';
import { formatOf, openImage } from '../../drivers/open.js';
import { resizeNode } from '../../drivers/resize.js';
import { PREALLOCATION_MODES, type Preallocation } from '../../drivers/types.js';
import { print, writableOptions, type OpenCli } from './common.js';

export interface ResizeCli extends OpenCli {
  shrink?: boolean;
  quiet?: boolean;
  preallocation?: string;
}

/** The new size from qemu-img's SIZE, +SIZE or -SIZE. */
export function newSize(current: number, text: string): number {
  const sign = text[0] === '+' || text[0] === '-' ? text[0] : '';
  const n = parseSize(sign ? text.slice(1) : text, 'size');
  const size = sign === '+' ? current + n : sign === '-' ? current - n : n;
  if (size < 0) throw new UsageError('New image size must be positive');
  return size;
}

/** --preallocation=MODE as qemu-img reads it (its message otherwise). */
export function parsePreallocation(text: string | undefined): Preallocation | undefined {
  if (text === undefined) return undefined;
  if (!(PREALLOCATION_MODES as readonly string[]).includes(text)) throw new UsageError(`Invalid preallocation mode '${text}'`);
  return text as Preallocation;
}

export async function resize(spec: string, sizeText: string, o: ResizeCli): Promise<void> {
  const prealloc = parsePreallocation(o.preallocation);
  // With its backing chain (read-only), as qemu-img opens it: the new area must not show the backing file.
  const node = await openImage(spec, writableOptions(o));
  try {
    const size = newSize(node.size, sizeText);
    if (!node.truncate) throw new UsageError(`${spec}: this image format (${formatOf(node) ?? 'unknown'}) does not support resizing`);
    if (size < node.size && !o.shrink) {
      throw new UsageError("Use the --shrink option to perform a shrink operation.\nwarning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
    }
    await resizeNode(node, size, { prealloc });
    await node.flush();
  } finally {
    await node.close();
  }
  if (!o.quiet) print('Image resized.\n');
}
