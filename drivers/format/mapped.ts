// The shared read path of formats that map guest offsets through a table (vdi, vhdx,
// parallels, qed, bochs, cloop, dmg, vmdk, vpc): a driver says where each run of the
// request lives; this reads the runs, with one file read per stretch that is
// contiguous on disk, falls through to the backing node for unallocated runs, and
// fills zeros (also past the end of a shorter backing node). Writes to bytes that
// already have a place on disk go straight there, without the driver's lock.
import type { BlockNode, CompressedCluster, Extent } from '../types.js';
import { readFromBacking } from './backing.js';
import createDebug from '../util/debug.js';

const debug = createDebug('tsmount:map');
import type { MetadataRanges } from './metadata-ranges.js';

export type MappedRun =
  /** The guest bytes are at `host` in `file` (the image's file unless an extent says otherwise). */
  | {
      kind: 'data';
      offset: number;
      length: number;
      host: number;
      file?: BlockNode;
      /** Metadata of `file` a write here must not overlap (else the mapper's, for the image's file). */
      metadata?: MetadataRanges;
      /**
       * A write here needs the driver's lock first (vpc: a block whose sector bitmap
       * this session has not set yet): not in place (writeInPlace), nor by the FUSE
       * workers (blockStatus's inPlace).
       */
      locked?: true;
      /**
       * `file` may hold holes here, which read as zeros: block status asks it
       * (splitByHoles; QEMU's BDRV_BLOCK_RECURSE: a flat vmdk extent, a static VDI).
       */
      recurse?: true;
    }
  | { kind: 'zero'; offset: number; length: number }
  /** Not in this layer: the backing node answers, or zeros. */
  | { kind: 'unallocated'; offset: number; length: number }
  /**
   * The driver produces the bytes itself (compressed grains, encrypted sectors...). A
   * whole compressed cluster may say where its stream lies in `file` (`compressed`,
   * Extent.compressed): the read map's threads inflate it if that is the image's file.
   */
  | { kind: 'custom'; offset: number; length: number; read(dst: Uint8Array): Promise<void>; compressed?: CompressedCluster; file?: BlockNode };

export interface Mapper {
  /** Runs covering exactly [offset, offset + length), in order, without gaps. */
  mapRange(offset: number, length: number): Promise<MappedRun[]>;
  /** The image file's metadata, which no data run written in place may overlap. */
  readonly metadata?: MetadataRanges;
  /** The name the image gives `file`, one of its other files (a vmdk descriptor's extent name): Extent.elsewhere's. */
  nameOf?(file: BlockNode): string | undefined;
}

/** Read [offset, offset + dst.length) through a mapper. */
export async function readMapped(mapper: Mapper, defaultFile: BlockNode, backing: BlockNode | undefined, offset: number, dst: Uint8Array): Promise<void> {
  const runs = await mapper.mapRange(offset, dst.length);
  if (debug.enabled) debug('%s: read %d+%d maps to %s', defaultFile.name, offset, dst.length, runs.map((r) => `${r.kind} ${r.offset}+${r.length}${r.kind === 'data' ? ` at ${r.host}` : ''}`).join(', '));
  const pending: Promise<void>[] = [];
  let i = 0;
  while (i < runs.length) {
    const run = runs[i]!;
    const at = run.offset - offset;
    // Merge neighbours of the same kind (and, for data, contiguous on the same file).
    let end = i + 1;
    let length = run.length;
    while (end < runs.length) {
      const next = runs[end]!;
      if (next.kind !== run.kind || run.kind === 'custom') break;
      if (run.kind === 'data') {
        const n = next as typeof run;
        if ((n.file ?? defaultFile) !== (run.file ?? defaultFile) || n.host !== run.host + length) break;
      }
      length += next.length;
      end++;
    }
    const part = dst.subarray(at, at + length);
    switch (run.kind) {
      case 'data':
        pending.push((run.file ?? defaultFile).read(run.host, part));
        break;
      case 'zero':
        part.fill(0);
        break;
      case 'unallocated':
        pending.push(readFromBacking(backing, run.offset, part));
        break;
      case 'custom':
        pending.push(run.read(part));
        break;
    }
    i = end;
  }
  await Promise.all(pending);
}

