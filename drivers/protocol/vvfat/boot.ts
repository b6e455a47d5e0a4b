// The sectors before the FAT: the MBR of a hard disk (QEMU's init_mbr) and the boot
// sector of the file system (QEMU's init_directories; the FAT32 BPB, FSInfo and
// backup boot sector from Microsoft's FAT specification).
import { SECTOR, type Layout } from './layout.js';

/** QEMU's volume serial number and its MBR's NT disk signature. */
const VOLUME_ID = 0xfabe1afd;
const NT_DISK_ID = 0xbe1afdfa;
const OEM_NAME = 'MSWIN4.1';

/** BPB offsets (FAT spec, "Boot Sector and BPB Structure"). */
const BPB = {
  jump: 0, oem: 3, bytesPerSector: 11, sectorsPerCluster: 13, reserved: 14, fats: 16, rootEntries: 17, totalSectors16: 19,
  media: 21, fatSize16: 22, sectorsPerTrack: 24, heads: 26, hidden: 28, totalSectors32: 32,
  // FAT12/16 from here:
  drive16: 36, bootSig16: 38, volumeId16: 39, label16: 43, fsType16: 54,
  // FAT32 from here:
  fatSize32: 36, extFlags: 40, fsVersion: 42, rootCluster: 44, fsInfo: 48, backupBoot: 50,
  drive32: 64, bootSig32: 66, volumeId32: 67, label32: 71, fsType32: 82,
} as const;

/** FSInfo offsets and signatures. */
const FSINFO = { lead: 0, struct: 484, free: 488, next: 492, trail: 508 } as const;

export const mediaOf = (l: Layout): number => (l.floppy ? 0xf0 : 0xf8);

/** The bytes of [0, fatStart): MBR, gap, reserved sectors. */
export function renderHead(l: Layout, label: Buffer, freeClusters: number, nextFree: number): Buffer {
  const head = Buffer.alloc(l.fatStart * SECTOR);
  if (!l.floppy) writeMbr(head, l);
  const boot = head.subarray(l.partStart * SECTOR, (l.partStart + 1) * SECTOR);
  writeBootSector(boot, l, label);
  if (l.fatType === 32) {
    const info = head.subarray((l.partStart + 1) * SECTOR, (l.partStart + 2) * SECTOR);
    info.writeUInt32LE(0x41615252, FSINFO.lead);
    info.writeUInt32LE(0x61417272, FSINFO.struct);
    info.writeUInt32LE(freeClusters, FSINFO.free);
    info.writeUInt32LE(nextFree, FSINFO.next);
    info.writeUInt32LE(0xaa550000, FSINFO.trail);
    boot.copy(head, (l.partStart + 6) * SECTOR);
    info.copy(head, (l.partStart + 7) * SECTOR);
  }
  return head;
}

function writeBootSector(b: Buffer, l: Layout, label: Buffer): void {
  const fat32 = l.fatType === 32;
  b.set([0xeb, fat32 ? 0x58 : 0x3e, 0x90], BPB.jump);
  b.write(OEM_NAME, BPB.oem, 'latin1');
  b.writeUInt16LE(SECTOR, BPB.bytesPerSector);
  b[BPB.sectorsPerCluster] = l.sectorsPerCluster;
  b.writeUInt16LE(l.reservedSectors, BPB.reserved);
  b[BPB.fats] = 2;
  b.writeUInt16LE(l.rootEntries, BPB.rootEntries);
  b.writeUInt16LE(l.partSectors > 0xffff || fat32 ? 0 : l.partSectors, BPB.totalSectors16);
  b[BPB.media] = mediaOf(l);
  b.writeUInt16LE(fat32 ? 0 : l.sectorsPerFat, BPB.fatSize16);
  b.writeUInt16LE(l.sectorsPerTrack, BPB.sectorsPerTrack);
  b.writeUInt16LE(l.heads, BPB.heads);
  b.writeUInt32LE(l.partStart, BPB.hidden);
  b.writeUInt32LE(l.partSectors > 0xffff || fat32 ? l.partSectors : 0, BPB.totalSectors32);
  const drive = l.floppy ? 0 : 0x80;
  if (fat32) {
    b.writeUInt32LE(l.sectorsPerFat, BPB.fatSize32);
    b.writeUInt32LE(2, BPB.rootCluster);
    b.writeUInt16LE(1, BPB.fsInfo);
    b.writeUInt16LE(6, BPB.backupBoot);
    b[BPB.drive32] = drive;
    b[BPB.bootSig32] = 0x29;
    b.writeUInt32LE(VOLUME_ID, BPB.volumeId32);
    label.copy(b, BPB.label32, 0, 11);
    b.write('FAT32   ', BPB.fsType32, 'latin1');
  } else {
    b[BPB.drive16] = drive;
    b[BPB.bootSig16] = 0x29;
    b.writeUInt32LE(VOLUME_ID, BPB.volumeId16);
    label.copy(b, BPB.label16, 0, 11);
    b.write(l.fatType === 12 ? 'FAT12   ' : 'FAT16   ', BPB.fsType16, 'latin1');
  }
  b[510] = 0x55;
  b[511] = 0xaa;
}

/** QEMU's sector2CHS: a position past the geometry is 0xff everywhere, and the partition then counts as LBA. */
function chs(dst: Buffer, at: number, sector: number, l: Layout): boolean {
  const s = sector % l.sectorsPerTrack;
  const rest = Math.floor(sector / l.sectorsPerTrack);
  const head = rest % l.heads;
  const cyl = Math.floor(rest / l.heads);
  if (cyl >= l.cylinders || cyl > 1023) {
    dst.set([0xff, 0xff, 0xff], at);
    return true;
  }
  dst.set([head, (s + 1) | ((cyl >> 8) << 6), cyl & 0xff], at);
  return false;
}

function writeMbr(b: Buffer, l: Layout): void {
  b.writeUInt32LE(NT_DISK_ID, 0x1b8);
  const p = 0x1be;
  b[p] = 0x80; // bootable
  let lba = chs(b, p + 1, l.partStart, l);
  lba = chs(b, p + 5, l.diskSectors - 1, l) || lba;
  // QEMU: 0x01 FAT12; 0x06/0x0e FAT16 (CHS/LBA); 0x0b/0x0c FAT32 (CHS/LBA).
  b[p + 4] = l.fatType === 12 ? 0x01 : l.fatType === 16 ? (lba ? 0x0e : 0x06) : lba ? 0x0c : 0x0b;
  b.writeUInt32LE(l.partStart, p + 8);
  b.writeUInt32LE(l.diskSectors - l.partStart, p + 12);
  b[510] = 0x55;
  b[511] = 0xaa;
}
