// --secret-file, for tsmount and tsimg alike.
import fs from 'node:fs';
import { UsageError } from '../drivers/errors.js';

/**
 * The passphrase in `file`, every byte of it, as QEMU's `secret` object with `file=`
 * reads it (g_file_get_contents, nothing stripped): a file written by `echo pass`
 * holds "pass\n", and an image made by qemu-img from that file has "pass\n" as its
 * key. Use `printf %s pass` (or `echo -n`) for a key without the newline.
 */
export function readSecretFile(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    throw new UsageError(`${file}: cannot read the secret file`);
  }
}
