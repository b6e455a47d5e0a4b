// QEMU-compatible image locking (shared/DESIGN.md, "Locking"). Placeholder API; the
// implementation follows QEMU's file-posix.c raw_apply_lock_bytes/raw_check_lock_bytes.

/** QEMU's BlockPermission bits (include/block/block-common.h). */
export const PERM_CONSISTENT_READ = 0x01;
export const PERM_WRITE = 0x02;
export const PERM_WRITE_UNCHANGED = 0x04;
export const PERM_RESIZE = 0x08;
export const PERM_ALL = 0x0f;

export interface LockRequest {
  /** Permissions we take (bytes 100+i). */
  perm: number;
  /** Permissions we let others take; the rest are refused (bytes 200+i). */
  shared: number;
  /** 'on': OFD locks, POSIX with a warning where missing; 'auto': also silently skip where no lock works. */
  mode: 'on' | 'auto';
}

export class ImageLock {
  private constructor(readonly fd: number, readonly name: string) {}
  static acquire(fd: number, name: string, _req: LockRequest): ImageLock {
    return new ImageLock(fd, name);
  }
  release(): void {}
}

export type LockingMode = 'on' | 'off' | 'auto';

export interface LockPolicy {
  readOnly: boolean;
  /** A backing file: held for consistent read, refusing writers. */
  backing: boolean;
  forceShare: boolean;
  shareRw: boolean;
  mode: 'on' | 'auto';
}

/** The permissions QEMU would take and share for such an open. */
export function lockRequestFor(p: LockPolicy): LockRequest {
  if (p.readOnly) {
    return { perm: PERM_CONSISTENT_READ, shared: p.forceShare ? PERM_ALL : PERM_ALL & ~(PERM_WRITE | PERM_RESIZE), mode: p.mode };
  }
  const shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | (p.shareRw ? PERM_WRITE : 0);
  return { perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared, mode: p.mode };
}
