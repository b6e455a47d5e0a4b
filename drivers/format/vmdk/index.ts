// The vmdk driver: probe and open (QEMU 7.2's vmdk_probe / vmdk_open). An image is a
// monolithic sparse file (KDMV or COWD) or a text descriptor naming extent files,
// each opened through the image's protocol with the image's lock (OpenOptions.openFile).
import path from 'node:path';
import type { BlockNode, Creatable, FormatDriver, OpenOptions } from '../../types.js';
import { MAX_NODE_SIZE } from '../../types.js';
import { CorruptImageError, TsmountError, UnsupportedError, UntrustedFileError, UsageError, messageOf } from '../../errors.js';
import { cString, DESC_SIZE, MAX_DESC_BYTES, parentHint, parseDescriptor, readCid } from './descriptor.js';
import { FlatExtent, SparseExtent, type VmdkExtent } from './extent.js';
import { parseVmdk3Header, peekVmdk4, readVmdk4Header, VMDK3_MAGIC, VMDK4_MAGIC } from './header.js';
import { SeSparseExtent, SESPARSE_GRAIN } from './sesparse.js';
import { VmdkNode } from './vmdk.js';
import { createVmdk, VMDK_CREATE_OPTIONS } from './create.js';
import { be32, probe } from './probe.js';

/** What a sparse extent's header needs (KDMV or COWD), and its embedded descriptor's offset. */
const SPARSE_HEAD_BYTES = 4096;

interface OpenState {
  opts: OpenOptions;
  /** The image's file: extents named relative to it. */
  image: BlockNode;
  /** Extent files opened here, closed again if the open fails. */
  opened: BlockNode[];
  /** The same files by the name the descriptor gives: a name listed again is opened once. */
  byName: Map<string, BlockNode>;
  extents: VmdkExtent[];
  /** Guest bytes so far. */
  end: number;
  cacheBytes: number;
}

/** Bytes of a file from `offset`, as vmdk_read_desc reads them (at most 1 MiB - 1, or `max`). */
async function readHead(file: BlockNode, offset: number, max = MAX_DESC_BYTES): Promise<Uint8Array> {
  const n = Math.max(0, Math.min(file.size - offset, max));
  const buf = new Uint8Array(n);
  if (n > 0) await file.read(offset, buf);
  return buf;
}

function addExtent(st: OpenState, e: VmdkExtent): void {
  if (st.end + e.length > MAX_NODE_SIZE - 1) throw new CorruptImageError(`${st.image.name}: VMDK extents add up to more than 2^53 bytes`);
  st.extents.push(e);
  st.end += e.length;
}

/** A KDMV or COWD file; returns the create type it implies. */
async function openSparse(st: OpenState, file: BlockNode, head: Uint8Array, type: string, depth: number): Promise<string> {
  const name = file.name;
  if (be32(head) === VMDK3_MAGIC) {
    const h = parseVmdk3Header(head, name);
    addExtent(st, await SparseExtent.open({ file, name, start: st.end, header: h, type, cacheBytes: st.cacheBytes }));
    return 'monolithicSparse';
  }
  if (head.length < 79) throw new CorruptImageError(`${name}: VMDK header truncated`);
  const peek = peekVmdk4(head);
  if (peek.capacity === 0n && peek.descOffset !== 0n) {
    // A sparse file whose descriptor names the extents (vmdk_open_vmdk4, capacity 0).
    if (depth > 0) throw new UnsupportedError(`${name}: nested VMDK descriptors are not supported`);
    if (peek.descOffset > BigInt(Math.floor(file.size / 512))) throw new CorruptImageError(`${name}: VMDK descriptor offset lies outside the file`);
    const text = cString(await readHead(file, Number(peek.descOffset) * 512));
    return openDescriptor(st, text, depth + 1);
  }
  const h = await readVmdk4Header(file, head, name);
  const e = await SparseExtent.open({ file, name, start: st.end, header: h, type, cacheBytes: st.cacheBytes });
  addExtent(st, e);
  return e.compressed ? 'streamOptimized' : 'monolithicSparse';
}

async function openExtentFile(st: OpenState, fileName: string): Promise<BlockNode> {
  const name = st.image.name;
  if (!st.opts.openFile) throw new UnsupportedError(`${name}: this VMDK names extent files, which cannot be opened here`);
  const known = st.byName.get(fileName);
  if (known) return known;
  try {
    const node = await st.opts.openFile(fileName, 'extent');
    st.opened.push(node);
    st.byName.set(fileName, node);
    return node;
  } catch (err) {
    if (err instanceof UntrustedFileError) throw err;
    const message = `${name}: cannot open VMDK extent '${fileName}': ${messageOf(err)}`;
    throw err instanceof TsmountError ? err.withMessage(message) : new UsageError(message, undefined, { cause: err });
  }
}

