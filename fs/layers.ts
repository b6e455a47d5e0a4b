// --layers: each layer below an image in its backing chain also shown read-only as
// MOUNTPOINT/<stem>@<layer>.raw, the bytes that layer gives with its own backing
// files under it (what `qemu-img convert` of that file gives). The nodes are the
// chain's own, opened read-only by the graph builder; the image's file closes them.
import path from 'node:path';
import type { BlockNode } from '../drivers/types.js';
import type { FlatFile } from './flatfs.js';

/** A layer's name in a file name: its file's name without the extension, or a URI's last part. */
function layerName(node: BlockNode): string {
  const base = path.basename(node.name.replace(/[?#].*$/, '').replace(/\/+$/, ''));
  const dot = base.lastIndexOf('.');
  return dot > 0 ? base.slice(0, dot) : base;
}

export function layerFiles(images: FlatFile[], taken: Set<string>, warn: (msg: string) => void): FlatFile[] {
  const out: FlatFile[] = [];
  for (const f of images) {
    const stem = f.name.replace(/\.raw$/, '');
    const { hostFile: _, ...rest } = f;
    for (let n = f.node.backing, depth = 1; n; n = n.backing, depth++) {
      let name = `${stem}@${layerName(n)}.raw`;
      // Two layers of one name (base.qcow2 and base.vmdk, or a/base and b/base): the depth tells them apart.
      if (taken.has(name)) name = `${stem}@${layerName(n)}.${depth}.raw`;
      if (layerName(n) === '' || /[/\0]/.test(layerName(n)) || Buffer.byteLength(name) > 255 || taken.has(name)) {
        warn(`layer ${depth} of ${f.node.name} (${n.name}) cannot be shown as a file; skipped`);
        continue;
      }
      taken.add(name);
      out.push({ ...rest, name, node: n, writable: false });
    }
  }
  return out;
}
