// tsimg snapshot: list, create, delete and apply internal snapshots, as qemu-img
// snapshot does (-l, -c, -d, -a). The work is the format node's (BlockNode
// snapshotControl; qcow2's snapshot-ops.ts); listing reads what `info` shows.
import { messageOf, UsageError } from '../../drivers/errors.js';
import { formatOf, openImage } from '../../drivers/open.js';
import { ExitError, print, writableOptions, type OpenCli } from './common.js';
import { infoJson, snapshotList } from './info.js';

export interface SnapshotCli extends OpenCli {
  list?: boolean;
  create?: string;
  delete?: string;
  apply?: string;
}

export async function snapshot(spec: string, o: SnapshotCli): Promise<void> {
  const ops = [o.list, o.create, o.delete, o.apply].filter((x) => x !== undefined);
  if (ops.length !== 1) throw new UsageError('give exactly one of -l, -c NAME, -d NAME, -a NAME');
  if (o.list) {
    const [j] = await infoJson(spec, o, false);
    const snaps = j!.snapshots as Record<string, number | string>[] | undefined;
    if (snaps && snaps.length > 0) print(snapshotList(snaps));
    return;
  }
  // The snapshot operations need no backing file (qemu-img opens with BDRV_O_NO_BACKING).
  const node = await openImage(spec, writableOptions(o, { noBacking: true }));
  try {
    const control = node.snapshotControl;
    if (!control) throw new ExitError(`${spec}: this image format (${formatOf(node) ?? 'unknown'}) does not support internal snapshots`, 1);
    const [verb, name, run] =
      o.create !== undefined ? ['create', o.create, () => control.create(o.create!)] : o.delete !== undefined ? ['delete', o.delete, () => control.remove(o.delete!)] : ['apply', o.apply!, () => control.apply(o.apply!)];
    try {
      await run();
    } catch (err) {
      throw new ExitError(`Could not ${verb} snapshot '${name}': ${messageOf(err)}`, 1);
    }
  } finally {
    await node.close();
  }
}
