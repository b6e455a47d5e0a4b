#!/usr/bin/env node
// tsimg: make and inspect images, beside tsmount. Subcommands follow qemu-img's.
//   tsimg create [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] FILE [SIZE]
//   tsimg info [-f FMT] [--output human|json] FILE
import { Command } from 'commander';
import type { BlockNode, Creatable, CreateRequest, FormatDriver } from '../drivers/types.js';
import { messageOf, UsageError } from '../drivers/errors.js';
import { CreateOptions, parseOptionString, parseSize } from '../drivers/options.js';
import { formatByName } from '../drivers/format/index.js';
import { formatOf as openedFormat, openImage, openProtocol, type ImageOptions } from '../drivers/open.js';
import { protocolFor } from '../drivers/protocol/index.js';
import type { NamedFilePolicy } from '../drivers/trust.js';
import { readSecretFile } from './secret.js';

function fail(msg: string): never {
  process.stderr.write(`tsimg: ${msg}\n`);
  process.exit(1);
}

function readSecret(o: { secret?: string; secretFile?: string }): string | undefined {
  if (o.secretFile === undefined) return o.secret;
  return readSecretFile(o.secretFile);
}

const readOnlyOpen = (format?: string, secret?: string, namedFiles?: NamedFilePolicy): ImageOptions => ({
  readOnly: true,
  format,
  cache: 'writeback',
  metadataCacheBytes: 4 << 20,
  locking: 'auto',
  forceShare: true,
  shareRw: false,
  secret,
  namedFiles,
});

function namedFilePolicy(o: { confine?: boolean; trustImagePaths?: boolean }): NamedFilePolicy {
  if (o.confine && o.trustImagePaths) throw new UsageError('give --confine or --trust-image-paths, not both');
  return o.confine ? 'confine' : o.trustImagePaths ? 'trust' : 'owner';
}


interface CreateCli {
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
        const node = await openImage(protocol.resolveRelative(spec, name), readOnlyOpen(format, secret));
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

async function info(spec: string, o: { format?: string; output: string; secret?: string; secretFile?: string; confine?: boolean; trustImagePaths?: boolean }): Promise<void> {
  const node = await openImage(spec, readOnlyOpen(o.format, readSecret(o), namedFilePolicy(o)));
  try {
    const chain: { filename: string; format: string; 'virtual-size': number }[] = [];
    let cur: BlockNode | undefined = node;
    let name = spec;
    while (cur) {
      chain.push({ filename: name, format: openedFormat(cur) ?? 'unknown', 'virtual-size': cur.size });
      const next: BlockNode | undefined = cur.backing;
      if (next) name = next.name;
      cur = next;
    }
    if (o.output === 'json') process.stdout.write(`${JSON.stringify(chain.length === 1 ? chain[0] : chain, null, 2)}\n`);
    else for (const c of chain) process.stdout.write(`image: ${c.filename}\nfile format: ${c.format}\nvirtual size: ${c['virtual-size']}\n\n`);
  } finally {
    await node.close();
  }
}

async function main(argv: string[]): Promise<void> {
  const program = new Command('tsimg')
    .description('Create and inspect disk images (subcommands as in qemu-img)')
    .configureOutput({ outputError: (str, write) => write(`tsimg: ${str.replace(/^error: /, '').trim()}\n`) })
    .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 1));
  program
    .command('create')
    .description('create an image')
    .argument('<file>')
    .argument('[size]')
    .option('-f, --format <fmt>', 'image format', 'raw')
    .option('-o, --options <opts>', 'format options, key=value,...', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('-b, --backing <file>', 'backing file')
    .option('-F, --backing-format <fmt>', 'backing file format')
    .option('--secret <pass>', 'passphrase for encryption')
    .option('--secret-file <file>', 'read the passphrase from a file')
    .option('-q, --quiet', 'print nothing')
    .action(async (file: string, size: string | undefined, o: CreateCli & { options: string[] }) => createImage(file, size, o));
  program
    .command('info')
    .description('show an image and its backing chain')
    .argument('<file>')
    .option('-f, --format <fmt>', 'image format (probed when absent)')
    .option('--output <fmt>', 'human or json', 'human')
    .option('--secret <pass>', 'passphrase')
    .option('--secret-file <file>', 'read the passphrase from a file')
    .option('--confine', "open only files under the image's own folder that the image names")
    .option('--trust-image-paths', 'open every file an image names, as QEMU does (unsafe for images you did not write)')
    .action(async (file: string, o: { format?: string; output: string }) => info(file, o));
  await program.parseAsync(argv);
}

main(process.argv).catch((err: unknown) => {
  if (process.env.DEBUG) process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  fail(messageOf(err));
});