/**
 * Block status from the same runs: this layer only. With `inPlace`, data that
 * writeInPlace would write (not locked, clear of metadata) is marked so
 * (Extent.inPlace): the FUSE workers may overwrite it with pwrite(2). With
 * `elsewhere`, data in the layer's other files (a vmdk's extents) says where it lies
 * (Extent.elsewhere), writable in place where that file takes such writes too. Runs
 * that say `recurse` are split where their file has holes (splitByHoles).
 */
export async function mappedStatus(mapper: Mapper, offset: number, length: number, ownFile?: BlockNode, inPlace = false, elsewhere = false): Promise<Extent[]> {
  const out: Extent[] = [];
  const push = (e: Extent): void => {
    const last = out[out.length - 1];
    const contiguous = last?.host === undefined ? e.host === undefined : e.host === last.host + last.length;
    const otherFollows = last?.elsewhere === undefined ? e.elsewhere === undefined : e.elsewhere !== undefined && e.elsewhere.fd === last.elsewhere.fd && e.elsewhere.host === last.elsewhere.host + last.length;
    if (last && !last.compressed && last.kind === e.kind && last.offset + last.length === e.offset && contiguous && otherFollows && last.inPlace === e.inPlace && last.zeroData === e.zeroData) last.length += e.length;
    else out.push(e);
  };
  for (const r of await mapper.mapRange(offset, length)) {
    if (r.kind === 'custom' && r.compressed && (r.file === undefined || r.file === ownFile) && r.offset >= offset && r.offset + r.length <= offset + length) {
      out.push({ offset: r.offset, length: r.length, kind: 'data', compressed: r.compressed });
      continue;
    }
    const kind = r.kind === 'zero' ? 'zero' : r.kind === 'unallocated' ? 'unallocated' : 'data';
    // Data in the image's own file has a host offset (qemu-img map's "offset"): runs
    // that name no file, or name the image file itself (a monolithic sparse vmdk).
    const own = r.kind === 'data' && (r.file === undefined || r.file === ownFile);
    const host = own ? r.host : undefined;
    const otherFd = elsewhere && r.kind === 'data' && !own ? r.file!.hostFd : undefined;
    const otherFile = (r as { file?: BlockNode }).file;
    const other = otherFd === undefined || !otherFile ? undefined : { fd: otherFd, host: (r as { host: number }).host, name: mapper.nameOf?.(otherFile) ?? otherFile.name };
    // writeInPlace's guard: the image file's metadata for its own runs, a run's own for another file's.
    const writable =
      inPlace &&
      r.kind === 'data' &&
      !r.locked &&
      (own ? (r.metadata ?? mapper.metadata)?.find(r.host, r.length) === undefined : other !== undefined && r.file!.inPlaceWrites === true && r.metadata?.find(r.host, r.length) === undefined);
    const e: Extent = host === undefined ? { offset: r.offset, length: r.length, kind } : { offset: r.offset, length: r.length, kind, host };
    if (other) e.elsewhere = other;
    if (writable) e.inPlace = true;
    if (r.kind === 'data' && r.recurse && (host !== undefined || other !== undefined)) {
      for (const part of await splitByHoles(r.file ?? ownFile!, r.host, e)) push(part);
    } else push(e);
  }
  return out;
}

/**
 * QEMU's BDRV_BLOCK_RECURSE: data of a layer whose file may hold holes there (a flat
 * vmdk extent, a fixed VHD, a static VDI, a metadata-preallocated qcow2) asks that file
 * where it has them. A hole, or a range past the file's end, reads as zeros: that part
 * is data with zeroData (qemu-img map: "data": true, "zero": true). `e` lies at `at` in
 * `file`; each part keeps `e`'s fields, its places moved along. A file that cannot
 * tell leaves `e` whole (QEMU ignores the error too).
 */
