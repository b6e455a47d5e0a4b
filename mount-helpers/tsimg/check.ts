// tsimg check: the format's own consistency check (BlockNode.checkMetadata), reported
// as qemu-img check reports it, with its exit codes: 0 clean, 1 not checked (an
// error, or a format with no check), 2 corruptions, 3 leaks only.
import type { CheckReport } from '../../drivers/types.js';
import { messageOf } from '../../drivers/errors.js';
import { formatOf, openImage } from '../../drivers/open.js';
import { ExitError, print, progress, qdictOrder, readOnlyOptions, writableOptions, type OpenCli } from './common.js';

export interface CheckCli extends OpenCli {
  output: string;
  /** -r leaks|all: repair, then check again. */
  repair?: string;
  progress?: boolean;
}

/** What a repair fixed (qemu-img's leaks_fixed, corruptions_fixed). */
export interface Fixed {
  leaks: number;
  corruptions: number;
}

/** qemu-img check --output json's object (ImageCheck), its keys in the order QEMU prints them (qdictOrder). */
export function checkJson(spec: string, format: string, r: CheckReport, fixed?: Fixed): Record<string, unknown> {
  return qdictOrder(checkFields(spec, format, r, fixed));
}

function checkFields(spec: string, format: string, r: CheckReport, fixed?: Fixed): Record<string, unknown> {
  const j: Record<string, unknown> = {};
  if (r.imageEndOffset !== undefined) j['image-end-offset'] = r.imageEndOffset;
  if (r.totalClusters !== undefined) j['total-clusters'] = r.totalClusters;
  if (r.corruptions) j.corruptions = r.corruptions;
  j['check-errors'] = r.checkErrors;
  if (r.leaks) j.leaks = r.leaks;
  if (fixed?.corruptions) j['corruptions-fixed'] = fixed.corruptions;
  if (fixed?.leaks) j['leaks-fixed'] = fixed.leaks;
  if (r.fragmentedClusters) j['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters) j['compressed-clusters'] = r.compressedClusters;
  if (r.allocatedClusters) j['allocated-clusters'] = r.allocatedClusters;
  j.filename = spec;
  j.format = format;
  return j;
}

function percent(n: number, of: number): string {
  return of ? ((100 * n) / of).toFixed(2) : '0.00';
}

/** qemu-img check's human report (dump_human_image_check). */
export function checkHuman(r: CheckReport): string {
  let out = '';
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) out += 'No errors were found on the image.\n';
  else {
    if (r.corruptions) out += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (r.leaks) out += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) out += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters && r.allocatedClusters) {
    const a = r.allocatedClusters;
    out += `${a}/${r.totalClusters} = ${percent(a, r.totalClusters)}% allocated, ${percent(r.fragmentedClusters ?? 0, a)}% fragmented, ${percent(r.compressedClusters ?? 0, a)}% compressed clusters\n`;
  }
  if (r.imageEndOffset !== undefined) out += `Image end offset: ${r.imageEndOffset}\n`;
  return out;
}

/** The exit code qemu-img check gives a report. */
export function checkExitCode(r: CheckReport): number {
  if (r.checkErrors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

/** The read-only check of one image: its format's report. */
async function runCheck(spec: string, o: CheckCli): Promise<{ format: string; report: CheckReport }> {
  let node;
  try {
    // The check reads this layer's metadata only: no backing file, no passphrase needed.
    node = await openImage(spec, readOnlyOptions(o, { noBacking: true, noIo: true }));
  } catch (err) {
    throw new ExitError(messageOf(err), 1);
  }
  try {
    const format = formatOf(node) ?? 'unknown';
    // qemu-img's status for it: 63 (its man page; 1 is a check that could not complete).
    if (!node.checkMetadata) throw new ExitError(`${spec}: this image format (${format}) does not support checks`, 63);
    return { format, report: await node.checkMetadata() };
  } finally {
    await node.close();
  }
}

/** -r: the writable open, the format's repair, closed before the image is checked again. */
async function runRepair(spec: string, o: CheckCli, mode: 'leaks' | 'all', format: string): Promise<Fixed | void> {
  let node;
  try {
    node = await openImage(spec, writableOptions(o, { noBacking: true, check: true }));
  } catch (err) {
    throw new ExitError(messageOf(err), 1);
  }
  try {
    if (!node.repairMetadata) throw new ExitError(`${spec}: this image format (${format}) does not support repairs`, 1);
    return await node.repairMetadata(mode);
  } finally {
    await node.close();
  }
}

export async function check(spec: string, o: CheckCli): Promise<number> {
  if (o.output !== 'json' && o.output !== 'human') throw new ExitError(`--output must be human or json, not '${o.output}'`, 1);
  if (o.repair !== undefined && o.repair !== 'leaks' && o.repair !== 'all') throw new ExitError(`-r must be leaks or all, not '${o.repair}'`, 1);
  const first = await runCheck(spec, o);
  let r = first.report;
  // The per-problem lines go to stderr, as qemu-img's do.
  for (const m of r.messages) process.stderr.write(`${m}\n`);
  let fixed: Fixed | undefined;
  const needs = r.repairAlways || (o.repair === 'all' ? r.leaks + r.corruptions > 0 : o.repair === 'leaks' && r.leaks > 0);
  if (o.repair !== undefined && needs && r.checkErrors === 0) {
    const show = o.output === 'human' ? progress(o.progress) : undefined;
    const counted = await runRepair(spec, o, o.repair, first.format);
    show?.done();
    const again = (await runCheck(spec, o)).report;
    fixed = counted ?? { leaks: Math.max(0, r.leaks - again.leaks), corruptions: Math.max(0, r.corruptions - again.corruptions) };
    if (o.output === 'human' && fixed.leaks + fixed.corruptions > 0) {
      print(`The following inconsistencies were found and repaired:\n\n    ${fixed.leaks} leaked clusters\n    ${fixed.corruptions} corruptions\n\nDouble checking the fixed image now...\n`);
    }
    r = again;
  }
  print(o.output === 'json' ? `${JSON.stringify(checkJson(spec, first.format, r, fixed), null, 4)}\n` : checkHuman(r));
  return checkExitCode(r);
}
