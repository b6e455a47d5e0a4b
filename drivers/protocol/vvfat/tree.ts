// The host directory as FAT sees it: one scan of names and stat results (never file
// contents), short names given per directory, clusters given breadth first as QEMU
// does (the root, then each directory's children in order), and the directory
// clusters rendered from that. Memory grows with the number of entries only.
import fs from 'node:fs';
import path from 'node:path';
import { UsageError } from '../../errors.js';
import {
  ATTR_ARCHIVE, ATTR_DIRECTORY, ATTR_VOLUME_ID, DIRENT, badLongName, dosDateTime, lfnChecksum, lfnCount, shortBasis,
  shortBytes, shortText, withTail, writeLfn,
} from './names.js';

export interface FatNode {
  /** The host name ('' for the root). */
  name: string;
  hostPath: string;
  dir: boolean;
  size: number;
  mtimeMs: number;
  atimeMs: number;
  ctimeMs: number;
  /** 11 bytes, space padded, as latin1. */
  short: string;
  /** Whether the name needs LFN entries (it is not its own short name). */
  lfn: boolean;
  children: FatNode[];
  parent: FatNode | undefined;
  /** First cluster (0: none, an empty file or the FAT12/16 root). */
  first: number;
  clusters: number;
  /** A directory's entries, exactly as many as it has (the rest of its clusters read as zeros). */
  entries?: Buffer;
}

/** The largest file FAT holds: its size field is 32 bits. */
export const FAT_MAX_FILE = 0xffffffff;
/** Entries a directory may have (FAT spec: a directory is at most 2 MiB). */
export const DIR_MAX_ENTRIES = 65536;

