// Turning writes through a fat:rw: disk back into changes of the host directory (what
// QEMU's vvfat calls commit). At each flush (fsync, close of the flat file) and at
// unmount, the file system is read back from the disk as it now is and compared
// with what the host directory last matched: a file or directory is known by its
// first cluster (QEMU's rule), an empty file by its path. Then, in an order that
// never needs a name that is still taken: renamed items move aside, deleted ones go,
// new directories come, moved items land, new and changed files are written (to a
// temporary file, then renamed over). A FAT in the middle of an update (a chain
// that does not match its size, a cluster in two chains) is not applied: the next
// flush tries again. A host file changed since the disk last matched it is never
// overwritten or deleted: that change is refused with a warning.
import fs from 'node:fs';
import path from 'node:path';
import createDebug from '../../util/debug.js';
import { messageOf } from '../../errors.js';
import type { FatImage } from './image.js';
import type { Overlay } from './overlay.js';

import { FatReader, Inconsistent, parseDirectory, type ReadEntry } from './fat-reader.js';
import type { FatNode } from './tree.js';
import { SECTORS_PER_CHUNK, type Bitmaps } from './overlay.js';

const debug = createDebug('tsmount:vvfat');

/** What the host directory held, as the disk last showed it. */
interface Known {
  rel: string;
  dir: boolean;
  first: number;
  size: number;
  /** Clusters, and the chain itself where it is not first, first + 1, ... */
  count: number;
  list?: number[];
  /** The host file's mtime and size when the disk last matched it (files). */
  hostMtimeMs: number;
  hostSize: number;
  /** The clusters of the built disk that read this host file (until it is replaced). */
  base?: FatNode;
}

/** An entry of the disk as it is now. */
interface Now extends ReadEntry {
  rel: string;
  chain: number[];
}

/** A path whose folder is not inside the mounted directory (the host changed it). */
class OutsideError extends Error {}

export class WriteBack {
  private known: Known[];
  private running: Promise<void> = Promise.resolve();
  private temp = 0;
  /** Why the last attempt was put off (the FAT was not consistent), for the final word at close. */
  private deferred: string | undefined;

  constructor(
    private readonly image: FatImage,
    private readonly overlay: Overlay,
    private readonly readDisk: (offset: number, dst: Uint8Array) => Promise<void>,
    private readonly warn: (text: string) => void,
  ) {
    this.known = [];
    const walk = (n: FatNode, rel: string): void => {
      for (const c of n.children) {
        const r = rel ? `${rel}/${c.name}` : c.name;
        this.known.push({ rel: r, dir: c.dir, first: c.first, size: c.size, count: c.clusters, hostMtimeMs: c.mtimeMs, hostSize: c.size, base: c.dir ? undefined : c });
        if (c.dir) walk(c, r);
      }
    };
    walk(image.root, '');
  }

  /** The directory, absolute (as every host path of the built disk). */
  private get root(): string {
    return this.image.root.hostPath;
  }

  /** Apply what was written since the last commit; commits run one at a time. */
  commit(final = false): Promise<void> {
    const run = this.running.then(() => this.commitNow(final));
    this.running = run.catch(() => undefined);
    return run;
  }

  private async commitNow(final: boolean): Promise<void> {
    const fresh = this.overlay.takeFresh();
    if (fresh.size === 0) {
      if (final && this.deferred) this.warn(`${this.image.name}: writes not applied to ${this.root}: ${this.deferred}`);
      return;
    }
    try {
      await this.apply(fresh);
      this.deferred = undefined;
    } catch (err) {
      this.overlay.restoreFresh(fresh);
      if (!(err instanceof Inconsistent)) throw err;
      this.deferred = `the FAT is not consistent (${err.message})`;
      debug('%s: put off: %s', this.image.name, this.deferred);
      if (final) this.warn(`${this.image.name}: writes not applied to ${this.root}: ${this.deferred}`);
    }
  }

