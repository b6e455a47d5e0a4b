// The layers under a format node, shared by every format: reading through to the
// backing node, and closing the backing node and files when the node closes.
import type { BlockNode, CreateRequest } from '../types.js';
import { UsageError } from '../errors.js';

/**
 * Fill dst with the backing node's bytes at offset; where the backing node is
 * shorter than the overlay (or absent), the rest reads as zeros, as in QEMU.
 */
export async function readFromBacking(backing: BlockNode | undefined, offset: number, dst: Uint8Array): Promise<void> {
  const avail = backing ? Math.max(0, Math.min(dst.length, backing.size - offset)) : 0;
  if (avail > 0) await backing!.read(offset, avail === dst.length ? dst : dst.subarray(0, avail));
  if (avail < dst.length) dst.fill(0, avail);
}

/**
 * The end of a format node's close(): flush when writable, then close each layer
 * under it in order (backing node, extra files, the image file). Every step runs
 * even when one before it failed.
 */
export async function closeLayers(node: { readonly readOnly: boolean; flush(): Promise<void> }, ...layers: (BlockNode | undefined)[]): Promise<void> {
  try {
    if (!node.readOnly) await node.flush();
  } finally {
    await closeInOrder(layers);
  }
}

async function closeInOrder(layers: (BlockNode | undefined)[]): Promise<void> {
  const [first, ...rest] = layers;
  if (layers.length === 0) return;
  try {
    await first?.close();
  } finally {
    await closeInOrder(rest);
  }
}

/**
 * A new image's size: the one given, else its backing file's. The backing file
 * must open either way, as qemu-img create checks.
 */
export async function sizeWithBacking(req: CreateRequest, backingFile: string | undefined, backingFmt: string | undefined, format: string): Promise<number> {
  let size = req.size;
  if (backingFile !== undefined) {
    const { node } = await req.openImage(backingFile, backingFmt);
    size ??= node.size;
  }
  if (size === undefined) throw new UsageError(`${req.spec}: ${format} images need a size`);
  return size;
}
