// Where everything lies on the virtual FAT disk. FAT12 and FAT16 take QEMU's layout
// exactly (block/vvfat.c vvfat_open, init_directories), so a guest that knew QEMU's
// disk sees the same one: a 504 MiB hard disk of 1024/16/63 (32 MiB for FAT12) with
// one bootable partition at sector 63, 8 KiB clusters, 512 root entries; floppies of
// 2.88 MB (1.44 MB with fat-type 12), no partition table. QEMU's FAT32 is a FAT16
// boot sector over a 32-bit FAT ("has not been tested"); here FAT32 is the real
// thing (Microsoft's FAT specification: 32 reserved sectors, FSInfo at 1, the backup
// boot sector at 6, the root directory a cluster chain from cluster 2), as large as
// the tree needs, never smaller than QEMU's disk.
import { UsageError } from '../../errors.js';
import type { FatType, VvfatSpec } from './spec.js';

export const SECTOR = 512;

export interface Layout {
  fatType: FatType;
  floppy: boolean;
  /** Sectors of the whole disk. */
  diskSectors: number;
  /** First sector of the file system (the partition; 0 on a floppy). */
  partStart: number;
  /** Sectors of the file system (the BPB's total). */
  partSectors: number;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  sectorsPerCluster: number;
  clusterBytes: number;
  reservedSectors: number;
  sectorsPerFat: number;
  /** Root directory entries of FAT12/16 (0 on FAT32). */
  rootEntries: number;
  /** Absolute sectors. */
  fatStart: number;
  rootStart: number;
  dataStart: number;
  /** Data clusters: numbers 2 .. clusterCount + 1. */
  clusterCount: number;
  /** The largest value a FAT entry holds (end of chain). */
  eoc: number;
}

/** FAT12 holds fewer clusters than this, FAT32 at least as many as FAT16's limit (FAT spec, "FAT type determination"). */
const FAT12_MAX = 4085;
const FAT16_MAX = 65525;
/** FAT32 entries are 28 bits; the top values are reserved. */
const FAT32_MAX = 0x0ffffff5;
/** A DOS partition table counts sectors in 32 bits. */
const MBR_MAX_SECTORS = 0xffffffff;
const QEMU_DISK_SECTORS = 1024 * 16 * 63;

/**
 * The layout for `spec`; `clustersNeeded(clusterBytes)` is what the tree takes (every
 * file and directory rounded up to whole clusters, the FAT32 root included).
 */
export function chooseLayout(spec: VvfatSpec, clustersNeeded: (clusterBytes: number) => number, name: string): Layout {
  const fatType: FatType = spec.fatType ?? (spec.floppy ? 12 : 16);
  let layout: Layout;
  if (fatType === 32) layout = fat32Layout(clustersNeeded, name);
  else {
    // QEMU: floppies of 80/2/36 (2.88 MB) or 80/2/18 (1.44 MB, fat-type 12 given);
    // hard disks of 1024/16/63, or 64/16/63 for FAT12; 16 sectors a cluster always.
    const [cyls, heads, secs] = spec.floppy ? [80, 2, spec.fatType === 12 ? 18 : 36] : [fatType === 12 ? 64 : 1024, 16, 63];
    layout = qemuLayout(fatType, spec.floppy, cyls, heads, secs);
    const need = clustersNeeded(layout.clusterBytes);
    if (need > layout.clusterCount) {
      const mb = ((layout.clusterCount * layout.clusterBytes) / 1e6).toFixed(2);
      throw new UsageError(`${name}: the directory does not fit in FAT${fatType} (${mb} MB of clusters)${spec.floppy ? '' : '; use fat:32: for a larger disk'}`);
    }
  }
  return layout;
}