  private async apply(fresh: Bitmaps): Promise<void> {
    const l = this.image.layout;
    const reader = new FatReader(l, this.readDisk);
    await reader.load();
    const used = new Uint8Array(l.clusterCount + 2);
    const nows = await this.readTree(reader, used);
    const dirty = dirtyClusters(fresh, l.dataStart, l.sectorsPerCluster);

    // Pair what is with what was.
    const byFirst = new Map<number, Known>();
    const byRel = new Map<string, Known>();
    for (const k of this.known) {
      if (k.first) byFirst.set(k.first, k);
      byRel.set(k.rel, k);
    }
    const claimed = new Set<Known>();
    const pairs = new Map<Now, Known>();
    for (const n of nows) {
      let k = n.first ? byFirst.get(n.first) : undefined;
      if (!(k && k.dir === n.dir && !claimed.has(k))) {
        const same = n.first === 0 && !n.dir ? byRel.get(n.rel) : undefined;
        k = same && !same.dir && !claimed.has(same) ? same : undefined;
      }
      if (k) {
        claimed.add(k);
        pairs.set(n, k);
      }
    }
    const changed = new Set<Now>();
    for (const [n, k] of pairs) if (!n.dir && (n.size !== k.size || !sameChain(n.chain, k) || n.chain.some((c) => dirty.has(c)))) changed.add(n);
    const deleted = this.known.filter((k) => !claimed.has(k));

    // Host files about to change or go no longer back the clusters still in use elsewhere: copy those first.
    const identity = new Set<number>();
    for (const n of changed) {
      const b = pairs.get(n)!.base;
      if (b) n.chain.forEach((c, i) => c === b.first + i && identity.add(c));
    }
    const losing = [...deleted.map((k) => k.base), ...[...changed].map((n) => pairs.get(n)!.base)];
    for (const b of losing) if (b && b.size > 0) await this.copyUp(b, used, identity, reader);

    const refused = new Set<Now | Known>();
    const refuse = (item: Now | Known, what: string, why: string): void => {
      refused.add(item);
      this.warn(`${this.image.name}: not applied to the host: ${what}: ${why}`);
    };

    // Renamed items aside, deepest first, so every old path is still valid when it is used.
    const moved = [...pairs].filter(([n, k]) => n.rel !== k.rel).sort((a, b) => depth(b[1].rel) - depth(a[1].rel));
    const aside = new Map<Now, string>();
    for (const [n, k] of moved) {
      const why = this.hostChanged(k);
      if (why) {
        refuse(n, `rename of ${k.rel} to ${n.rel}`, why);
        continue;
      }
      const tmp = `.tsmount-vvfat-${process.pid}-${this.temp++}`;
      try {
        await this.move(k.rel, tmp, k);
        aside.set(n, tmp);
      } catch (err) {
        refuse(n, `rename of ${k.rel} to ${n.rel}`, errText(err));
      }
    }
    // Deletions, deepest first.
    for (const k of deleted.sort((a, b) => depth(b.rel) - depth(a.rel))) {
      const why = this.hostChanged(k);
      if (why) {
        refuse(k, `deletion of ${k.rel}`, why);
        continue;
      }
      try {
        if (k.dir) fs.rmdirSync(this.host(k.rel));
        else fs.unlinkSync(this.host(k.rel));
      } catch (err) {
        refuse(k, `deletion of ${k.rel}`, errText(err));
        continue;
      }
      if (k.base) this.forgetBase(k.base);
    }
    // New directories, moved items and files, parents first. Each on its own: one
    // refused (its folder missing, say) does not stop the others.
    for (const n of nows) {
      const k = pairs.get(n);
      const tmp = aside.get(n);
      const what = tmp !== undefined ? `rename of ${k!.rel} to ${n.rel}` : n.dir ? `new directory ${n.rel}` : k ? `changes to ${n.rel}` : `new file ${n.rel}`;
      try {
        if (tmp !== undefined) {
          if (exists(this.host(n.rel))) {
            refuse(n, what, 'a file of that name appeared on the host');
            await this.move(tmp, k!.rel, k!);
            continue;
          }
          await this.move(tmp, n.rel, k!);
        }
        if (n.dir && !k) {
          try {
            fs.mkdirSync(this.host(n.rel));
          } catch (err) {
            if (!((err as NodeJS.ErrnoException).code === 'EEXIST' && fs.lstatSync(this.host(n.rel)).isDirectory())) throw err;
          }
          continue;
        }
        if (n.dir || refused.has(n)) continue;
        if (!k) {
          if (exists(this.host(n.rel))) refuse(n, what, 'a file of that name appeared on the host');
          else await this.writeFile(n, reader);
        } else if (changed.has(n)) {
          const why = this.hostChanged(k, n.rel);
          if (why) refuse(n, what, why);
          else await this.writeFile(n, reader);
        }
      } catch (err) {
        refuse(n, what, errText(err));
      }
    }
    this.known = nows.map((n) => this.knownFrom(n, pairs.get(n), refused.has(n)));
    debug('%s: applied: %d moved, %d deleted, %d written', this.image.name, moved.length, deleted.length, changed.size + nows.filter((n) => !pairs.has(n)).length);
  }

