// tsimg rebase: give an image another backing file, as qemu-img rebase does. Safe
// mode copies into the image every range it leaves to its backing file where the old
// and the new backing files read differently; -u only rewrites the header (the node's
// setBacking capability).
import type { BlockNode } from '../../drivers/types.js';
import { UsageError } from '../../drivers/errors.js';
import { formatOf, openImage } from '../../drivers/open.js';
import { progress, readOnlyOptions, writableOptions, type OpenCli, type Progress } from './common.js';
import { fullBackingName } from './info.js';

export interface RebaseCli extends OpenCli {
  backing: string;
  backingFormat?: string;
  unsafe?: boolean;
  progress?: boolean;
  quiet?: boolean;
}

const CHUNK = 1 << 20;
/** The unit compared and copied: qemu-img rebase compares a cluster at a time. */
const UNIT = 64 << 10;

/** Read [offset, offset + dst.length) of a backing node; zeros past its end, and where there is none. */
async function readBelow(node: BlockNode | undefined, offset: number, dst: Uint8Array): Promise<void> {
  dst.fill(0);
  if (!node || offset >= node.size) return;
  await node.read(offset, dst.subarray(0, Math.min(dst.length, node.size - offset)));
}

/** Copy into `top` what its old backing file shows where the new one would show something else. */
export async function copyDifferences(top: BlockNode, oldBase: BlockNode | undefined, newBase: BlockNode | undefined, show?: Progress): Promise<void> {
  const a = Buffer.alloc(CHUNK);
  const b = Buffer.alloc(CHUNK);
  for (let pos = 0; pos < top.size; pos += CHUNK) {
    const n = Math.min(CHUNK, top.size - pos);
    for (const e of await top.blockStatus(pos, n)) {
      if (e.kind !== 'unallocated') continue;
      for (let at = e.offset; at < e.offset + e.length; ) {
        const len = Math.min(UNIT - (at % UNIT), e.offset + e.length - at);
        const pa = a.subarray(0, len);
        const pb = b.subarray(0, len);
        await readBelow(oldBase, at, pa);
        await readBelow(newBase, at, pb);
        if (!pa.equals(pb)) await top.write(at, pa);
        at += len;
      }
    }
    show?.update((pos + n) / top.size);
  }
}

export async function rebase(spec: string, o: RebaseCli): Promise<void> {
  const removing = o.backing === '';
  if (removing && o.backingFormat !== undefined) throw new UsageError('-F needs a backing file');
  const top = await openImage(spec, writableOptions(o, { noBacking: o.unsafe === true }));
  try {
    if (!top.setBacking) throw new UsageError(`${spec}: this image format cannot change its backing file`);
    let format = o.backingFormat;
    let newBase: BlockNode | undefined;
    try {
      if (!removing) {
        try {
          newBase = await openImage(fullBackingName(spec, o.backing), readOnlyOptions({ ...o, format: o.backingFormat }, { forceShare: true }));
          format ??= formatOf(newBase);
        } catch (err) {
          // -u may name a backing file that is not there (yet): qemu-img records it all the same.
          if (!o.unsafe) throw err;
        }
      }
      if (!o.unsafe) {
        const show = o.quiet ? undefined : progress(o.progress);
        await copyDifferences(top, top.backing, newBase, show);
        await top.flush();
        show?.done();
      }
    } finally {
      await newBase?.close();
    }
    await top.setBacking(removing ? undefined : o.backing, removing ? undefined : format);
    await top.flush();
  } finally {
    await top.close();
  }
}