function qemuLayout(fatType: 12 | 16, floppy: boolean, cyls: number, heads: number, secs: number): Layout {
  const diskSectors = cyls * heads * secs;
  const partStart = floppy ? 0 : 63;
  const partSectors = diskSectors - partStart;
  const spc = 16;
  // QEMU's formula (init_directories): sc = spf + 1 + spf * spc * (512 * 8 / fat_type).
  const i = 1 + Math.floor((spc * SECTOR * 8) / fatType);
  const spf = Math.floor((partSectors + i) / i);
  const rootEntries = 0x02 * 0x10 * spc;
  const fatStart = partStart + 1;
  const rootStart = fatStart + 2 * spf;
  const dataStart = rootStart + (rootEntries * 32) / SECTOR;
  const clusters = Math.floor((partStart + partSectors - dataStart) / spc);
  // The FAT must have an entry for each (QEMU's FAT16 floppy has room to spare).
  const entries = Math.floor((spf * SECTOR * 8) / fatType) - 2;
  return {
    fatType,
    floppy,
    diskSectors,
    partStart,
    partSectors,
    cylinders: cyls,
    heads,
    sectorsPerTrack: secs,
    sectorsPerCluster: spc,
    clusterBytes: spc * SECTOR,
    reservedSectors: 1,
    sectorsPerFat: spf,
    rootEntries,
    fatStart,
    rootStart,
    dataStart,
    clusterCount: Math.min(clusters, entries, fatType === 12 ? FAT12_MAX - 1 : FAT16_MAX - 1),
    eoc: fatType === 12 ? 0xfff : 0xffff,
  };
}

/** Microsoft's table of cluster sizes by volume size (FAT spec, "FAT32 BPB"), as sectors per cluster. */
const FAT32_CLUSTERS: [maxSectors: number, spc: number][] = [
  [16 * 2 ** 21, 8], // up to 8 GiB: 4 KiB
  [32 * 2 ** 21, 16], // up to 16 GiB: 8 KiB
  [64 * 2 ** 21, 32], // up to 32 GiB: 16 KiB
  [MBR_MAX_SECTORS, 64], // beyond: 32 KiB
];

function fat32Layout(clustersNeeded: (clusterBytes: number) => number, name: string): Layout {
  const heads = 16;
  const secs = 63;
  const reserved = 32;
  const partStart = 63;
  for (const [maxSectors, spc] of FAT32_CLUSTERS) {
    const need = clustersNeeded(spc * SECTOR);
    // Room to write into: a quarter more than the tree, and 256 MiB; free clusters cost nothing here.
    const dataSectors = Math.ceil(need * 1.25) * spc + (256 << 20) / SECTOR;
    const fatSectors = Math.ceil(((dataSectors / spc + 2) * 4) / SECTOR);
    const cylSectors = heads * secs;
    let diskSectors = Math.max(QEMU_DISK_SECTORS, partStart + reserved + 2 * fatSectors + dataSectors);
    diskSectors = Math.ceil(diskSectors / cylSectors) * cylSectors;
    if (diskSectors > maxSectors) continue;
    const partSectors = diskSectors - partStart;
    // Sectors per FAT for this size, then the clusters that fit beside two of them.
    const spf = Math.ceil(((Math.floor((partSectors - reserved) / spc) + 2) * 4) / SECTOR);
    const dataStart = partStart + reserved + 2 * spf;
    const clusterCount = Math.floor((partStart + partSectors - dataStart) / spc);
    if (clusterCount < need || clusterCount < FAT16_MAX || clusterCount > FAT32_MAX - 2) continue;
    return {
      fatType: 32,
      floppy: false,
      diskSectors,
      partStart,
      partSectors,
      cylinders: Math.floor(diskSectors / (heads * secs)),
      heads,
      sectorsPerTrack: secs,
      sectorsPerCluster: spc,
      clusterBytes: spc * SECTOR,
      reservedSectors: reserved,
      sectorsPerFat: spf,
      rootEntries: 0,
      fatStart: partStart + reserved,
      rootStart: dataStart,
      dataStart,
      clusterCount,
      eoc: 0x0fffffff,
    };
  }
  throw new UsageError(`${name}: the directory is too large for a FAT32 disk with a DOS partition table (2 TiB)`);
}