  /** Every entry of the disk, parents before children. */
  private async readTree(reader: FatReader, used: Uint8Array): Promise<Now[]> {
    const fat32 = this.image.layout.fatType === 32;
    const out: Now[] = [];
    const queue: { rel: string; bytes: Buffer }[] = [{ rel: '', bytes: await reader.rootBytes(used) }];
    while (queue.length) {
      const { rel, bytes } = queue.shift()!;
      const names = new Set<string>();
      for (const e of parseDirectory(bytes, fat32)) {
        if (e.name === '.' || e.name === '..' || e.name.includes('/') || e.name.includes('\0') || e.name === '') {
          throw new Inconsistent(`the name '${e.name}' in /${rel} cannot be a host file name`);
        }
        const key = e.name.toUpperCase();
        if (names.has(key)) throw new Inconsistent(`/${rel} holds '${e.name}' twice`);
        names.add(key);
        const r = rel ? `${rel}/${e.name}` : e.name;
        let chain: number[] = [];
        if (e.dir || e.first !== 0) chain = reader.chain(e.first, used, `/${r}`);
        if (!e.dir && chain.length !== Math.ceil(e.size / this.image.layout.clusterBytes)) {
          throw new Inconsistent(`/${r} has ${chain.length} clusters for ${e.size} bytes`);
        }
        out.push({ ...e, rel: r, chain });
        if (e.dir) queue.push({ rel: r, bytes: await reader.chainBytes(chain) });
      }
    }
    return out;
  }

  /**
   * The host path of `rel`, after checking that its folder is really inside the
   * directory: a folder the host swapped for a symbolic link must not lead a write
   * out of the tree.
   */
  private host(rel: string): string {
    const p = path.join(this.root, rel);
    if (rel === '') return p;
    let real: string;
    try {
      real = fs.realpathSync(path.dirname(p));
    } catch {
      return p; // a missing folder fails the operation itself
    }
    const top = fs.realpathSync(this.root);
    if (real !== top && !real.startsWith(top === '/' ? '/' : `${top}/`)) throw new OutsideError(`${rel}: its folder leads outside ${this.root}`);
    return p;
  }