async function openDescriptor(st: OpenState, text: string, depth: number): Promise<string> {
  const d = parseDescriptor(text, st.image.name);
  st.cacheBytes = Math.floor(st.opts.metadataCacheBytes / Math.max(1, d.extents.length));
  for (const line of d.extents) {
    // As QEMU (vmdk_open_se_sparse): no write support for seSparse; refused before the extent is opened for writing.
    if (line.type === 'SESPARSE' && !st.opts.readOnly) {
      throw new UnsupportedError(`${st.image.name}: VMDK seSparse extent '${line.fileName}' can only be opened read-only (no write support)`);
    }
    const again = st.byName.has(line.fileName);
    const file = await openExtentFile(st, line.fileName);
    // Two sparse extents in one file would each allocate at its end, over the other's grains.
    if (again && line.type !== 'FLAT' && line.type !== 'VMFS' && !st.opts.readOnly) {
      throw new UnsupportedError(`${st.image.name}: VMDK names the sparse extent '${line.fileName}' more than once: it can only be opened read-only`);
    }
    if (line.type === 'SESPARSE') {
      addExtent(st, await SeSparseExtent.open({ file, start: st.end, type: line.type, cacheBytes: st.cacheBytes }));
      continue;
    }
    if (line.type === 'FLAT' || line.type === 'VMFS') {
      addExtent(st, new FlatExtent(file, st.end, line.sectors * 512, line.flatOffset, line.type));
      continue;
    }
    if (file.size < 4) throw new CorruptImageError(`${file.name}: file is too small, not a valid VMDK extent`);
    // Its header only: a descriptor listing one file thousands of times reads it as often.
    const head = await readHead(file, 0, SPARSE_HEAD_BYTES);
    const m = be32(head);
    if (m !== VMDK3_MAGIC && m !== VMDK4_MAGIC) throw new CorruptImageError(`${file.name}: VMDK extent is not in VMDK format`);
    await openSparse(st, file, head, line.type, depth);
  }
  return d.createType;
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  if (file.size < 4) throw new CorruptImageError(`${name}: file is too small, not a valid VMDK image`);
  const st: OpenState = { opts, image: file, opened: [], byName: new Map(), extents: [], end: 0, cacheBytes: opts.metadataCacheBytes };
  let backing: BlockNode | undefined;
  try {
    const head = await readHead(file, 0);
    const m = be32(head);
    let createType: string;
    let descOffset: number;
    if (m === VMDK3_MAGIC || m === VMDK4_MAGIC) {
      createType = await openSparse(st, file, head, '', 0);
      descOffset = 0x200;
    } else {
      createType = await openDescriptor(st, cString(head), 0);
      descOffset = 0;
    }

    const area = new Uint8Array(DESC_SIZE);
    const avail = Math.max(0, Math.min(DESC_SIZE, file.size - descOffset));
    if (avail > 0) await file.read(descOffset, area.subarray(0, avail));
    const cid = readCid(area, false);
    const parentCid = readCid(area, true);
    if (cid === undefined || parentCid === undefined) throw new CorruptImageError(`${name}: VMDK descriptor has no ${cid === undefined ? 'CID' : 'parentCID'}`);
    const hint = parentHint(area, name);

    if (!opts.readOnly) {
      for (const e of st.extents) {
        if (!(e instanceof SparseExtent)) continue;
        if (e.version === 3 && !e.compressed) throw new UnsupportedError(`${e.file.name}: VMDK version 3 must be read only`);
        if (e.compressed && e.gdAtEnd) {
          throw new UnsupportedError(`${e.file.name}: streamOptimized VMDK with its grain directory in a footer can only be opened read-only (convert it to write)`);
        }
        if (e.compressed && !e.hasMarker) throw new UnsupportedError(`${e.file.name}: compressed VMDK without grain markers can only be opened read-only`);
      }
    }

    if (hint !== undefined && hint !== '' && !opts.noBacking) {
      backing = await opts.openBacking(hint, 'vmdk');
      const backingCid = backing.vmdkCid;
      if (backingCid !== parentCid) {
        const theirs = backingCid === undefined ? 'no CID' : `CID ${backingCid.toString(16)}`;
        throw new CorruptImageError(`${name}: parentCID ${parentCid.toString(16)} does not match ${theirs} of backing file '${hint}' (the backing file changed after this image was made)`);
      }
    }

    // Each extent file's name as the descriptor gives it (block status's, info's).
    const fileNames = new Map([...st.byName].map(([n, f]) => [f, n]));
    const node = new VmdkNode({
      file,
      extents: st.extents,
      readOnly: opts.readOnly,
      backing,
      descOffset,
      cid,
      parentCid,
      createType,
      barriers: opts.cache !== 'unsafe',
      fileNames,
    });
    // vmdk_get_info: the first extent's grain when it is sparse; a parent is always opened as vmdk.
    const first = st.extents[0];
    return node.describedAs({
      clusterSize: first instanceof SparseExtent ? first.grainBytes : undefined,
      dirty: false,
      backingFile: hint || undefined,
      backingFormat: hint ? 'vmdk' : undefined,
      otherFiles: st.opened.map((f) => f.name),
      formatSpecific: { type: 'vmdk', data: { cid, 'parent-cid': parentCid, 'create-type': createType, extents: st.extents.map((e) => extentInfo(st.image, fileNames, e)) } },
    });
  } catch (err) {
    await backing?.close().catch(() => undefined);
    for (const f of st.opened) await f.close().catch(() => undefined);
    throw err;
  }
}

/** An extent as qemu-img info lists it (vmdk_get_extent_info), its keys in QEMU's order. */
function extentInfo(image: BlockNode, fileNames: ReadonlyMap<BlockNode, string>, e: VmdkExtent): Record<string, unknown> {
  // From the image's folder (ImageDescription.formatSpecific): the descriptor's name, or
  // the image file's own for an extent in it. tsimg info puts the folder of the name as
  // typed in front, as QEMU's node for the file has it (path_combine).
  const filename = (e.file !== image ? fileNames.get(e.file) : undefined) ?? path.basename(e.file.name);
  const grain = e instanceof SparseExtent ? e.grainBytes : e instanceof SeSparseExtent ? SESPARSE_GRAIN : undefined;
  return {
    ...(e instanceof SparseExtent && e.compressed ? { compressed: true } : {}),
    'virtual-size': e.length,
    filename,
    ...(grain !== undefined ? { 'cluster-size': grain } : {}),
    format: e.type,
  };
}

export const vmdkDriver: FormatDriver & Creatable = {
  name: 'vmdk',
  probe,
  open,
  createOptions: VMDK_CREATE_OPTIONS,
  create: createVmdk,
};
