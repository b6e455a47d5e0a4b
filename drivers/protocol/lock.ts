// QEMU-compatible image locking (shared/DESIGN.md, "Locking"), after QEMU 7.2
// block/file-posix.c: raw_apply_lock_bytes, raw_check_lock_bytes, raw_handle_perm_lock.
//
// Permission i (include/block/block-common.h: 0 consistent read, 1 write, 2 write
// unchanged, 3 resize) is held as a shared (F_RDLCK) lock on byte 100+i; refusing to
// share it, as a shared lock on byte 200+i. Nobody takes an exclusive lock: conflicts
// are found by asking F_OFD_GETLK whether an F_WRLCK would be refused, i.e. whether
// anyone else holds the byte at all. QEMU 6.1 and older also used bytes 104/204
// ("change children"); 7.2 neither takes nor checks them, and neither do we.
//
// What QEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18) holds, seen in /proc/locks (and with
// strace for the short-lived qemu-img), for a qcow2 overlay on a qcow2 backing file
// and for a raw file:
//
//   holder                                           image (top)            backing
//   qemu-img info IMG                                201 203 (1)            not opened
//   qemu-img info --backing-chain IMG                201 203 (1)            201 203 (1)
//   qemu-img info -U IMG                             none                   not opened
//   qemu-io -r IMG                                   100 201 203            100 201 203
//   qemu-io IMG (read-write)                         100 101 103 201 203    100 201 203
//   qemu-io -U -r IMG                                100                    100
//   qemu-storage-daemon file+qcow2, fuse export,     100 101 103 201 203    100 201 203
//     writable=on (same with writable=off: --blockdev nodes are read-write)
//   qemu-io -f raw RAW (read-write)                  100 101
//   qemu-io -f raw -r RAW                            100
//   qemu-storage-daemon file(+raw), fuse writable    100 101 103
//
//   (1) no I/O, so no consistent read; it checks 101 and 103 (nobody may hold write or
//       resize), then drops its bytes when it closes.
//
// So a format that maps guest data (qcow2, ...) always refuses write and resize on its
// file and takes resize when writable (block.c bdrv_default_perms_for_storage); qemu-img
// shares only consistent read and write-unchanged (BDRV_O_NO_SHARE); qemu-io and exports
// share everything at the top, so over raw they refuse nothing; -U shares everything and
// is refused for read-write opens ("force-share=on can only be used with read-only
// images"). Backing files are held like read-only images: 100 201 203.
import { constants } from 'node:os';
import { IoError, LockedError, SysError, UsageError } from '../errors.js';
import { F_RDLCK, F_UNLCK, F_WRLCK, hasOfdLocks, setByteLock, testByteLock, type LockFlavour } from '../util/sys.js';

/** QEMU's BlockPermission bits (include/block/block-common.h). */
export const PERM_CONSISTENT_READ = 0x01;
export const PERM_WRITE = 0x02;
export const PERM_WRITE_UNCHANGED = 0x04;
export const PERM_RESIZE = 0x08;
export const PERM_ALL = 0x0f;

/** bdrv_perm_names(), one bit at a time: the words in QEMU's lock errors. */
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;

/** RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE; libvirt uses byte 0. */
export const LOCK_PERM_BASE = 100;
export const LOCK_SHARED_BASE = 200;

export type { LockFlavour };

export interface LockRequest {
  /** Permissions we take (bytes 100+i). */
  perm: number;
  /** Permissions we let others take; the rest are refused (bytes 200+i). */
  shared: number;
  /** 'on': OFD locks, POSIX with a warning where missing; 'auto': OFD locks or none. */
  mode: 'on' | 'auto';
}

/** The bytes a request holds, for comparing with /proc/locks. */
export function lockBytesFor(req: Pick<LockRequest, 'perm' | 'shared'>): number[] {
  const out: number[] = [];
  for (let i = 0; i < PERM_NAMES.length; i++) if (req.perm & (1 << i)) out.push(LOCK_PERM_BASE + i);
  for (let i = 0; i < PERM_NAMES.length; i++) if (!(req.shared & (1 << i))) out.push(LOCK_SHARED_BASE + i);
  return out;
}

/**
 * What the process can do about locks. Whether OFD locks exist is a property of the
 * kernel and the fallback warning is said once per process, so the real host is one
 * object for the process; tests make their own to force the POSIX path.
 */
export interface LockHost {
  hasOfd(fd: number): boolean;
  /** Said once per host, the first time a lock falls back to POSIX locks. */
  warnPosixFallback(): void;
}

