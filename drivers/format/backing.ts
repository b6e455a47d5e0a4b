// Reading through to a backing node, shared by every format that has one.
import type { BlockNode } from '../types.js';

/**
 * Fill dst with the backing node's bytes at offset; where the backing node is
 * shorter than the overlay (or absent), the rest reads as zeros, as in QEMU.
 */
export async function readFromBacking(backing: BlockNode | undefined, offset: number, dst: Uint8Array): Promise<void> {
  const avail = backing ? Math.max(0, Math.min(dst.length, backing.size - offset)) : 0;
  if (avail > 0) await backing!.read(offset, avail === dst.length ? dst : dst.subarray(0, avail));
  if (avail < dst.length) dst.fill(0, avail);
}
