// Who may read and write the flat files: their owner, group and mode, and the mount
// options that choose otherwise. Kept free of driver imports: the starting command
// parses these options too, before any server runs.
//
// The policy: a flat file belongs to the user who mounted it, group included (or
// --uid/--gid), and shows no more than the image file itself gives: the mode is the
// image file's (execute bits dropped, write bits only on a --rw mount), its group bits
// only what the image file gives the flat file's group (its other bits where the groups
// differ), and group and other bits no wider than those of every other file the image
// pulls in; an encrypted image's plaintext is owner-only.
// A remote image's flat file has mode 0600 (0400 read-only). Who gets
// past the mount at all is the kernel's business: without -o allow_other only the
// mounting user, and default_permissions is always on so the kernel checks the mode.
import { UsageError } from '../drivers/errors.js';

/** The parts of a stat(2) the policy looks at. */
export interface Ownership {
  uid: number;
  gid: number;
  /** Permission bits; file type bits are ignored. */
  mode: number;
}

/** A file the image reads from; `written`: the mount writes it too (an extent, a data file on --rw). */
export interface PulledFile extends Ownership {
  written?: boolean;
}

/** What the user chose instead of the image's own ownership (--uid, --gid, --umask). */
export interface AccessChoice {
  uid?: number;
  gid?: number;
  umask?: number;
}

/** tsmount's own mount options; the rest go to the FUSE layer. */
export interface MountAccess extends AccessChoice {
  /** Let other users through the mount (-o allow_other); the mode still applies. */
  allowOther: boolean;
  /** Let root through too, nobody else (-o allow_root, as libfuse); ignored with allowOther. */
  allowRoot?: boolean;
  /** Truncate may grow the disk (--growable, -o growable, -o resize). */
  growable: boolean;
}

const MAX_ID = 0xfffffffe;

function parseId(what: string, v: string | undefined): number {
  if (v === undefined || !/^\d+$/.test(v) || Number(v) > MAX_ID) throw new UsageError(`${what}: needs a numeric id, got '${v ?? ''}'`);
  return Number(v);
}

function parseUmask(what: string, v: string | undefined): number {
  if (v === undefined || !/^[0-7]{1,4}$/.test(v)) throw new UsageError(`${what}: needs an octal mask such as 022, got '${v ?? ''}'`);
  return parseInt(v, 8) & 0o777;
}

/**
 * Take tsmount's own options out of the -o list (uid=, gid=, umask=, allow_other,
 * allow_root, growable, resize) and merge them with --uid/--gid/--umask/--growable; the rest is
 * left for the FUSE layer. A value given both ways must agree.
 */
export function parseMountAccess(
  fuseOptions: string[],
  flags: { uid?: string; gid?: string; umask?: string; growable?: boolean },
): { access: MountAccess; rest: string[] } {
  const access: MountAccess = { allowOther: false, growable: !!flags.growable };
  const set = (key: 'uid' | 'gid' | 'umask', v: number, what: string): void => {
    if (access[key] !== undefined && access[key] !== v) throw new UsageError(`${what} conflicts with an earlier ${key}`);
    access[key] = v;
  };
  if (flags.uid !== undefined) set('uid', parseId('--uid', flags.uid), '--uid');
  if (flags.gid !== undefined) set('gid', parseId('--gid', flags.gid), '--gid');
  if (flags.umask !== undefined) set('umask', parseUmask('--umask', flags.umask), '--umask');
  const rest: string[] = [];
  for (const opt of fuseOptions) {
    const kept: string[] = [];
    for (const o of opt.split(',').filter(Boolean)) {
      const eq = o.indexOf('=');
      const key = eq < 0 ? o : o.slice(0, eq);
      const value = eq < 0 ? undefined : o.slice(eq + 1);
      if (key === 'uid') set('uid', parseId(`-o ${o}`, value), `-o ${o}`);
      else if (key === 'gid') set('gid', parseId(`-o ${o}`, value), `-o ${o}`);
      else if (key === 'umask') set('umask', parseUmask(`-o ${o}`, value), `-o ${o}`);
      else if (key === 'allow_other' && value === undefined) access.allowOther = true;
      else if (key === 'allow_root' && value === undefined) access.allowRoot = true;
      else if ((key === 'growable' || key === 'resize') && value === undefined) access.growable = true;
      else kept.push(o);
    }
    if (kept.length > 0) rest.push(kept.join(','));
  }
  return { access, rest };
}

