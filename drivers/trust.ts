// Which files an image may pull in (issue 12, "Files an image names"). A backing file,
// a VMDK extent or a qcow2 data file is named inside the image, by whoever wrote the
// image; QEMU opens whatever it names. When root mounts a user's image, following such
// a name blindly exposes (or, with --rw, overwrites) files that user could never touch:
// `RW 1 FLAT "/etc/shadow" 0`. So every local file an image names is checked here,
// once, before it is opened, against the image the user gave (the top of the chain).
//
// Policies:
//   owner   (default) the named file must be readable (writable, when it will be
//           written) by the owner of the top image file, and every folder above it
//           searchable by that owner. Backing chains commonly live in other folders
//           (libvirt's base images in a pool, a golden image shared by many overlays),
//           so confining them would break ordinary setups; checking the owner closes
//           the privilege hole without that: an image gives nobody more than its
//           owner already has. An image its group or everyone may write could have
//           been written by any of them: what it names must then be open to that
//           group (or to everyone) as well as to the owner.
//   confine (--confine) the owner check, and the file must also lie under the top
//           image's own folder, after resolving symbolic links and `..`.
//   trust   (--trust-image-paths) no checks, as QEMU behaves; only for images whose
//           every byte you trust.
// Remote files (nbd, ssh) are not checked: they are reached with the mount's own
// credentials on another host, and a name in a remote image resolves on its protocol.
import fs from 'node:fs';
import path from 'node:path';
import type { BlockNode } from './types.js';
import { UntrustedFileError } from './errors.js';
import { FileNode } from './protocol/file.js';

export type NamedFilePolicy = 'owner' | 'confine' | 'trust';

/** One file an image named, as it was opened. */
export interface NamedFile {
  /** The path opened (resolved against the naming image). */
  path: string;
  /** The opened file's own stat (fstat of the descriptor). */
  stat: fs.Stats;
  /** Opened for writing (an extent or data file of a --rw mount). */
  write: boolean;
}

/** What names a file: for the message and the check. */
export interface NamedRequest {
  /** The image that names it, as given or resolved (a backing file names its own). */
  naming: string;
  /** 'backing file', 'extent', 'data file'. */
  role: string;
  /** The name as written in the image. */
  name: string;
  /** The name resolved to a local path (without file:). */
  resolved: string;
  write: boolean;
}

/** Who the check is made for: the top image's owner and their groups. */
interface Principal {
  uid: number;
  gids: ReadonlySet<number>;
}

const named = new WeakMap<BlockNode, readonly NamedFile[]>();

/**
 * The local files an image pulled in through its names (backing files at any depth,
 * extents, data files), for the node openImage returned. Empty for an image that names
 * none; the top image itself is not in the list.
 */
export function namedFilesOf(node: BlockNode): readonly NamedFile[] {
  return named.get(node) ?? [];
}

export function recordNamedFiles(node: BlockNode, files: readonly NamedFile[]): void {
  named.set(node, files);
}

/** Users and groups from /etc/passwd and /etc/group (not NSS: LDAP users are not seen). */
async function principalOf(uid: number): Promise<Principal> {
  const gids = new Set<number>();
  const passwd = await fs.promises.readFile('/etc/passwd', 'utf8').catch(() => '');
  let user: string | undefined;
  for (const line of passwd.split('\n')) {
    const f = line.split(':');
    if (f.length < 4 || Number(f[2]) !== uid || f[2] === '') continue;
    user = f[0];
    const gid = Number(f[3]);
    if (Number.isInteger(gid)) gids.add(gid);
    break;
  }
  if (user !== undefined) {
    const group = await fs.promises.readFile('/etc/group', 'utf8').catch(() => '');
    for (const line of group.split('\n')) {
      const f = line.split(':');
      if (f.length < 4 || f[2] === '') continue;
      const members = (f[3] ?? '').split(',').map((m) => m.trim());
      const gid = Number(f[2]);
      if (members.includes(user) && Number.isInteger(gid)) gids.add(gid);
    }
  }
  return { uid, gids };
}

/** Whether `who` has every bit of `want` (4 read, 2 write, 1 search) on a file, as the kernel decides from the mode. */
function allowed(st: fs.Stats, who: Principal, want: number): boolean {
  if (who.uid === 0) return true;
  const shift = st.uid === who.uid ? 6 : who.gids.has(st.gid) ? 3 : 0;
  return ((st.mode >> shift) & want) === want;
}

