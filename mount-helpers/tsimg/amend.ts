// tsimg amend: change an image's options in place where the format allows it (qemu-img
// amend -o; qcow2: compat 0.10 to 1.1, lazy_refcounts, backing_file, backing_fmt).
import { UsageError } from '../../drivers/errors.js';
import { CreateOptions, parseOptionString } from '../../drivers/options.js';
import { formatOf, openImage } from '../../drivers/open.js';
import { writableOptions, type OpenCli } from './common.js';

export interface AmendCli extends OpenCli {
  options: string[];
}

export async function amend(spec: string, o: AmendCli): Promise<void> {
  if (o.options.length === 0) throw new UsageError('amend needs -o OPTIONS');
  const options = new CreateOptions(o.options.flatMap((t) => parseOptionString(t)));
  const node = await openImage(spec, writableOptions(o, { noBacking: true }));
  try {
    if (!node.amend) throw new UsageError(`${spec}: Format driver '${formatOf(node) ?? 'unknown'}' does not support option amendment`);
    await node.amend(options);
    await node.flush();
  } finally {
    await node.close();
  }
}
