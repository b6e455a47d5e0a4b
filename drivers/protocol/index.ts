// The protocol registry: which driver a spec (path or URI) belongs to.
import fs from 'node:fs';
import path from 'node:path';
import util from 'node:util';
import type { FileAttributes, ProtocolDriver } from '../types.js';
import { UsageError, type SysError } from '../errors.js';
import { setExtentSizeHint, setNoCow } from '../util/sys.js';
import { FileNode, fileOpenOptions } from './file.js';
import { glusterProtocol, iscsiProtocol, nbdProtocol, sheepdogProtocol, sshProtocol } from './remote.js';
import { vvfatProtocol } from './vvfat/index.js';
import { foreignHostProtocol } from './host-names.js';
import { nvmeProtocol } from './nvme.js';

/** Local files and host block devices: every spec no other protocol claims. */
export const fileProtocol: ProtocolDriver = {
  name: 'file',
  claims: (spec) => spec.startsWith('file:') || !/^[a-z][a-z0-9+.-]*:/i.test(spec),
  open: (spec, opts) =>
    FileNode.open(stripFile(spec), fileOpenOptions(opts)),
  resolveRelative: (base, name) => {
    const plain = stripFile(name);
    return path.isAbsolute(plain) ? plain : path.join(path.dirname(stripFile(base)), plain);
  },
  create: async (spec, attrs) => {
    const p = stripFile(spec);
    let fd: number;
    try {
      fd = fs.openSync(p, 'w');
    } catch (err) {
      throw new UsageError(`${p}: cannot create: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    try {
      if (attrs) applyFileAttributes(p, fd, attrs);
    } finally {
      fs.closeSync(fd);
    }
  },
  remove: async (spec) => fs.rmSync(stripFile(spec), { force: true }),
  stem: (spec) => {
    const base = path.basename(stripFile(spec).replace(/\/+$/, ''));
    const dot = base.lastIndexOf('.');
    return dot > 0 ? base.slice(0, dot) : base || 'disk';
  },
};

/**
 * As QEMU's raw_co_create, on the new, empty file: NOCOW where asked (ignored where the
 * file system has no such flag), then the extent size hint (a warning only where it was
 * asked for and the file system refuses it).
 */
function applyFileAttributes(p: string, fd: number, a: FileAttributes): void {
  if (a.nocow) {
    try {
      setNoCow(fd);
    } catch {
      // An optimisation, as in QEMU: no file system but btrfs has the flag.
    }
  }
  if (a.extentSizeHint > 0) {
    try {
      setExtentSizeHint(fd, a.extentSizeHint);
    } catch (err) {
      if (a.hintGiven) process.stderr.write(`warning: ${p}: Failed to set extent size hint: ${util.getSystemErrorName(-(err as SysError).errno)}\n`);
    }
  }
}

function stripFile(spec: string): string {
  return spec.startsWith('file:') ? spec.slice(5) : spec;
}

/** Remote and other protocols register here; the file protocol comes last. */
const protocols: ProtocolDriver[] = [];

export function registerProtocol(p: ProtocolDriver): void {
  protocols.push(p);
}
registerProtocol(nbdProtocol);
registerProtocol(sshProtocol);
registerProtocol(iscsiProtocol);
registerProtocol(glusterProtocol);
registerProtocol(vvfatProtocol);
registerProtocol(nvmeProtocol);
registerProtocol(sheepdogProtocol);
registerProtocol(foreignHostProtocol);

export function protocolFor(spec: string): ProtocolDriver {
  for (const p of protocols) if (p.claims(spec)) return p;
  if (fileProtocol.claims(spec)) return fileProtocol;
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(spec)?.[1];
  throw new UsageError(`${spec}: unknown protocol '${scheme}'`);
}

/** True when a name carries its own protocol (a URI), so it is not relative to anything. */
export function hasOwnProtocol(name: string): boolean {
  return protocols.some((p) => p.claims(name));
}

/**
 * QEMU's path_combine: a name an image gives another file (a backing file, a vmdk
 * extent, a data file) taken from the image's folder as the image's name was typed; a
 * name that is absolute or a URI stands alone.
 */
export function pathCombine(spec: string, name: string): string {
  if (path.isAbsolute(name) || hasOwnProtocol(name)) return name;
  return spec.slice(0, spec.lastIndexOf('/') + 1) + name;
}
