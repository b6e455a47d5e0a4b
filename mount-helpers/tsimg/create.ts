// tsimg create: a new image of any writable format, through the format's create().
import type { BlockNode, Creatable, CreateRequest, FormatDriver } from '../../drivers/types.js';
import { UsageError } from '../../drivers/errors.js';
import { CreateOptions, parseOptionString, parseSize } from '../../drivers/options.js';
import { formatByName } from '../../drivers/format/index.js';
import { formatOf as openedFormat, openImage, openProtocol } from '../../drivers/open.js';
import { protocolFor } from '../../drivers/protocol/index.js';
import { readOnlyOptions, readSecret } from './common.js';

export interface CreateCli {
  format: string;
  options: string[];
  backing?: string;
  backingFormat?: string;
  secret?: string;
  secretFile?: string;
  quiet?: boolean;
}

export async function createImage(spec: string, sizeText: string | undefined, o: CreateCli): Promise<void> {
  const driver = formatByName(o.format) as FormatDriver & Partial<Creatable>;
  if (!driver.create) throw new UsageError(`format '${o.format}' does not support image creation`);
  const options = new CreateOptions(o.options.flatMap((t) => parseOptionString(t)));
  if (o.backing !== undefined) options.set('backing_file', o.backing);
  if (o.backingFormat !== undefined) options.set('backing_fmt', o.backingFormat);
  let size = sizeText === undefined ? undefined : parseSize(sizeText, 'size');
  // qemu-img also takes the size as -o size=...
  const optSize = options.size('size');
  if (size === undefined) size = optSize;
  const secret = readSecret(o);
  const protocol = protocolFor(spec);
  if (!protocol.create) throw new UsageError(`${spec}: cannot create images on the ${protocol.name} protocol`);
  await protocol.create(spec);
  const made = [spec];
  const file = await openProtocol(spec, { readOnly: false, cache: 'writeback' });
  const extra: BlockNode[] = [];
  let ok = false;
  try {
    const req: CreateRequest = {
      spec,
      file,
      size,
      options,
      secret,
      resolve: (name) => protocol.resolveRelative(spec, name),
      createFile: async (name) => {
        const target = protocol.resolveRelative(spec, name);
        await protocol.create!(target);
        made.push(target);
        const node = await openProtocol(target, { readOnly: false, cache: 'writeback' });
        extra.push(node);
        return node;
      },
      openImage: async (name, format) => {
        const node = await openImage(protocol.resolveRelative(spec, name), readOnlyOptions({ format, forceShare: true }, { secret }));
        extra.push(node);
        return { node, format: openedFormat(node) ?? 'unknown' };
      },
    };
    await driver.create(req);
    ok = true;
  } finally {
    for (const n of extra) await n.close().catch(() => undefined);
    await file.close();
    // A failed create leaves nothing behind, as qemu-img's option checks do.
    if (!ok) for (const m of made) await protocol.remove?.(m).catch(() => undefined);
  }
  if (!o.quiet) {
    const opts = o.options.join(',');
    process.stdout.write(`Formatting '${spec}', fmt=${driver.name}${opts ? ` ${opts}` : ''}${size !== undefined ? ` size=${size}` : ''}\n`);
  }
}