/** QEMU's words (file-posix.c raw_open_common, locking=on without OFD). */
export const POSIX_FALLBACK_WARNING =
  'warning: File lock requested but OFD locking syscall is unavailable, falling back to POSIX file locks\n' +
  'Due to the implementation, locks can be lost unexpectedly.\n';

export function createLockHost(opts: { ofd?: boolean; warn?: (text: string) => void } = {}): LockHost {
  let ofd = opts.ofd;
  let warned = false;
  const warn = opts.warn ?? ((text: string) => process.stderr.write(`tsmount: ${text}`));
  return {
    hasOfd(fd: number): boolean {
      ofd ??= hasOfdLocks(fd);
      return ofd;
    },
    warnPosixFallback(): void {
      if (warned) return;
      warned = true;
      warn(POSIX_FALLBACK_WARNING);
    },
  };
}

/** The host every open of this process shares. */
export const processLockHost: LockHost = createLockHost();

function errnoName(e: number): string {
  const hit = Object.entries(constants.errno).find(([, v]) => v === e);
  return hit ? hit[0] : `errno ${e}`;
}

const HINT = '(is another process using the image?)';

/**
 * The locks on one open file description. QEMU's protocol: to change permissions,
 * first add every byte the old and the new state need, then check the new state
 * against everyone else, then drop what only the old state needed; on a failed check,
 * go back to the old bytes. Two openers racing both see each other's bytes, so at
 * worst both fail; and we never hold the image with fewer bytes than we use.
 */
export class ImageLock {
  /** Permissions currently granted (QEMU's s->perm / s->shared_perm). */
  private perm = 0;
  private shared = PERM_ALL;
  /** Bytes currently locked, as permission masks (s->locked_perm / locked_shared_perm). */
  private lockedPerm = 0;
  private lockedUnshared = 0;

  private constructor(
    readonly fd: number,
    readonly name: string,
    /** undefined: locking=auto on a kernel without OFD locks, so nothing is locked. */
    readonly flavour: LockFlavour | undefined,
  ) {}

  /** Lock `fd` as `req` asks; throws LockedError if another user's locks conflict. */
  static acquire(fd: number, name: string, req: LockRequest, host: LockHost = processLockHost): ImageLock {
    let flavour: LockFlavour | undefined = 'ofd';
    if (!host.hasOfd(fd)) {
      if (req.mode === 'on') {
        // POSIX locks belong to the process, not the fd: two opens of one file in this
        // process do not see each other, and closing any fd of the file drops them all.
        // QEMU and other processes still see them (and OFD locks conflict with them).
        host.warnPosixFallback();
        flavour = 'posix';
      } else {
        flavour = undefined;
      }
    }
    const lock = new ImageLock(fd, name, flavour);
    lock.update(req);
    return lock;
  }

  /** What this lock grants now. */
  get current(): { perm: number; shared: number } {
    return { perm: this.perm, shared: this.shared };
  }

  /**
   * Change the permissions held (e.g. when a node is reopened read-write, or the format
   * turns out not to be raw). Atomic from the outside: on LockedError the old
   * permissions are still held.
   */
  update(req: Pick<LockRequest, 'perm' | 'shared'>): void {
    if (this.flavour === undefined) return;
    const { perm, shared } = req;
    const onlyDropping = (this.perm | perm) === this.perm && (this.shared & shared) === this.shared;
    if (!onlyDropping) {
      try {
        this.apply(this.perm | perm, ~this.shared | ~shared, false);
        this.check(perm, shared);
      } catch (err) {
        this.undo();
        throw err;
      }
    }
    this.apply(perm, ~shared, true);
    this.perm = perm;
    this.shared = shared;
  }

  /**
   * Drop every byte. Never throws: unlocking cannot conflict, and the caller is about
   * to close the fd, which drops whatever the kernel failed to unlock.
   */
  release(): void {
    if (this.flavour === undefined) return;
    try {
      this.apply(0, 0, true);
    } catch {
      /* see above */
    }
    this.perm = 0;
    this.shared = PERM_ALL;
  }

  /** Back to the bytes of the permissions still granted (RAW_PL_ABORT). */
  private undo(): void {
    try {
      this.apply(this.perm, ~this.shared, true);
    } catch {
      /* only unlocking: the error that brought us here is the one to report */
    }
  }

  /** raw_apply_lock_bytes: lock the missing bytes, and with `unlock` drop the others. */
  private apply(perm: number, unshared: number, unlock: boolean): void {
    this.lockedPerm = this.applyRow(LOCK_PERM_BASE, this.lockedPerm, perm, unlock);
    this.lockedUnshared = this.applyRow(LOCK_SHARED_BASE, this.lockedUnshared, unshared, unlock);
  }