  /** Why the host file no longer is what the disk last matched, or undefined. */
  private hostChanged(k: Known, rel = k.rel): string | undefined {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(this.host(rel));
    } catch {
      return 'it is gone from the host';
    }
    if (k.dir) return st.isDirectory() ? undefined : 'it is no longer a directory on the host';
    if (!st.isFile()) return 'it is no longer a regular file on the host';
    if (st.mtimeMs !== k.hostMtimeMs || st.size !== k.hostSize) return 'the host file was changed since the mount (mtime or size differ)';
    return undefined;
  }

  /** Rename on the host; the built disk's clusters follow the file (and a directory's files). */
  private async move(from: string, to: string, k: Known): Promise<void> {
    fs.renameSync(this.host(from), this.host(to));
    const oldPath = this.host(from);
    const newPath = this.host(to);
    for (const b of this.image.runs) {
      if (b.dir) continue;
      if (b.hostPath === oldPath || b.hostPath.startsWith(oldPath + '/')) {
        this.image.files.forget(b.hostPath);
        b.hostPath = newPath + b.hostPath.slice(oldPath.length);
      }
    }
    // What lies inside a moved directory moves with it.
    if (k.dir) for (const d of this.known) if (d.rel.startsWith(`${k.rel}/`)) d.rel = to + d.rel.slice(k.rel.length);
    k.rel = to;
  }

  /** The host file behind these clusters is gone: they read as zeros from now on. */
  private forgetBase(b: FatNode): void {
    this.image.files.forget(b.hostPath);
    b.size = 0;
  }

  /** Copy the clusters of `b` that the file system still uses (other than where the rewritten file keeps them) into the overlay. */
  private async copyUp(b: FatNode, used: Uint8Array, identity: Set<number>, reader: FatReader): Promise<void> {
    const buf = Buffer.alloc(this.image.layout.clusterBytes);
    for (let c = b.first; c < b.first + b.clusters; c++) {
      if (!used[c] || identity.has(c)) continue;
      await this.readDisk(reader.clusterOffset(c), buf);
      await this.overlay.write(reader.clusterOffset(c), buf, false);
    }
  }

  /** Write a file's bytes from the disk to a temporary file beside it, then rename it into place. */
  private async writeFile(n: Now, reader: FatReader): Promise<void> {
    const target = this.host(n.rel);
    const tmp = path.join(path.dirname(target), `.tsmount-vvfat-${process.pid}-${this.temp++}`);
    const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o644);
    try {
      const cb = this.image.layout.clusterBytes;
      const buf = Buffer.alloc(Math.max(cb, 1 << 20));
      let i = 0;
      while (i < n.chain.length) {
        // Runs of consecutive clusters in one read.
        let j = i + 1;
        while (j < n.chain.length && n.chain[j] === n.chain[j - 1]! + 1 && (j - i + 1) * cb <= buf.length) j++;
        const len = Math.min((j - i) * cb, n.size - i * cb);
        await this.readDisk(reader.clusterOffset(n.chain[i]!), buf.subarray(0, len));
        let done = 0;
        while (done < len) done += fs.writeSync(fd, buf, done, len - done, i * cb + done);
        i = j;
      }
      fs.ftruncateSync(fd, n.size);
      fs.futimesSync(fd, new Date(), new Date(n.mtimeMs));
      fs.fsyncSync(fd);
    } catch (err) {
      fs.closeSync(fd);
      fs.rmSync(tmp, { force: true });
      throw err;
    }
    fs.closeSync(fd);
    fs.renameSync(tmp, target);
    // A descriptor kept open on the old file would keep reading it.
    this.image.files.forget(target);
  }

  private knownFrom(n: Now, k: Known | undefined, refused: boolean): Known {
    const contiguous = n.chain.every((c, i) => c === n.chain[0]! + i);
    let hostMtimeMs = k?.hostMtimeMs ?? 0;
    let hostSize = k?.hostSize ?? 0;
    if (!n.dir && !refused) {
      try {
        const st = fs.lstatSync(this.host(n.rel));
        hostMtimeMs = st.mtimeMs;
        hostSize = st.size;
      } catch {
        /* refused or gone: the next commit sees it */
      }
    }
    return { rel: n.rel, dir: n.dir, first: n.first, size: n.size, count: n.chain.length, list: contiguous ? undefined : n.chain, hostMtimeMs, hostSize, base: k?.base };
  }
}

/** Whether anything (a dangling symbolic link too) has this name. */
function exists(p: string): boolean {
  try {
    fs.lstatSync(p);
    return true;
  } catch {
    return false;
  }
}

function depth(rel: string): number {
  return rel.split('/').length;
}

function sameChain(chain: number[], k: Known): boolean {
  if (chain.length !== k.count) return false;
  if (k.list) return chain.every((c, i) => c === k.list![i]);
  return chain.every((c, i) => c === k.first + i);
}

/** The data clusters that written sectors fall in. */
function dirtyClusters(fresh: Bitmaps, dataStart: number, spc: number): Set<number> {
  const out = new Set<number>();
  for (const [chunk, bits] of fresh) {
    for (let i = 0; i < SECTORS_PER_CHUNK; i++) {
      if (!(bits[i >> 3]! & (1 << (i & 7)))) continue;
      const s = chunk * SECTORS_PER_CHUNK + i;
      if (s >= dataStart) out.add(2 + Math.floor((s - dataStart) / spc));
    }
  }
  return out;
}

function errText(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? messageOf(err);
}


