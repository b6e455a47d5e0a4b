// The Parallels consistency check as QEMU 7.2's parallels_co_check reports it: the
// in-use mark of an image not closed correctly (a corruption), BAT entries past the
// end of the file (corruptions), and space past the last cluster in use (leaks,
// counted in clusters). Clusters two BAT entries share are named in a message but not
// counted, as QEMU 7.2 does not count them (so exit codes agree with qemu-img).
import type { BlockNode, CheckReport } from '../../types.js';
import { ClusterBitmap, MAX_BITMAP_CLUSTERS } from '../cluster-bitmap.js';
import { addCorruption, addMessage } from '../check-report.js';
import type { PagedTable } from '../table-pages.js';
import { HEADER_BYTES, INUSE_MAGIC, SECTOR, type ParallelsHeader } from './header.js';

export interface ParallelsCheck extends CheckReport {
  /** Where the data ends: past the last cluster in use, and never inside the header and BAT. */
  imageEnd: number;
  /** BAT entries whose cluster lies past the end of the file. */
  outside: number;
}

/** Where the data area starts, in bytes (parallels_open's data_end before any cluster). */
export function dataStart(h: ParallelsHeader): number {
  return h.dataOff !== 0 ? h.dataOff * SECTOR : Math.ceil((HEADER_BYTES + h.batEntries * 4) / SECTOR) * SECTOR;
}

/**
 * Scan the BAT once. `dropOutside` (a repair of corruptions) leaves entries past the
 * end of the file out of the counts and the image end, as QEMU's fix does.
 */
export async function parallelsCheck(file: BlockNode, h: ParallelsHeader, bat: PagedTable, dropOutside = false): Promise<ParallelsCheck> {
  const cs = h.tracks * SECTOR;
  const unit = (h.ext ? h.tracks : 1) * SECTOR;
  const size = file.size;
  const r: ParallelsCheck = {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    messages: [],
    totalClusters: h.batEntries,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    imageEnd: 0,
    outside: 0,
  };
  if (h.inuse === INUSE_MAGIC) addCorruption(r, 'ERROR image was not closed correctly');
  // Shared clusters are looked for where the file is small enough to track.
  const fileClusters = Math.ceil(size / cs);
  const owner = fileClusters <= MAX_BITMAP_CLUSTERS ? new ClusterBitmap(fileClusters) : undefined;
  let shared = 0;
  let highOff = -1;
  let prevOff = 0;
  await bat.scan((i, view, at) => {
    const off = view.getUint32(at, true) * unit;
    if (off === 0) {
      prevOff = 0;
      return;
    }
    // QEMU 7.2 tests the cluster's start only: one starting at the end of the file passes.
    if (off > size) {
      r.outside++;
      addCorruption(r, `ERROR cluster ${i} is outside image`);
      if (dropOutside) {
        prevOff = 0;
        return;
      }
    } else if (owner) {
      const first = Math.floor(off / cs);
      const n = Math.min(fileClusters, Math.ceil((off + cs) / cs)) - first;
      if (owner.mark(first, n) > 0) shared++;
    }
    r.allocatedClusters!++;
    if (off > highOff) highOff = off;
    if (prevOff !== 0 && prevOff + cs !== off) r.fragmentedClusters!++;
    prevOff = off;
  });
  if (shared) addMessage(r, `Warning: ${shared} BAT entries point at clusters another entry uses (not counted, as QEMU 7.2)`);
  r.imageEnd = Math.max(highOff >= 0 ? highOff + cs : 0, dataStart(h));
  r.imageEndOffset = r.imageEnd;
  if (size > r.imageEnd) {
    r.leaks = Math.ceil((size - r.imageEnd) / cs);
    addMessage(r, `ERROR space leaked at the end of the image ${size - r.imageEnd}`);
  }
  return r;
}