  /** One row of bytes (100+i or 200+i); returns the mask now locked. */
  private applyRow(base: number, locked: number, want: number, unlock: boolean): number {
    for (let i = 0; i < PERM_NAMES.length; i++) {
      const bit = 1 << i;
      try {
        if (want & bit && !(locked & bit)) {
          this.setByte(base + i, F_RDLCK);
          locked |= bit;
        } else if (unlock && locked & bit && !(want & bit)) {
          this.setByte(base + i, F_UNLCK);
          locked &= ~bit;
        }
      } catch (err) {
        // Keep the record of what is locked true for the caller's undo.
        if (base === LOCK_PERM_BASE) this.lockedPerm = locked;
        else this.lockedUnshared = locked;
        throw err;
      }
    }
    return locked;
  }

  private setByte(off: number, type: number): void {
    if (this.flavour === undefined) return;
    const verb = type === F_UNLCK ? 'unlock' : 'lock';
    let ok: boolean;
    try {
      ok = setByteLock(this.fd, this.flavour, off, type);
    } catch (err) {
      if (err instanceof SysError) {
        throw new IoError(`${this.name}: Failed to ${verb} byte ${off}: ${errnoName(err.errno)}`, err.errno);
      }
      throw err;
    }
    // Only a write lock of someone else's blocks a read lock: not QEMU's doing.
    if (!ok) throw new LockedError(`${this.name}: Failed to ${verb} byte ${off} ${HINT}`);
  }

  /** raw_check_lock_bytes: our permissions against others' 200+i, our refusals against others' 100+i. */
  private check(perm: number, shared: number): void {
    for (let i = 0; i < PERM_NAMES.length; i++) {
      if (perm & (1 << i) && this.taken(LOCK_SHARED_BASE + i)) {
        throw new LockedError(`${this.name}: Failed to get "${PERM_NAMES[i]}" lock ${HINT}`);
      }
    }
    for (let i = 0; i < PERM_NAMES.length; i++) {
      if (!(shared & (1 << i)) && this.taken(LOCK_PERM_BASE + i)) {
        throw new LockedError(`${this.name}: Failed to get shared "${PERM_NAMES[i]}" lock ${HINT}`);
      }
    }
  }

  /** qemu_lock_fd_test(exclusive): does anyone else hold this byte at all? */
  private taken(off: number): boolean {
    if (this.flavour === undefined) return false;
    try {
      return testByteLock(this.fd, this.flavour, off, F_WRLCK);
    } catch (err) {
      if (err instanceof SysError) {
        throw new IoError(`${this.name}: Failed to test byte ${off}: ${errnoName(err.errno)}`, err.errno);
      }
      throw err;
    }
  }
}

export type LockingMode = 'on' | 'off' | 'auto';

export interface LockPolicy {
  readOnly: boolean;
  /** A backing file: held for consistent read, refusing writers. */
  backing: boolean;
  forceShare: boolean;
  shareRw: boolean;
  mode: 'on' | 'auto';
  /**
   * The format driver on top of this file, if known. Only raw passes guest writes
   * straight through, so only raw lets `shareRw` reach the file; undefined (still to
   * be probed) is taken as raw, and the caller tightens the lock once it knows.
   */
  format?: string;
  /**
   * QEMU's preallocate filter sits on the file: writable, it takes write and resize
   * for itself alone (preallocate_child_perm), whatever share-rw asks.
   */
  preallocate?: boolean;
}

/**
 * The permissions QEMU takes and shares on the file for such an open: qemu-img's
 * (BDRV_O_NO_SHARE) for plain opens, qemu-img -U for forceShare, a share-rw=on device
 * over raw for shareRw; see the table at the top.
 */
export function lockRequestFor(p: LockPolicy): LockRequest {
  const readOnly = p.readOnly || p.backing;
  if (p.forceShare) {
    if (!readOnly) throw new UsageError('--force-share can only be used with read-only images');
    return { perm: PERM_CONSISTENT_READ, shared: PERM_ALL, mode: p.mode };
  }
  const perm = readOnly ? PERM_CONSISTENT_READ : PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE;
  let shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
  // A share-rw=on device over raw shares write and, being resizable, resize; any other
  // format still refuses both on its file (bdrv_default_perms_for_storage).
  const passthrough = p.format === undefined || p.format === 'raw';
  if (p.shareRw && !p.backing && passthrough && !(p.preallocate && !readOnly)) shared |= PERM_WRITE | PERM_RESIZE;
  return { perm, shared, mode: p.mode };
}
