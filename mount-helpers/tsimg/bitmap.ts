// tsimg bitmap: add, remove, clear, enable, disable and merge persistent dirty bitmaps,
// as qemu-img bitmap does (its actions in the order given, then the bitmaps stored when
// the image closes). The work is the format node's (BlockNode bitmapControl; qcow2's
// bitmap.ts); a merge's source in another image (-b) is read through readBitmap.
import { messageOf, UsageError } from '../../drivers/errors.js';
import { parseSize } from '../../drivers/options.js';
import { formatOf, openImage } from '../../drivers/open.js';
import type { BlockNode } from '../../drivers/types.js';
import { ExitError, openForRead, writableOptions, type OpenCli } from './common.js';

export interface BitmapCli extends OpenCli {
  add?: boolean;
  remove?: boolean;
  clear?: boolean;
  enable?: boolean;
  disable?: boolean;
  merge?: string[];
  granularity?: string;
  sourceFile?: string;
  sourceFormat?: string;
}

export type BitmapAction = { op: 'add' | 'remove' | 'clear' | 'enable' | 'disable' } | { op: 'merge'; source: string };

/** The actions in the order the command line gives them (qemu-img applies them so). */
export function actionsInOrder(argv: readonly string[]): BitmapAction[] {
  const out: BitmapAction[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') break;
    const m = /^--(add|remove|clear|enable|disable)$/.exec(a);
    if (m) out.push({ op: m[1] as 'add' });
    else if (a === '--merge' && i + 1 < argv.length) out.push({ op: 'merge', source: argv[++i]! });
    else if (a.startsWith('--merge=')) out.push({ op: 'merge', source: a.slice('--merge='.length) });
  }
  return out;
}

export async function bitmap(spec: string, name: string, o: BitmapCli, argv: readonly string[]): Promise<void> {
  const actions = actionsInOrder(argv);
  if (actions.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (o.granularity !== undefined && !actions.some((a) => a.op === 'add')) throw new UsageError('granularity only supported with --add');
  if (o.sourceFormat !== undefined && o.sourceFile === undefined) throw new UsageError('-F only supported with -b');
  if (o.sourceFile !== undefined && !actions.some((a) => a.op === 'merge')) throw new UsageError('Merge bitmap source file only supported with --merge');
  const granularity = o.granularity === undefined ? undefined : parseSize(o.granularity, 'granularity');
  const node = await openImage(spec, writableOptions(o));
  let source: BlockNode | undefined;
  try {
    const control = node.bitmapControl;
    if (!control) throw new ExitError(`${spec}: this image format (${formatOf(node) ?? 'unknown'}) does not support persistent bitmaps`, 1);
    if (o.sourceFile !== undefined) source = await openForRead(o.sourceFile, { ...o, format: o.sourceFormat });
    for (const a of actions) {
      try {
        if (a.op === 'add') await control.add(name, granularity);
        else if (a.op === 'merge') await control.merge(name, a.source, source);
        else await control[a.op](name);
      } catch (err) {
        throw new ExitError(`Operation ${a.op} on bitmap ${name} failed: ${messageOf(err)}`, 1);
      }
    }
  } finally {
    await source?.close().catch(() => undefined);
    await node.close();
  }
}
