// QEMU's ways of naming an image by its options, for tsmount and tsimg alike:
// --image-opts (each IMAGE is driver=...,file.filename=...), a json:{...} name
// anywhere, and the --object definitions (secret, tls-creds) they refer to by id.
import { UsageError } from '../drivers/errors.js';
import type { ImageOptsSpec } from '../drivers/protocol/remote.js';

export interface ImageNameOptions {
  /** --image-opts: every name is an option list. */
  imageOpts?: boolean;
  /** --object definitions. */
  object?: string[];
}

/** Whether any name needs resolving (so plain names load none of the remote code). */
export function needsResolving(names: readonly string[], o: ImageNameOptions): boolean {
  return !!o.imageOpts || !!o.object?.length || names.some((n) => n.startsWith('json:'));
}

/**
 * Each name as an image name (a URI carrying its options) with its format, and the
 * passphrase a key-secret named; a plain name (without --image-opts) is kept with
 * `format` as its format.
 */
export async function resolveImageNames(names: readonly string[], format: string | undefined, o: ImageNameOptions): Promise<ImageOptsSpec[]> {
  const { imageOptsToSpec, jsonToSpec } = await import('../drivers/protocol/remote.js');
  const objects = (await import('../drivers/objects.js')).parseObjects(o.object ?? []);
  return names.map((n) => {
    if (!n.startsWith('json:') && !o.imageOpts) return { spec: n, format };
    const r = n.startsWith('json:') ? jsonToSpec(n, objects) : imageOptsToSpec(n, objects);
    // -f beside --image-opts must name the driver the options give, as qemu-img requires.
    if (format !== undefined && r.format !== format) throw new UsageError(`--image-opts: -f ${format} does not match driver=${r.format ?? '?'}`);
    return r;
  });
}

/** The one passphrase of several images: the key-secret they name (all the same) or `given`. */
export function oneSecret(resolved: readonly ImageOptsSpec[], given: string | undefined): string | undefined {
  const named = [...new Set(resolved.flatMap((r) => (r.secret === undefined ? [] : [r.secret])))];
  if (named.length > 1) throw new UsageError('--image-opts: the images name different secrets; give them one at a time');
  if (named.length && given !== undefined) throw new UsageError('give the passphrase by key-secret or by --secret/--secret-file, not both');
  return named[0] ?? given;
}
