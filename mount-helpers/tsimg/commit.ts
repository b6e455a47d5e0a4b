// tsimg commit: write what the image holds itself into its backing file, then empty
// the image so that it reads through (qemu-img commit; -d keeps it). The image is
// opened without its chain and the backing file by itself, writable: each is one
// graph (drivers/open.ts) and the backing file passes the named-file guard.
import type { BlockNode } from '../../drivers/types.js';
import { UsageError } from '../../drivers/errors.js';
import { openImage } from '../../drivers/open.js';
import { resizeNode } from '../../drivers/resize.js';
import { print, progress, writableOptions, type OpenCli, type Progress } from './common.js';
import { pathCombine } from '../../drivers/protocol/index.js';

export interface CommitCli extends OpenCli {
  progress?: boolean;
  drop?: boolean;
  quiet?: boolean;
}

const CHUNK = 4 << 20;

/**
 * Copy the runs `top` holds itself (data and zeros; not what it leaves to its backing
 * file) onto `base`; zeros as QEMU's commit (a mirror job with unmap on) writes them.
 */
export async function copyAllocated(top: BlockNode, base: BlockNode, show?: Progress): Promise<void> {
  const buf = Buffer.alloc(CHUNK);
  for (let pos = 0; pos < top.size; pos += CHUNK) {
    const n = Math.min(CHUNK, top.size - pos);
    for (const e of await top.blockStatus(pos, n)) {
      if (e.kind === 'unallocated') continue;
      if (e.kind === 'zero') {
        // As qemu-img commit's mirror job: zeros that may unmap (a qcow2 base's clusters there freed).
        if (base.zero) await base.zero(e.offset, e.length, true, { writeZeroes: true });
        else await base.write(e.offset, buf.fill(0).subarray(0, e.length));
        continue;
      }
      const part = buf.subarray(0, e.length);
      await top.read(e.offset, part);
      await base.write(e.offset, part);
    }
    show?.update((pos + n) / top.size);
  }
}

export async function commit(spec: string, o: CommitCli): Promise<void> {
  const top = await openImage(spec, writableOptions(o, { noBacking: true }));
  try {
    const d = top.describe?.() ?? {};
    if (d.backingFile === undefined) throw new UsageError(`${spec}: Image does not have a backing file`);
    const base = await openImage(pathCombine(spec, d.backingFile), writableOptions({ ...o, format: d.backingFormat, preallocate: undefined }));
    try {
      // The backing file grows to the image's size, as qemu-img commit's does.
      if (base.size < top.size) {
        if (!base.truncate) throw new UsageError(`${base.name}: the backing file is smaller than the image and cannot grow`);
        await resizeNode(base, top.size);
      }
      const show = o.quiet ? undefined : progress(o.progress);
      await copyAllocated(top, base, show);
      await base.flush();
      show?.done();
    } finally {
      await base.close();
    }
    if (!o.drop && top.makeEmpty) await top.makeEmpty();
    await top.flush();
  } finally {
    await top.close();
  }
  if (!o.quiet) print('Image committed.\n');
}
