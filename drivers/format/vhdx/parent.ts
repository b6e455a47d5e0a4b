// The parent of a differencing VHDX (Hyper-V checkpoints, .avhdx): the parent locator
// metadata item (VHDX specification section 2.6.2.6) names it by relative_path,
// volume_path and absolute_win32_path, and identifies it by parent_linkage, the
// parent's DataWriteGuid. The parent is opened through OpenOptions.openBacking, so it
// passes the named-file policy (drivers/trust.ts) like any backing file.
import { constants } from 'node:os';
import type { BlockNode, OpenOptions } from '../../types.js';
import { CorruptImageError, TsmountError, UnsupportedError, UsageError } from '../../errors.js';
import { dv, GUIDS } from './layout.js';

/** Section 2.6.1.2: a metadata item is at most 1 MiB. */
export const MAX_LOCATOR_BYTES = 1 << 20;
const HEADER = 20;
const ENTRY = 12;

export interface ParentLocator {
  /** parent_linkage and parent_linkage2: lowercase GUID text without braces. */
  linkage: string[];
  /** Where to look, in the specification's order. */
  paths: { key: 'relative_path' | 'volume_path' | 'absolute_win32_path'; value: string }[];
}

/** What a VHDX node tells an overlay about itself (the `vhdxIdentity` capability). */
export type VhdxIdentity = NonNullable<BlockNode['vhdxIdentity']>;

const utf16 = new TextDecoder('utf-16le');

/** The locator's key/value pairs (section 2.6.2.6.1 and .2), each inside the item. */
export function parseParentLocator(item: Uint8Array, name: string): ParentLocator {
  const bad = (why: string): CorruptImageError => new CorruptImageError(`${name}: VHDX parent locator ${why}`);
  if (item.length < HEADER) throw bad('is too short');
  if (!GUIDS.vhdxParentType.equals(item.subarray(0, 16))) throw new UnsupportedError(`${name}: VHDX parent locator of an unknown type (not a VHDX parent)`);
  const v = dv(item);
  const count = v.getUint16(18, true);
  if (HEADER + count * ENTRY > item.length) throw bad(`has ${count} entries, more than its ${item.length} bytes hold`);
  const pairs = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    const at = HEADER + i * ENTRY;
    const ko = v.getUint32(at, true);
    const vo = v.getUint32(at + 4, true);
    const kl = v.getUint16(at + 8, true);
    const vl = v.getUint16(at + 10, true);
    if (ko === 0 || vo === 0 || kl === 0 || vl === 0 || ko + kl > item.length || vo + vl > item.length || kl % 2 !== 0 || vl % 2 !== 0) {
      throw bad(`entry ${i} lies outside the item or is empty`);
    }
    const key = utf16.decode(item.subarray(ko, ko + kl));
    if (pairs.has(key)) throw bad(`names '${key}' twice`);
    pairs.set(key, utf16.decode(item.subarray(vo, vo + vl)));
  }
  const linkage = ['parent_linkage', 'parent_linkage2'].flatMap((k) => {
    const g = pairs.get(k);
    if (g === undefined) return [];
    const m = /^\{?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\}?$/i.exec(g.trim());
    if (!m) throw bad(`${k} '${g}' is not a GUID`);
    return [m[1]!.toLowerCase()];
  });
  if (!pairs.has('parent_linkage')) throw bad('has no parent_linkage');
  const paths = (['relative_path', 'volume_path', 'absolute_win32_path'] as const).flatMap((key) => {
    const value = pairs.get(key);
    return value === undefined ? [] : [{ key, value }];
  });
  if (paths.length === 0) throw bad('names no path (relative_path, volume_path or absolute_win32_path)');
  return { linkage, paths };
}

/** The last component of a Windows path. */
function windowsBase(p: string): string {
  const parts = p.split('\\').filter((s) => s !== '');
  return parts[parts.length - 1] ?? '';
}

/**
 * Names to try, relative to the child: relative_path with its separators turned
 * around; then, since volume GUIDs and drive letters mean nothing here, the file
 * name of volume_path and absolute_win32_path beside the child (where a copied
 * checkpoint chain usually keeps its parent). Names with a ':' are not tried, so a
 * locator cannot reach another protocol (nbd:, ssh:) or a drive path.
 */
export function parentCandidates(loc: ParentLocator): { name: string; from: string }[] {
  const out: { name: string; from: string }[] = [];
  for (const { key, value } of loc.paths) {
    const name = key === 'relative_path' ? value.replace(/\\/g, '/').replace(/^(\.\/)+/, '') : windowsBase(value);
    // A ':' is a drive letter or a URI scheme (nbd:, ssh:): never a file beside the child.
    if (name === '' || name.includes(':') || out.some((c) => c.name === name)) continue;
    out.push({ name, from: `${key} '${value}'` });
  }
  return out;
}

/**
 * Open the parent: the first candidate that exists (a missing file is ENOENT), which
 * must be a VHDX whose DataWriteGuid the locator's parent_linkage names and whose
 * logical sector size matches the child's.
 */
export async function openParent(opts: OpenOptions, loc: ParentLocator, name: string, logicalSectorSize: number): Promise<BlockNode> {
  const tried: string[] = [];
  const candidates = parentCandidates(loc);
  if (candidates.length === 0) {
    throw new CorruptImageError(`${name}: VHDX parent locator names no path usable here (${loc.paths.map((p) => `${p.key} '${p.value}'`).join(', ')})`);
  }
  for (const c of candidates) {
    let parent: BlockNode;
    try {
      parent = await opts.openBacking(c.name, 'vhdx');
    } catch (err) {
      if (err instanceof TsmountError && err.errno === constants.errno.ENOENT) {
        tried.push(`'${c.name}' (from ${c.from})`);
        continue;
      }
      throw err;
    }
    try {
      const id = parent.vhdxIdentity;
      if (id === undefined) throw new UnsupportedError(`${name}: parent '${c.name}' is not a VHDX image`);
      if (!loc.linkage.includes(id.dataWriteGuid)) {
        throw new CorruptImageError(`${name}: parent '${c.name}' has DataWriteGuid {${id.dataWriteGuid}}, not the parent_linkage {${loc.linkage[0]}} this differencing VHDX was made over (the parent changed since)`);
      }
      if (id.logicalSectorSize !== logicalSectorSize) {
        throw new CorruptImageError(`${name}: parent '${c.name}' has ${id.logicalSectorSize}-byte logical sectors, the child ${logicalSectorSize}-byte ones`);
      }
      return parent;
    } catch (err) {
      await parent.close().catch(() => undefined);
      throw err;
    }
  }
  throw new UsageError(`${name}: parent VHDX not found: tried ${tried.join(', ')} (relative to it)`, constants.errno.ENOENT);
}