/** Scan `root`; what cannot be shown (symlinks, devices, names FAT cannot hold, too large files) is left out with a warning. */
export function scanTree(root: string, warn: (text: string) => void): FatNode {
  let st: fs.Stats;
  try {
    st = fs.statSync(root);
  } catch (err) {
    throw new UsageError(`fat:${root}: cannot read the directory: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  if (!st.isDirectory()) throw new UsageError(`fat:${root}: not a directory`);
  const top = makeNode('', path.resolve(root), st, undefined);
  const stack: FatNode[] = [top];
  while (stack.length) {
    const dir = stack.pop()!;
    let names: string[];
    try {
      names = fs.readdirSync(dir.hostPath);
    } catch (err) {
      throw new UsageError(`fat:${root}: cannot read ${dir.hostPath}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    names.sort();
    const folded = new Set<string>();
    const prefix = dir.hostPath === '/' ? '' : dir.hostPath;
    for (const name of names) {
      const p = `${prefix}/${name}`;
      const skip = (why: string): void => warn(`fat:${root}: ${p} ${why}; left out of the disk`);
      const bad = name.includes('\ufffd') ? 'is not valid UTF-8' : badLongName(name);
      if (bad) {
        skip(bad);
        continue;
      }
      let s: fs.Stats;
      try {
        s = fs.lstatSync(p);
      } catch {
        continue; // gone since readdir
      }
      if (!s.isFile() && !s.isDirectory()) {
        skip(s.isSymbolicLink() ? 'is a symbolic link' : 'is not a regular file or directory');
        continue;
      }
      if (s.isFile() && s.size > FAT_MAX_FILE) {
        skip('is larger than FAT allows (4 GiB - 1)');
        continue;
      }
      // FAT compares names without case: of two names that differ only in case, one must go.
      const key = name.toUpperCase();
      if (folded.has(key)) {
        skip('differs from another name only in case');
        continue;
      }
      folded.add(key);
      const node = makeNode(name, p, s, dir);
      dir.children.push(node);
      if (node.dir) stack.push(node);
    }
    giveShortNames(dir);
  }
  return top;
}

function makeNode(name: string, hostPath: string, s: fs.Stats, parent: FatNode | undefined): FatNode {
  return {
    name,
    hostPath,
    dir: s.isDirectory(),
    size: s.isDirectory() ? 0 : s.size,
    mtimeMs: s.mtimeMs,
    atimeMs: s.atimeMs,
    ctimeMs: s.ctimeMs,
    short: '',
    lfn: false,
    children: [],
    parent,
    first: 0,
    clusters: 0,
  };
}

/**
 * Short names for a directory's children: names that fit 8.3 as they are keep it;
 * the others get a numeric tail (~1, ~2, ...) that no sibling has, as Windows and
 * QEMU's create_short_filename do.
 */
export function giveShortNames(dir: FatNode): void {
  const taken = new Set<string>(['.', '..']);
  const later: { node: FatNode; base: string; ext: string }[] = [];
  for (const node of dir.children) {
    const { base, ext, lossy } = shortBasis(node.name);
    const text = ext ? `${base}.${ext}` : base;
    if (!lossy && !taken.has(text)) {
      taken.add(text);
      node.short = shortBytes(base, ext);
      node.lfn = node.name !== text;
    } else {
      later.push({ node, base, ext });
    }
  }
  // The next tail to try for each basis: many names of one basis stay linear.
  const tails = new Map<string, number>();
  for (const { node, base, ext } of later) {
    const key = `${base}.${ext}`;
    for (let n = tails.get(key) ?? 1; ; n++) {
      const b = withTail(base, n);
      const text = ext ? `${b}.${ext}` : b;
      if (taken.has(text)) continue;
      taken.add(text);
      tails.set(key, n + 1);
      node.short = shortBytes(b, ext);
      node.lfn = true;
      break;
    }
  }
}

/** Directory entries of `dir` (with `.` and `..` in a subdirectory, the label in the root). */
export function entryCount(dir: FatNode): number {
  let n = dir.parent ? 2 : 1;
  for (const c of dir.children) n += 1 + (c.lfn ? lfnCount(c.name) : 0);
  return n;
}

/** Every node, breadth first (QEMU's order of allocation). */
export function breadthFirst(root: FatNode): FatNode[] {
  const out: FatNode[] = [root];
  for (let i = 0; i < out.length; i++) for (const c of out[i]!.children) out.push(c);
  return out;
}

/** Clusters a node takes at this cluster size; the FAT12/16 root lives in its own region. */
export function clustersOf(node: FatNode, clusterBytes: number, fat32: boolean): number {
  if (node.dir) {
    if (!node.parent && !fat32) return 0;
    return Math.max(1, Math.ceil((entryCount(node) * DIRENT) / clusterBytes));
  }
  return Math.ceil(node.size / clusterBytes);
}

/** Check the directory limits: FAT12/16's fixed root, and 65536 entries anywhere. */
export function checkLimits(order: FatNode[], rootEntries: number, name: string): void {
  for (const d of order) {
    if (!d.dir) continue;
    const n = entryCount(d);
    const max = !d.parent && rootEntries > 0 ? rootEntries : DIR_MAX_ENTRIES;
    if (n > max) throw new UsageError(`${name}: ${d.hostPath} needs ${n} directory entries; FAT allows ${max}${!d.parent && rootEntries > 0 ? ' in the root directory (use fat:32:)' : ''}`);
  }
}

/** Give clusters from 2 up in `order`; returns the first free cluster. */
export function allocate(order: FatNode[], clusterBytes: number, fat32: boolean): number {
  let next = 2;
  for (const n of order) {
    n.clusters = clustersOf(n, clusterBytes, fat32);
    n.first = n.clusters ? next : 0;
    next += n.clusters;
  }
  return next;
}

/** Render every directory's entries (after allocate). */
export function renderDirectories(order: FatNode[], label: Buffer): void {
  for (const d of order) if (d.dir) d.entries = renderDirectory(d, label);
}

function renderDirectory(d: FatNode, label: Buffer): Buffer {
  const buf = Buffer.alloc(entryCount(d) * DIRENT);
  let at = 0;
  if (!d.parent) {
    label.copy(buf, 0, 0, 11);
    buf[11] = ATTR_VOLUME_ID;
    stamp(buf, 0, d);
    at = DIRENT;
  } else {
    writeShort(buf, 0, '.          ', ATTR_DIRECTORY, d.first, 0, d);
    // `..` of a child of the root points at cluster 0 (FAT spec), FAT32 included.
    writeShort(buf, DIRENT, '..         ', ATTR_DIRECTORY, d.parent.parent ? d.parent.first : 0, 0, d);
    at = 2 * DIRENT;
  }
  for (const c of d.children) {
    if (c.lfn) at = writeLfn(buf, at, c.name, lfnChecksum(c.short));
    writeShort(buf, at, c.short, c.dir ? ATTR_DIRECTORY : ATTR_ARCHIVE, c.first, c.size, c);
    at += DIRENT;
  }
  return buf;
}

function writeShort(buf: Buffer, at: number, short: string, attr: number, first: number, size: number, times: FatNode): void {
  buf.write(short, at, 11, 'latin1');
  buf[at + 11] = attr;
  stamp(buf, at, times);
  buf.writeUInt16LE(first >>> 16, at + 20);
  buf.writeUInt16LE(first & 0xffff, at + 26);
  buf.writeUInt32LE(size, at + 28);
}

function stamp(buf: Buffer, at: number, t: FatNode): void {
  const c = dosDateTime(t.ctimeMs);
  const m = dosDateTime(t.mtimeMs);
  buf[at + 13] = c.tenths;
  buf.writeUInt16LE(c.time, at + 14);
  buf.writeUInt16LE(c.date, at + 16);
  buf.writeUInt16LE(dosDateTime(t.atimeMs).date, at + 18);
  buf.writeUInt16LE(m.time, at + 22);
  buf.writeUInt16LE(m.date, at + 24);
}

export { shortText };
