// --partitions: each partition of a disk also shown as MOUNTPOINT/<stem>-p<N>.raw, a
// window (drivers/filters/window.ts) onto the disk's own top node, so its writes go
// through the same cache and the same locks as the whole disk's, and it is writable
// exactly when the disk's file is.
import { WindowFilter } from '../drivers/filters/window.js';
import { readPartitionTable, type Partition } from '../drivers/partition/table.js';
import { messageOf } from '../drivers/errors.js';
import type { FlatFile } from './flatfs.js';

export interface PartitionFile {
  file: FlatFile;
  partition: Partition;
}

/** The partition files of `disks` (the images' own files), none named as in `taken`; problems go to `warn`. */
export async function partitionFiles(disks: FlatFile[], taken: Set<string>, warn: (msg: string) => void): Promise<PartitionFile[]> {
  const out: PartitionFile[] = [];
  for (const f of disks) {
    const stem = f.name.replace(/\.raw$/, '');
    let table;
    try {
      table = await readPartitionTable(async (offset, length) => {
        const b = new Uint8Array(length);
        await f.node.read(offset, b);
        return b;
      }, f.node.size);
    } catch (err) {
      warn(`${f.node.name}: cannot read the partition table: ${messageOf(err)}`);
      continue;
    }
    for (const w of table.warnings) warn(`${f.node.name}: ${w}`);
    for (const p of table.partitions) {
      const label = `p${p.number}`;
      const name = `${stem}-${label}.raw`;
      if (taken.has(name)) {
        warn(`${f.node.name}: partition ${p.number} cannot be shown as ${name}, another file has that name; skipped`);
        continue;
      }
      taken.add(name);
      // The host file's allocation says nothing about one partition: no hostFile.
      const { hostFile: _, ...rest } = f;
      out.push({ partition: p, file: { ...rest, name, node: new WindowFilter(f.node, p.start, p.length, label) } });
    }
  }
  return out;
}