function fstat(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

function isInside(dir: string, file: string): boolean {
  const rel = path.relative(dir, file);
  return rel !== '' && !rel.startsWith('..') && !path.isAbsolute(rel);
}

/** Where an open descriptor leads, from the kernel (not the name it was opened by). */
async function pathOfFd(fd: number): Promise<string | undefined> {
  return fs.promises.readlink(`/proc/self/fd/${fd}`).catch(() => undefined);
}

/**
 * The checks for one openImage: made for the top image, applied at every depth. Whom
 * they are made for is learnt from the top image's open descriptor, not its name, so
 * a symlink swapped while it is opened cannot lend a user's image root's rights.
 */
export class NamedFileGuard {
  readonly files: NamedFile[] = [];
  /** The top image's owner; undefined until it is open, and for a remote image. */
  private who: Principal | undefined;
  /** The top image is group- or world-writable: the least of those who may write it. */
  private writers: (Principal & { what: string }) | undefined;
  /** --confine: the real path of the top image's folder. */
  private folder: string | undefined;

  constructor(private readonly policy: NamedFilePolicy) {}

  /** Open the image the user gave: never checked (they gave it); it decides whose rights count. */
  async openTop(open: () => Promise<BlockNode>): Promise<BlockNode> {
    const node = await open();
    if (this.policy === 'trust' || !(node instanceof FileNode)) return node;
    try {
      const st = await fstat(node.fd);
      this.who = await principalOf(st.uid);
      // An image its group or everyone may write speaks for all of them: what it names
      // must be open to the least of them, not only to its owner (a root-owned image
      // left mode 0666 must not lend root's rights to whoever edits it).
      if (st.mode & 0o022) this.writers = { uid: -1, gids: new Set(st.mode & 0o002 ? [] : [st.gid]), what: st.mode & 0o002 ? 'everyone' : `group ${st.gid}` };
      const real = await pathOfFd(node.fd);
      this.folder = real === undefined ? undefined : path.dirname(real);
      return node;
    } catch (err) {
      await node.close().catch(() => undefined);
      throw err;
    }
  }

  /**
   * Open a file an image names, through `open`, after the policy allows it. The file
   * opened must be the one checked (same device and inode), so swapping a symlink
   * between the check and the open gains nothing. `req` undefined: a remote file.
   */
  async open(req: NamedRequest | undefined, open: () => Promise<BlockNode>): Promise<BlockNode> {
    if (req === undefined || this.policy === 'trust') return open();
    const checked = await this.check(req);
    const node = await open();
    try {
      const st = node instanceof FileNode ? await fstat(node.fd) : undefined;
      if (st === undefined || checked === undefined || st.dev !== checked.dev || st.ino !== checked.ino) {
        throw new UntrustedFileError(`${req.naming}: ${req.role} "${req.name}" changed while it was being opened; refusing to open it`);
      }
      if (this.policy === 'confine' && node instanceof FileNode) {
        const real = await pathOfFd(node.fd);
        if (real === undefined || this.folder === undefined || !isInside(this.folder, real)) this.refuse(req, `is outside the image's folder ${this.folder ?? '(unknown)'} (--confine)`);
      }
      this.files.push({ path: req.resolved, stat: st, write: req.write });
      return node;
    } catch (err) {
      await node.close().catch(() => undefined);
      throw err;
    }
  }

  private refuse(req: NamedRequest, why: string): never {
    throw new UntrustedFileError(`${req.naming}: ${req.role} "${req.name}" ${why}; refusing to open it${req.write ? ' for writing' : ''}`);
  }

  private async check(req: NamedRequest): Promise<fs.Stats | undefined> {
    // A local file named by a remote image has no local owner to answer for it.
    const who = this.who ?? this.refuse(req, 'is a local file, named by an image that is not one');
    let real: string;
    let st: fs.Stats;
    try {
      real = await fs.promises.realpath(req.resolved);
      st = await fs.promises.stat(real);
    } catch {
      // Missing or unreachable: the open says so in its own words (and if the file
      // appears meanwhile, open() refuses it as changed).
      return undefined;
    }
    if (this.policy === 'confine' && (this.folder === undefined || !isInside(this.folder, real))) {
      this.refuse(req, `is outside the image's folder ${this.folder ?? '(unknown)'} (--confine)`);
    }
    const principals: [Principal, string][] = [[who, `the image's owner (uid ${who.uid})`]];
    if (this.writers) principals.push([this.writers, `${this.writers.what}, who may write the image`]);
    for (const [p, name] of principals) {
      for (let dir = path.dirname(real); ; dir = path.dirname(dir)) {
        const d = await fs.promises.stat(dir).catch(() => undefined);
        if (d === undefined || !allowed(d, p, 1)) this.refuse(req, `lies in a folder ${name} cannot enter (${dir})`);
        if (dir === path.dirname(dir)) break;
      }
      if (!allowed(st, p, 4)) this.refuse(req, `is not readable by ${name}`);
      if (req.write && !allowed(st, p, 2)) this.refuse(req, `is not writable by ${name}`);
    }
    return st;
  }
}
