// --overlay FILE and --snapshot: the mount writes into a qcow2 overlay whose backing
// file is the image, so the image itself is only ever read (whatever its format, even
// a read-only one or a remote source). The overlay is made as `tsimg create -f qcow2
// -b IMAGE -F FORMAT` makes it (drivers/create.ts), with the image's format recorded,
// and is an ordinary qcow2 any QEMU tool opens. --overlay keeps it (and reuses an
// existing one); --snapshot makes it in a private temporary folder that is removed when
// the server exits (QEMU's -snapshot).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UsageError } from '../drivers/errors.js';
import { createImage, readOnlyOpen } from '../drivers/create.js';
import { formatOf, openImage } from '../drivers/open.js';
import { fileProtocol, protocolFor } from '../drivers/protocol/index.js';
import type { NamedFilePolicy } from '../drivers/trust.js';

export interface OverlayOptions {
  overlay?: string;
  snapshot?: boolean;
  /** The images' format (-f); probed when absent. */
  format?: string;
  secret?: string;
  namedFiles?: NamedFilePolicy;
}

export interface Overlays {
  /** What to open instead of each image: its overlay. */
  specs: string[];
  /** Remove a temporary overlay now (also done when the process exits). */
  discard(): void;
}

/** How the overlay names its backing file: a local image by its absolute path, a URI as given. */
function backingName(image: string): string {
  return protocolFor(image) === fileProtocol ? path.resolve(image.replace(/^file:/, '')) : image;
}

function sameFile(a: string, b: string): boolean {
  try {
    const sa = fs.statSync(a);
    const sb = fs.statSync(b);
    return sa.dev === sb.dev && sa.ino === sb.ino;
  } catch {
    return false;
  }
}

/** Make (or find) the overlays; undefined when neither option was given. */
export async function prepareOverlays(images: string[], o: OverlayOptions): Promise<Overlays | undefined> {
  if (o.overlay === undefined && !o.snapshot) return undefined;
  if (o.overlay !== undefined && o.snapshot) throw new UsageError('give --overlay or --snapshot, not both');
  if (o.overlay !== undefined && images.length !== 1) throw new UsageError(`--overlay takes one image, ${images.length} given (--snapshot works with several)`);
  let tmp: string | undefined;
  const discard = (): void => {
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
    tmp = undefined;
  };
  process.once('exit', discard);
  try {
    if (o.snapshot) tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tsmount-snapshot-'));
    const specs: string[] = [];
    for (const [i, image] of images.entries()) {
      const overlay = tmp ? path.join(tmp, `${i}.qcow2`) : path.resolve(o.overlay!);
      const local = protocolFor(image) === fileProtocol ? image.replace(/^file:/, '') : undefined;
      if (local !== undefined && sameFile(local, overlay)) throw new UsageError(`${overlay}: the overlay cannot be the image itself`);
      if (!fs.existsSync(overlay)) await createOverlay(image, overlay, o);
      else await checkOverlayOf(image, overlay, o);
      specs.push(overlay);
    }
    return { specs, discard };
  } catch (err) {
    discard();
    throw err;
  }
}

/**
 * A reused overlay must be one of this image: writes through an overlay of another
 * image would show (and store) a disk that is neither. Local images are compared as
 * files; a remote one by the name the overlay records.
 */
async function checkOverlayOf(image: string, overlay: string, o: OverlayOptions): Promise<void> {
  const node = await openImage(overlay, readOnlyOpen('qcow2', o.secret, o.namedFiles));
  try {
    const below = node.backing?.name;
    const local = protocolFor(image) === fileProtocol;
    const same = below !== undefined && (local ? sameFile(image.replace(/^file:/, ''), below) : below === image);
    if (!same) throw new UsageError(`${overlay}: an overlay of ${below ?? 'no backing file'}, not of ${image}; give another overlay file`);
  } finally {
    await node.close();
  }
}

async function createOverlay(image: string, overlay: string, o: OverlayOptions): Promise<void> {
  let format = o.format;
  if (format === undefined) {
    const node = await openImage(image, readOnlyOpen(undefined, o.secret, o.namedFiles));
    try {
      format = formatOf(node) ?? 'raw';
    } finally {
      await node.close();
    }
  }
  await createImage(overlay, undefined, { format: 'qcow2', options: [], backing: backingName(image), backingFormat: format, secret: o.secret, quiet: true });
}
