// Resizing a disk, once for every caller (tsimg resize, tsimg commit, a --growable
// mount's truncate): QEMU's bdrv_co_truncate. The node does the work (its `truncate`
// capability); what is decided here holds for every format alike.
import type { BlockNode, Preallocation, TruncateOptions } from './types.js';
import { UnsupportedError, UsageError } from './errors.js';

/**
 * Give `node` the new size. Growing a layer whose backing file reaches past the old
 * end must not let the backing file's bytes show in the new area: the node is asked
 * to make it read as zeros (`zeroNew`, QEMU's BDRV_REQ_ZERO_WRITE), and refuses where
 * it cannot (qcow2 v2, qed), before anything changes.
 */
export async function resizeNode(node: BlockNode, size: number, o: { prealloc?: Preallocation } = {}): Promise<void> {
  if (!node.truncate) throw new UsageError(`${node.name}: this image format cannot be resized`);
  const growing = size > node.size;
  if (size < node.size && o.prealloc !== undefined && o.prealloc !== 'off') throw new UsageError('Preallocation can only be used for growing images');
  const backing = node.backing;
  const opts: TruncateOptions = {};
  if (o.prealloc !== undefined && o.prealloc !== 'off') opts.prealloc = o.prealloc;
  if (growing && backing !== undefined && backing.size > node.size) opts.zeroNew = true;
  await node.truncate(size, opts);
}

/**
 * For a node that grows only by extending with zeros (a remote file, a format whose
 * size is a header field): QEMU's refusal of any preallocation it cannot do.
 */
export function refusePreallocation(o: TruncateOptions | undefined): void {
  if (o?.prealloc !== undefined && o.prealloc !== 'off') throw new UnsupportedError(`Unsupported preallocation mode '${o.prealloc}'`);
}

/** `file` where its protocol can size it; one that cannot (an NBD export) refuses in one line. */
export function sizable(file: BlockNode): BlockNode & Required<Pick<BlockNode, 'truncate'>> {
  if (!file.truncate) throw new UsageError(`${file.name}: this protocol cannot be sized`);
  return file as BlockNode & Required<Pick<BlockNode, 'truncate'>>;
}