const GROUP = 0o070;
const OTHER = 0o007;

/**
 * Group and other bits no wider than every file in `others` gives (backing files,
 * extents, a data file): whoever reads the flat file reads those files' bytes too.
 * A user of the flat file's group is in each file's group only when the gids match;
 * otherwise that user may fall under the file's group or its other bits, and only
 * what both give is safe. A file only read (a backing file) limits reading, not
 * writing. The owner's bits are left alone: that the image's owner may use the files
 * it names is checked where they are opened.
 */
export function intersectGroupOther(mode: number, gid: number, others: readonly PulledFile[]): number {
  let g = (mode & GROUP) >> 3;
  let o = mode & OTHER;
  for (const f of others) {
    const notWritten = f.written ? 0 : 0o2;
    const fg = ((f.mode & GROUP) >> 3) | notWritten;
    const fo = (f.mode & OTHER) | notWritten;
    if (f.gid === gid) {
      g &= fg;
      o &= fo;
    } else {
      g &= fg & fo;
      o &= fg & fo;
    }
  }
  return (mode & ~(GROUP | OTHER)) | (g << 3) | o;
}

/**
 * The permission bits of one flat file, as it shows while writable (getattr takes
 * the write bits away from files that are not). `image` is the image file's stat,
 * undefined for a remote image; `others`, the other files the image reads from;
 * `gid`, the flat file's group (the image file's when absent): the image file is one
 * more file its group bits are narrowed by, so a group the image does not name gets
 * no more than the image's other bits.
 * --umask replaces the image's mode, except that an encrypted image never shows more
 * than its own file (and its chain) gives.
 */
export function flatFileMode(image: Ownership | undefined, others: readonly PulledFile[], o: { writable: boolean; encrypted: boolean; umask?: number; gid?: number }): number {
  let derived = image ? intersectGroupOther(image.mode & 0o666, o.gid ?? image.gid, [{ ...image, written: true }, ...others]) : 0o600;
  if (o.encrypted && o.umask === undefined) derived &= 0o600;
  let mode = o.umask === undefined ? derived : 0o666 & ~o.umask & (o.encrypted ? derived : 0o666);
  if (!o.writable) mode &= ~0o222;
  return mode;
}

/** Owner, group and mode of one flat file: the mounting user's (or --uid/--gid's). */
export function flatFileOwnership(image: Ownership | undefined, others: readonly PulledFile[], o: { writable: boolean; encrypted: boolean; choice: AccessChoice }): Ownership {
  const gid = o.choice.gid ?? process.getgid?.() ?? 0;
  return {
    uid: o.choice.uid ?? process.getuid?.() ?? 0,
    gid,
    mode: flatFileMode(image, others, { writable: o.writable, encrypted: o.encrypted, umask: o.choice.umask, gid }),
  };
}

/**
 * The mount's root directory: the mounting user's (or --uid/--gid's), 0755 (0555
 * read-only); --umask applies to it too. Listing it shows only the file names.
 */
export function rootOwnership(choice: AccessChoice, writable: boolean): Ownership {
  let mode = choice.umask === undefined ? 0o755 : 0o777 & ~choice.umask;
  if (!writable) mode &= ~0o222;
  return { uid: choice.uid ?? process.getuid?.() ?? 0, gid: choice.gid ?? process.getgid?.() ?? 0, mode };
}
