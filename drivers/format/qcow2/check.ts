// qemu-img check for qcow2, read-only: count what every structure references
// (repair.ts's countReferences, the same walk the lazy-refcount repair uses) and
// hold it against the refcounts on disk (qemu's compare_refcounts), then the COPIED
// flags of the active tables (check_oflag_copied). Nothing is written.
import type { CheckReport } from '../../types.js';
import { CorruptImageError, messageOf } from '../../errors.js';
import { decodeRefcount } from './entries.js';
import { countReferences, type RepairInput } from './repair.js';

export async function checkQcow2(r: RepairInput, virtualSize: number): Promise<CheckReport> {
  const cs = 2 ** r.clusterBits;
  const report: CheckReport = { corruptions: 0, leaks: 0, checkErrors: 0, messages: [], totalClusters: Math.ceil(virtualSize / cs) };
  let refs;
  try {
    refs = await countReferences(r);
  } catch (err) {
    // A table pointing outside the file is corruption; anything else stopped the check.
    if (err instanceof CorruptImageError) report.corruptions++;
    else report.checkErrors++;
    report.messages.push(`ERROR ${messageOf(err)}`);
    return report;
  }
  report.corruptions += refs.reserved.count;
  report.messages.push(...refs.reserved.lines);
  const unlisted = refs.reserved.count - refs.reserved.lines.length;
  if (unlisted > 0) report.messages.push(`ERROR ${unlisted} more entries with reserved bits set`);
  for (const m of r.extraCorruptions ?? []) {
    report.corruptions++;
    report.messages.push(m);
  }
  const perBlock = (cs * 8) / 2 ** r.refcountOrder;
  const blockCache = new Map<number, Buffer>();
  const refcountOf = async (c: number): Promise<number> => {
    const off = refs.blocks[Math.floor(c / perBlock)];
    if (!off) return 0;
    let b = blockCache.get(off);
    if (!b) {
      b = Buffer.alloc(cs);
      await r.file.read(off, b);
      blockCache.set(off, b);
    }
    return decodeRefcount(b, r.refcountOrder, c % perBlock);
  };
  let end = 0;
  for (let c = 0; c < refs.tracked; c++) {
    const onDisk = await refcountOf(c);
    const used = refs.counts[c]!;
    if (onDisk > 0 || used > 0) end = c + 1;
    if (onDisk === used) continue;
    if (onDisk < used) {
      report.corruptions++;
      report.messages.push(`ERROR cluster ${c} refcount=${onDisk} reference=${used}`);
    } else {
      report.leaks++;
      report.messages.push(`Leaked cluster ${c} refcount=${onDisk} reference=${used}`);
    }
  }
  for (const e of refs.copied) {
    const rc = await refcountOf(Math.floor(e.host / cs));
    if ((rc === 1) !== e.copied) {
      report.corruptions++;
      report.messages.push(`ERROR OFLAG_COPIED ${e.what}: offset 0x${e.host.toString(16)} copied=${e.copied} refcount=${rc}`);
    }
  }
  report.allocatedClusters = refs.dataClusters;
  report.compressedClusters = refs.compressedClusters;
  report.fragmentedClusters = refs.fragmentedClusters;
  report.imageEndOffset = end * cs;
  return report;
}
