// Removable media (CD-ROM and floppy drives) under the file protocol: whether a medium
// is in and how large it is, asked of the drive through ioctls, as QEMU's host_cdrom
// and host_floppy drivers do (CDROM_DRIVE_STATUS, CDROM_MEDIA_CHANGED; a floppy has
// neither, so its size, BLKGETSIZE64, says whether a disk is in). The node opens with
// no medium (size 0) and follows insertion, removal and a change of size; the ioctls
// are injected so the logic is tested without a drive.
import { constants as osc } from 'node:os';
import { blockDeviceSize, cdromDriveStatus, cdromMediaChanged, CDS_DISC_OK, CDS_NO_INFO } from '../util/sys.js';

const E = osc.errno;
/** Linux's ENOMEDIUM (Node's os.constants does not list it). */
export const ENOMEDIUM = 123;

/** The drive's ioctls, one function each (a fake in tests). */
export interface MediumIoctls {
  /** CDROM_DRIVE_STATUS: a CDS_* value, or -errno (-ENOTTY on a floppy). */
  driveStatus(fd: number): number;
  /** CDROM_MEDIA_CHANGED: 1 changed since the last call, 0 not, or -errno. */
  mediaChanged(fd: number): number;
  /** BLKGETSIZE64; throws without a medium. */
  size(fd: number): number;
}

export const realMediumIoctls: MediumIoctls = {
  driveStatus: cdromDriveStatus,
  mediaChanged: cdromMediaChanged,
  size: blockDeviceSize,
};

export type RemovableKind = 'cdrom' | 'floppy';

/** Block device majors of removable drives (Documentation/admin-guide/devices.txt). */
const MAJORS: Record<number, RemovableKind> = { 2: 'floppy', 11: 'cdrom' };

/** Which removable drive a block device is, from its device number; undefined for a disk. */
export function removableKind(rdev: number): RemovableKind | undefined {
  const major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & ~0xfff);
  return MAJORS[major];
}

/** How often the drive is asked again when the size is looked at (ms). */
export const MEDIUM_POLL_MS = 1000;

export class RemovableMedium {
  private present = false;
  private bytes = 0;
  private checkedAt = -Infinity;
  /** Bumped at every insertion, removal or change: data cached before it is stale. */
  generation = 0;

  constructor(
    private readonly fd: number,
    private readonly name: string,
    private readonly io: MediumIoctls,
    private readonly pollMs = MEDIUM_POLL_MS,
    private readonly log: (line: string) => void = (l) => process.stderr.write(`tsmount: ${l}\n`),
  ) {
    this.refresh(true);
  }

  /** The medium's size, 0 with none in; asks the drive again at most every pollMs. */
  get size(): number {
    if (Date.now() - this.checkedAt >= this.pollMs) this.refresh();
    return this.bytes;
  }

  get inserted(): boolean {
    if (Date.now() - this.checkedAt >= this.pollMs) this.refresh();
    return this.present;
  }

  /** Ask the drive now; returns true when something changed. */
  refresh(initial = false): boolean {
    this.checkedAt = Date.now();
    const status = this.io.driveStatus(this.fd);
    let size = 0;
    try {
      size = this.io.size(this.fd);
    } catch {
      size = 0;
    }
    // CDS_NO_INFO or no CD-ROM ioctls at all (a floppy): a readable size means a medium.
    const present = status === CDS_DISC_OK || ((status < 0 || status === CDS_NO_INFO) && size > 0);
    if (!present) size = 0;
    const swapped = this.io.mediaChanged(this.fd) === 1;
    const changed = present !== this.present || size !== this.bytes || (swapped && !initial);
    if (!changed) return false;
    if (!initial) {
      this.generation++;
      if (!present) this.log(`${this.name}: medium removed`);
      else if (!this.present) this.log(`${this.name}: medium inserted (${size} bytes)`);
      else this.log(`${this.name}: medium changed (${size} bytes)`);
    }
    this.present = present;
    this.bytes = size;
    return true;
  }

  /** The errno for a request at [offset, end) now, or 0 when the medium covers it. */
  check(end: number, generationAtStart: number): number {
    if (!this.present) return ENOMEDIUM;
    if (generationAtStart !== this.generation || end > this.bytes) return E.EIO;
    return 0;
  }
}
