// Creating an image: what `tsimg create` does, shared with tsmount --overlay and
// --snapshot, which create their qcow2 overlay the same way.
import type { BlockNode, CreateRequest, FileAttributes } from './types.js';
import { UsageError } from './errors.js';
import { CreateOptions, parseOptionString, parseSize } from './options.js';
import { formatByName } from './format/index.js';
import { formatOf as openedFormat, openImage, openProtocol, type ImageOptions } from './open.js';
import { hasOwnProtocol, protocolFor } from './protocol/index.js';
import type { NamedFilePolicy } from './trust.js';
import { parseObjects } from './objects.js';

/** How an image is opened to be looked at: read-only, shared with writers (qemu-img -U). */
export const readOnlyOpen = (format?: string, secret?: string, namedFiles?: NamedFilePolicy): ImageOptions => ({
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


export interface CreateCli {
  format: string;
  options: string[];
  backing?: string;
  backingFormat?: string;
  secret?: string;
  /** --object definitions: a secret the new image's key-secret names. */
  object?: string[];
  quiet?: boolean;
}

/** The option that names an encrypted format's passphrase (qemu-img's spelling). */
function keySecretOption(format: string): string | undefined {
  return format === 'luks' ? 'key-secret' : format === 'qcow2' || format === 'qcow' ? 'encrypt.key-secret' : undefined;
}

/** The value of that option among `options` (the last one given), if any. */
function keySecretValue(format: string, options: readonly string[]): string | undefined {
  const key = keySecretOption(format);
  return key === undefined ? undefined : options.flatMap((t) => parseOptionString(t)).filter(([k]) => k === key).pop()?.[1];
}

/**
 * A new image's passphrase. With --object, luks's key-secret=ID and qcow/qcow2's
 * encrypt.key-secret=ID name a secret object, as in qemu-img (an unknown id is
 * qemu-img's "No secret with id"); without any --object the value is the passphrase
 * itself (tsimg's shorthand). --secret/--secret-file give it instead, not as well as
 * an object.
 */
export function createSecret(spec: string, format: string, options: readonly string[], objects: readonly string[] | undefined, given: string | undefined): string | undefined {
  const named = keySecretValue(format, options);
  if (named === undefined) return given;
  if (!objects?.length) return given ?? named;
  const obj = parseObjects(objects).get(named);
  if (obj?.type !== 'secret') throw new UsageError(`${spec}: No secret with id '${named}'`);
  if (given !== undefined) throw new UsageError('give the passphrase by key-secret or by --secret/--secret-file, not both');
  return obj.data;
}

/**
 * The options as "Formatting ..." shows them. A key-secret that is the passphrase itself
 * (no --object: tsimg's shorthand) is shown as *** so the key does not reach a log; an
 * id (with --object) is shown, as qemu-img shows it.
 */
function shownOptions(format: string, options: readonly string[], literalSecret: boolean): string {
  if (!literalSecret || keySecretValue(format, options) === undefined) return options.join(',');
  const key = keySecretOption(format);
  return options
    .flatMap((t) => parseOptionString(t))
    .map(([k, v]) => `${k}=${k === key ? '***' : v.replace(/,/g, ',,')}`)
    .join(',');
}

export async function createImage(spec: string, sizeText: string | undefined, o: CreateCli): Promise<void> {
  const driver = await formatByName(o.format).load();
  if (!driver.create) throw new UsageError(`format '${o.format}' does not support image creation`);
  // -o help (or ?): the format's options, with their defaults, and nothing created.
  if (o.options.some((t) => t.split(',').some((k) => k === 'help' || k === '?'))) {
    const lines = (driver.createOptions ?? []).map((k) => `  ${k}${driver.createDefaults?.[k] !== undefined ? ` (default: ${driver.createDefaults[k]})` : ''}`);
    process.stdout.write(`Supported ${driver.name} options:\n${lines.join('\n')}\n`);
    return;
  }
  const options = new CreateOptions(o.options.flatMap((t) => parseOptionString(t)));
  const volumes = protocolFor(spec).createVolume;
  if (volumes && driver.name === 'raw') {
    // The protocol makes a sized volume (a Sheepdog VDI, sd_create): raw writes nothing.
    if (o.backingFormat !== undefined && o.backingFormat !== 'raw') throw new UsageError(`${spec}: the backing file of a ${protocolFor(spec).name} volume is raw, not ${o.backingFormat}`);
    const given = sizeText === undefined ? options.size('size') : parseSize(sizeText, 'size');
    options.finish('raw');
    const made = await volumes(spec, given, o.backing);
    if (!o.quiet) process.stdout.write(`Formatting '${spec}', fmt=raw size=${made}${o.backing ? ` backing_file=${o.backing}` : ''}\n`);
    return;
  }
  if (o.backing !== undefined) options.set('backing_file', o.backing);
  if (o.backingFormat !== undefined) options.set('backing_fmt', o.backingFormat);
  let size = sizeText === undefined ? undefined : parseSize(sizeText, 'size');
  // qemu-img also takes the size as -o size=...
  const optSize = options.size('size');
  if (size === undefined) size = optSize;
  const secret = createSecret(spec, driver.name, o.options, o.object, o.secret);
  const protocol = protocolFor(spec);
  if (!protocol.create) throw new UsageError(`${spec}: cannot create images on the ${protocol.name} protocol`);
  const attrs = fileAttributes(options, driver.createOptions ?? []);
  await protocol.create(spec, attrs);
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
      // A backing file named by a URI (nbd://...) is that URI, as openBacking takes it.
      resolve: (name) => (hasOwnProtocol(name) ? name : protocol.resolveRelative(spec, name)),
      createFile: async (name) => {
        const target = protocol.resolveRelative(spec, name);
        await protocol.create!(target, attrs);
        made.push(target);
        const node = await openProtocol(target, { readOnly: false, cache: 'writeback' });
        extra.push(node);
        return node;
      },
      openImage: async (name, format) => {
        const node = await openImage(req.resolve(name), readOnlyOpen(format, secret));
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
    const opts = shownOptions(driver.name, o.options, !o.object?.length);
    process.stdout.write(`Formatting '${spec}', fmt=${driver.name}${opts ? ` ${opts}` : ''}${size !== undefined ? ` size=${size}` : ''}\n`);
  }
}

/** The file protocol's extent size hint when none is given (QEMU's file-posix default). */
const DEFAULT_EXTENT_SIZE_HINT = 1 << 20;

/**
 * qemu-img create's protocol options, taken for any format (qemu-img passes them to the
 * file it creates, each extent or data file included): nocow, extent_size_hint, and
 * preallocation where the format has none of its own (a plain file cannot preallocate
 * metadata; the rest changes nothing a format then writes, as in QEMU).
 */
function fileAttributes(options: CreateOptions, formatOptions: readonly string[]): FileAttributes {
  const nocow = options.bool('nocow') ?? false;
  const hint = options.size('extent_size_hint');
  if (hint !== undefined && hint > 0xffffffff) throw new UsageError('Extent size hint is too large');
  if (!formatOptions.includes('preallocation')) {
    const p = options.choice('preallocation', ['off', 'metadata', 'falloc', 'full'] as const);
    if (p === 'metadata') throw new UsageError('Unsupported preallocation mode: metadata');
  }
  return { nocow, extentSizeHint: hint ?? DEFAULT_EXTENT_SIZE_HINT, hintGiven: hint !== undefined };
}
