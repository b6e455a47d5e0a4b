#!/usr/bin/env node
// tsimg: make and inspect images, beside tsmount. Subcommands follow qemu-img's.
//   tsimg create [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] FILE [SIZE]
//   tsimg info [-f FMT] [--output human|json] FILE
import { Command } from 'commander';
import type { BlockNode } from '../drivers/types.js';
import { messageOf, UsageError } from '../drivers/errors.js';
import { formatOf as openedFormat, openImage } from '../drivers/open.js';
import { createImage, readOnlyOpen, type CreateCli } from '../drivers/create.js';
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

function namedFilePolicy(o: { confine?: boolean; trustImagePaths?: boolean }): NamedFilePolicy {
  if (o.confine && o.trustImagePaths) throw new UsageError('give --confine or --trust-image-paths, not both');
  return o.confine ? 'confine' : o.trustImagePaths ? 'trust' : 'owner';
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
    .action(async (file: string, size: string | undefined, o: CreateCli & { secretFile?: string }) => createImage(file, size, { ...o, secret: readSecret(o) }));
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
