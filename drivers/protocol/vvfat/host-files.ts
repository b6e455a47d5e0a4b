// Reading the host files behind the disk's file clusters: descriptors opened on first
// use and kept in a small LRU, so a scan of the disk does not reopen a file for every
// cluster and a tree of 100,000 files never holds 100,000 descriptors.
import fs from 'node:fs';
import { IoError } from '../../errors.js';

const MAX_OPEN = 64;

interface Open {
  fd: Promise<number>;
  users: number;
  evicted: boolean;
}

export class HostFiles {
  private readonly open = new Map<string, Open>();

  /**
   * Read file bytes at `pos` into dst; what lies past the file's end (it shrank since
   * the scan, or it is gone) reads as zeros.
   */
  async read(path: string, pos: number, dst: Uint8Array): Promise<void> {
    const o = this.acquire(path);
    try {
      let fd: number;
      try {
        fd = await o.fd;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
          dst.fill(0);
          return;
        }
        throw new IoError(`${path}: cannot open: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
      }
      let done = 0;
      while (done < dst.length) {
        const n = await new Promise<number>((resolve, reject) =>
          fs.read(fd, dst, done, dst.length - done, pos + done, (err, bytes) => (err ? reject(new IoError(`${path}: read failed: ${err.code ?? String(err)}`)) : resolve(bytes))),
        );
        if (n === 0) break;
        done += n;
      }
      dst.fill(0, done);
    } finally {
      this.release(path, o);
    }
  }

  /** Forget a path (renamed, replaced or deleted on the host): the next read opens it anew. */
  forget(path: string): void {
    const o = this.open.get(path);
    if (!o) return;
    this.open.delete(path);
    o.evicted = true;
    if (o.users === 0) closeLater(o);
  }

  async close(): Promise<void> {
    for (const path of [...this.open.keys()]) this.forget(path);
  }

  private acquire(path: string): Open {
    let o = this.open.get(path);
    if (o) {
      // Most recently used last.
      this.open.delete(path);
      this.open.set(path, o);
    } else {
      const fd = new Promise<number>((resolve, reject) => fs.open(path, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW, (err, f) => (err ? reject(err) : resolve(f))));
      fd.catch(() => undefined);
      o = { fd, users: 0, evicted: false };
      this.open.set(path, o);
      this.trim();
    }
    o.users++;
    return o;
  }

  private release(path: string, o: Open): void {
    o.users--;
    if (o.evicted && o.users === 0) closeLater(o);
    // A file that could not be opened is tried again next time.
    else if (o.users === 0) o.fd.catch(() => this.open.get(path) === o && this.open.delete(path));
  }

  private trim(): void {
    for (const [path, o] of this.open) {
      if (this.open.size <= MAX_OPEN) break;
      if (o.users > 0) continue;
      this.open.delete(path);
      o.evicted = true;
      closeLater(o);
    }
  }
}

function closeLater(o: Open): void {
  o.fd.then((fd) => fs.close(fd, () => undefined), () => undefined);
}
