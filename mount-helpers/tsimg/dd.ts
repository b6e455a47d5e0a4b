// tsimg dd: qemu-img dd's copy of a disk, bs-sized blocks from block `skip` on, into a
// new image of any writable format (-O, raw by default) made to fit. As qemu-img 7.2:
// `count` ends the copy at input block `count` (not `skip + count`, as dd(1) would), every
// byte is written (zeros too), and a `skip` past the end makes an empty image with a warning.
import { UsageError } from '../../drivers/errors.js';
import { openImage } from '../../drivers/open.js';
import { createImage } from '../../drivers/create.js';
import { parseSize } from '../../drivers/options.js';
import { protocolFor } from '../../drivers/protocol/index.js';
import { cvtnum, openForRead, readOnlyOptions, type OpenCli } from './common.js';

export interface DdCli extends OpenCli {
  outputFormat: string;
}

/** Bytes read and written at a time: a larger bs is copied in pieces (the same bytes where they would go). */
const PIECE = 4 << 20;
export async function dd(operands: string[], o: DdCli): Promise<void> {
  let bs = 512;
  let count: number | undefined;
  let skip: number | undefined;
  let input: string | undefined;
  let output: string | undefined;
  for (const op of operands) {
    const eq = op.indexOf('=');
    const [key, value] = eq < 0 ? [op, undefined] : [op.slice(0, eq), op.slice(eq + 1)];
    if (value === undefined || !['bs', 'count', 'if', 'of', 'skip'].includes(key)) throw new UsageError(`unrecognized operand ${eq < 0 ? op : key}`);
    if (key === 'bs') {
      let n: number | undefined;
      try {
        n = parseSize(value, 'bs');
      } catch {
        n = undefined;
      }
      if (n === undefined || n < 1 || n > 2147483647) throw new UsageError('Invalid bs specified. Must be between 1 and 2147483647.');
      bs = n;
    } else if (key === 'count') count = cvtnum('count', value);
    else if (key === 'skip') skip = cvtnum('skip', value);
    else if (key === 'if') input = value;
    else output = value;
  }
  if (input === undefined || output === undefined) throw new UsageError('Must specify both input and output files');
  const src = await openForRead(input, o);
  try {
    let size = src.size;
    if (count !== undefined && count * bs < size) size = count * bs;
    const start = (skip ?? 0) * bs;
    const past = start > size;
    await createImage(output, String(past ? 0 : size - start), { format: o.outputFormat, options: [], quiet: true });
    if (past) process.stderr.write(`tsimg: ${input}: cannot skip to specified offset\n`);
    if (past || size === start) return;
    let ok = false;
    try {
      const dst = await openImage(output, readOnlyOptions({ format: o.outputFormat }, { readOnly: false, cache: 'unsafe', noBacking: true, namedFiles: 'owner' }));
      try {
        const buf = Buffer.alloc(Math.min(bs, PIECE, size - start));
        for (let pos = start; pos < size; ) {
          const n = Math.min(buf.length, size - pos);
          await src.read(pos, buf.subarray(0, n));
          await dst.write(pos - start, buf.subarray(0, n));
          pos += n;
        }
        await dst.flush();
        ok = true;
      } finally {
        await dst.close();
      }
    } finally {
      if (!ok) await protocolFor(output).remove?.(output).catch(() => undefined);
    }
  } finally {
    await src.close();
  }
}