export async function splitByHoles(file: BlockNode, at: number, e: Extent): Promise<Extent[]> {
  let status: Extent[];
  try {
    status = await file.blockStatus(at, e.length);
  } catch {
    return [e];
  }
  const out: Extent[] = [];
  const part = (from: number, to: number, hole: boolean): void => {
    const d = from - at;
    const p: Extent = { ...e, offset: e.offset + d, length: to - from };
    if (e.host !== undefined) p.host = e.host + d;
    if (e.elsewhere) p.elsewhere = { ...e.elsewhere, host: e.elsewhere.host + d };
    if (hole) p.zeroData = true;
    const last = out[out.length - 1];
    if (last && (last.zeroData === true) === hole) last.length += p.length;
    else out.push(p);
  };
  const end = at + e.length;
  let pos = at;
  for (const f of status) {
    const s = Math.max(f.offset, pos);
    const t = Math.min(f.offset + f.length, end);
    if (t <= s) continue;
    // A gap the file left out counts as data.
    if (s > pos) part(pos, s, false);
    part(s, t, f.kind === 'zero');
    pos = t;
  }
  if (pos < end) part(pos, end, false);
  return out;
}

/**
 * Append `run` to a mapRange result, extending the previous run instead when it
 * continues it: the same kind and, for data, contiguous on the same file. Custom
 * runs always stand alone.
 */
export function pushRun(out: MappedRun[], run: MappedRun): void {
  const last = out[out.length - 1];
  const continues =
    last !== undefined &&
    last.kind === run.kind &&
    run.kind !== 'custom' &&
    (run.kind !== 'data' || (last.kind === 'data' && last.file === run.file && last.host + last.length === run.host && last.locked === run.locked && last.recurse === run.recurse));
  if (continues) last.length += run.length;
  else out.push(run);
}

/**
 * Write [offset, offset + src.length) in place when every run of it is allocated
 * data: allocated clusters never move, so this needs no allocation lock. Returns
 * false, having written nothing, when some run must be allocated first.
 */
export async function writeInPlace(mapper: Mapper, defaultFile: BlockNode, offset: number, src: Uint8Array): Promise<boolean> {
  const runs = await mapper.mapRange(offset, src.length);
  if (!runs.every((r) => r.kind === 'data' && !r.locked)) return false;
  for (const r of runs) {
    if (r.kind !== 'data') continue;
    const guard = r.metadata ?? (r.file === undefined || r.file === defaultFile ? mapper.metadata : undefined);
    guard?.assertNoOverlap(r.host, r.length, `guest offset 0x${r.offset.toString(16)}`);
  }
  await Promise.all(runs.map((r) => (r.kind === 'data' ? (r.file ?? defaultFile).write(r.host, src.subarray(r.offset - offset, r.offset - offset + r.length)) : undefined)));
  return true;
}

/**
 * Write `data` at `host + at` into [host, host + length), space just claimed for it
 * whose other bytes must read as zeros (a new VDI block, VMDK grain, qcow cluster).
 * Where the file can, the zeros are allocated without writing them (allocateZeros:
 * one fallocate, not a megabyte of zeros per 4 KiB write into a new VDI block), then
 * the data goes on top; else zeros and data go as one write. Length is capped by
 * the caller (a block or grain size the header check bounded).
 */
export async function writeIntoNew(file: BlockNode, host: number, length: number, at: number, data: Uint8Array): Promise<void> {
  if (at === 0 && data.length === length) return file.write(host, data);
  if (file.allocateZeros && (await file.allocateZeros(host, length))) return file.write(host + at, data);
  const whole = Buffer.alloc(length);
  whole.set(data, at);
  await file.write(host, whole);
}
