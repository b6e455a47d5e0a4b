// A Sheepdog VDI as a protocol node, as QEMU's block/sheepdog.c drives it: look the
// VDI up and lock it (sd_open locks whether or not it writes), read its inode (the header and the
// data_vdi_id table, one entry per object), then read and write objects. An object
// the table gives to another VDI (a parent snapshot) is copied on write: created in
// this VDI with SD_FLAG_CMD_COW from the parent's object, and the table entry written
// back to the inode. Snapshots and clones are new VDIs made by SD_OP_NEW_VDI.
import type { Extent, SnapshotControl, TruncateOptions } from '../../types.js';
import { MAX_NODE_SIZE } from '../../types.js';
import { IoError, LockedError, ProtocolError, ReadOnlyError, UnsupportedError, UsageError } from '../../errors.js';
import { refusePreallocation } from '../../resize.js';
import { Mutex } from '../../util/mutex.js';
import { SheepConnection } from './client.js';
import { RemoteNode } from '../remote-node.js';
import {
  decodeInodeHeader,
  encodeInodeHeader,
  LOCK_TYPE_NORMAL,
  MAX_DATA_OBJS,
  nameTagData,
  objectSizeOf,
  parseSheepdogUri,
  resultText,
  SD_DEFAULT_BLOCK_SIZE_SHIFT,
  SD_FLAG_CMD_CACHE,
  SD_FLAG_CMD_COW,
  SD_FLAG_CMD_DIRECT,
  SD_FLAG_CMD_WRITE,
  SD_INODE_HEADER_SIZE,
  SD_OP_CREATE_AND_WRITE_OBJ,
  SD_OP_FLUSH_VDI,
  SD_OP_GET_CLUSTER_DEFAULT,
  SD_OP_GET_VDI_INFO,
  SD_OP_LOCK_VDI,
  SD_OP_NEW_VDI,
  SD_OP_READ_OBJ,
  SD_OP_RELEASE_VDI,
  SD_OP_WRITE_OBJ,
  SD_RES_NO_TAG,
  SD_RES_NO_VDI,
  SD_RES_SUCCESS,
  SD_RES_VDI_EXIST,
  SD_RES_VDI_LOCKED,
  SD_RES_VDI_NOT_LOCKED,
  SD_MAX_VDI_LEN,
  vidToDataOid,
  vidToVdiOid,
  type InodeHeader,
  type SheepdogTarget,
} from './proto.js';

export interface SheepdogOpenOptions {
  readOnly: boolean;
  /** cache=none/directsync: SD_FLAG_CMD_DIRECT (bypass the sheep's object cache). */
  direct?: boolean;
  ignoreFlush?: boolean;
}

function lookupError(spec: string, t: { vdi: string; tag: string; snapId: number }, result: number): Error {
  if (result === SD_RES_NO_VDI) return new UsageError(`${spec}: no VDI named '${t.vdi}'${t.snapId ? ` with snapshot id ${t.snapId}` : ''}`, 2);
  if (result === SD_RES_NO_TAG) return new UsageError(`${spec}: VDI '${t.vdi}' has no snapshot tagged '${t.tag}'`, 2);
  if (result === SD_RES_VDI_LOCKED) return new LockedError(`${spec}: VDI '${t.vdi}' is locked by another client (open it read-only, or stop the other one)`);
  return new IoError(`${spec}: cannot get VDI info: ${resultText(result)}`);
}

/** SD_OP_GET_VDI_INFO, or SD_OP_LOCK_VDI with `lock`: the vid of a VDI, a snapshot by tag or by id. */
async function lookup(conn: SheepConnection, spec: string, t: { vdi: string; tag: string; snapId: number }, lock: boolean): Promise<number> {
  const { rsp } = await conn.request(
    { opcode: lock ? SD_OP_LOCK_VDI : SD_OP_GET_VDI_INFO, flags: SD_FLAG_CMD_WRITE, snapid: t.snapId, type: LOCK_TYPE_NORMAL },
    nameTagData(t.vdi, t.tag),
  );
  if (rsp.result !== SD_RES_SUCCESS) throw lookupError(spec, t, rsp.result);
  return rsp.vdiId ?? 0;
}

async function readObject(conn: SheepConnection, what: string, oid: bigint, offset: number, length: number, flags: number): Promise<Buffer> {
  const { rsp, data } = await conn.request({ opcode: SD_OP_READ_OBJ, flags, oid, offset }, undefined, length);
  if (rsp.result !== SD_RES_SUCCESS) throw new IoError(`${what}: reading object ${oid.toString(16)} failed: ${resultText(rsp.result)}`);
  if (data.length !== length) throw new ProtocolError(`${what}: sheep sent ${data.length} bytes of object ${oid.toString(16)}, not ${length}`);
  return data;
}

async function writeObject(conn: SheepConnection, what: string, oid: bigint, offset: number, data: Uint8Array, o: { create?: boolean; cowOid?: bigint; flags: number; copies: number; copyPolicy: number }): Promise<void> {
  const { rsp } = await conn.request(
    {
      opcode: o.create ? SD_OP_CREATE_AND_WRITE_OBJ : SD_OP_WRITE_OBJ,
      flags: SD_FLAG_CMD_WRITE | o.flags | (o.cowOid ? SD_FLAG_CMD_COW : 0),
      oid,
      cowOid: o.cowOid ?? 0n,
      copies: o.copies,
      copyPolicy: o.copyPolicy,
      offset,
    },
    data,
  );
  if (rsp.result !== SD_RES_SUCCESS) throw new IoError(`${what}: writing object ${oid.toString(16)} failed: ${resultText(rsp.result)}`);
}

/** The inode of a vid: its header, checked and capped, and its data_vdi_id table. */
async function readInode(conn: SheepConnection, spec: string, vid: number, flags: number): Promise<{ header: InodeHeader; objectSize: number; table: Uint32Array }> {
  const header = decodeInodeHeader(await readObject(conn, spec, vidToVdiOid(vid), 0, SD_INODE_HEADER_SIZE, flags));
  if (header.vdiId !== vid) throw new ProtocolError(`${spec}: inode of VDI ${vid} says it is VDI ${header.vdiId}`);
  const objectSize = objectSizeOf(header);
  if (!(header.vdiSize >= 0 && header.vdiSize <= Math.min(MAX_NODE_SIZE, objectSize * MAX_DATA_OBJS))) {
    throw new ProtocolError(`${spec}: VDI size ${header.vdiSize} is more than ${objectSize} * ${MAX_DATA_OBJS}`);
  }
  const count = Math.ceil(header.vdiSize / objectSize);
  const raw = count ? await readObject(conn, spec, vidToVdiOid(vid), SD_INODE_HEADER_SIZE, 4 * count, flags) : Buffer.alloc(0);
  const table = new Uint32Array(count);
  for (let i = 0; i < count; i++) table[i] = raw.readUInt32LE(4 * i);
  return { header, objectSize, table };
}

export class SheepdogNode extends RemoteNode {
  private readonly allocation = new Mutex();

  private constructor(
    name: string,
    private readonly target: SheepdogTarget,
    private readonly conn: SheepConnection,
    private header: InodeHeader,
    private readonly objectSize: number,
    private readonly table: Uint32Array,
    readOnly: boolean,
    /** The vid this node locked (a snapshot taken later moves the node to another). */
    private readonly lockedVid: number,
    private readonly cacheFlags: number,
    ignoreFlush: boolean,
  ) {
    super(name, readOnly, ignoreFlush);
  }

  static async open(spec: string, opts: SheepdogOpenOptions): Promise<SheepdogNode> {
    const t = parseSheepdogUri(spec);
    const snapshot = t.tag !== '' || t.snapId !== 0;
    if (snapshot && !opts.readOnly) throw new ReadOnlyError(`${spec}: a snapshot is read-only; clone it to write (tsimg create -b ${spec} sheepdog:///NEW)`);
    const conn = await SheepConnection.connect(t, spec);
    let vid = 0;
    try {
      // As QEMU's sd_open (find_vdi_name with lock set): read-only opens lock too, so
      // a VDI in use by another client is refused whether we would write or not.
      vid = await lookup(conn, spec, t, true);
      const cacheFlags = opts.direct ? SD_FLAG_CMD_DIRECT : SD_FLAG_CMD_CACHE;
      const { header, objectSize, table } = await readInode(conn, spec, vid, cacheFlags);
      return new SheepdogNode(spec, t, conn, header, objectSize, table, opts.readOnly, vid, cacheFlags, !!opts.ignoreFlush);
    } catch (err) {
      if (vid) await release(conn, t.vdi, vid).catch(() => undefined);
      conn.close();
      throw err;
    }
  }

  get size(): number {
    return this.header.vdiSize;
  }

  /** The VDI this node reads and writes (it changes when a snapshot is taken). */
  get vdiId(): number {
    return this.header.vdiId;
  }

  /** Each object-sized piece of [offset, offset+length): its index and the range inside it. */
  private *pieces(offset: number, length: number): Generator<{ idx: number; at: number; len: number; done: number }> {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const idx = Math.floor(pos / this.objectSize);
      const at = pos - idx * this.objectSize;
      const len = Math.min(length - done, this.objectSize - at);
      yield { idx, at, len, done };
      done += len;
    }
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    await Promise.all(
      [...this.pieces(offset, dst.length)].map(async ({ idx, at, len, done }) => {
        const owner = this.table[idx] ?? 0;
        const out = dst.subarray(done, done + len);
        if (owner === 0) {
          out.fill(0);
          return;
        }
        out.set(await readObject(this.conn, this.name, vidToDataOid(owner, idx), at, len, this.cacheFlags));
      }),
    );
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    this.dirty = true;
    await Promise.all([...this.pieces(offset, src.length)].map(({ idx, at, len, done }) => this.writePiece(idx, at, src.subarray(done, done + len))));
  }

  private async writePiece(idx: number, at: number, data: Uint8Array): Promise<void> {
    const vid = this.header.vdiId;
    const common = { flags: this.cacheFlags, copies: this.header.nrCopies, copyPolicy: this.header.copyPolicy };
    if (this.table[idx] === vid) return writeObject(this.conn, this.name, vidToDataOid(vid, idx), at, data, common);
    // A new object, or one of a parent VDI copied on write: one at a time, so two
    // writes into the same new object do not both create it.
    return this.allocation.run(async () => {
      const owner = this.table[idx]!;
      if (owner === vid) return writeObject(this.conn, this.name, vidToDataOid(vid, idx), at, data, common);
      await writeObject(this.conn, this.name, vidToDataOid(vid, idx), at, data, { ...common, create: true, cowOid: owner ? vidToDataOid(owner, idx) : undefined });
      const entry = Buffer.alloc(4);
      entry.writeUInt32LE(vid);
      await writeObject(this.conn, this.name, vidToVdiOid(vid), SD_INODE_HEADER_SIZE + 4 * idx, entry, common);
      this.table[idx] = vid;
    });
  }

  /** SD_OP_FLUSH_VDI writes the sheep's object cache back; with cache=none (direct) there is none. */
  protected async sync(): Promise<void> {
    if (this.cacheFlags !== SD_FLAG_CMD_CACHE) return;
    const { rsp } = await this.conn.request({ opcode: SD_OP_FLUSH_VDI, oid: vidToVdiOid(this.header.vdiId) });
    if (rsp.result !== SD_RES_SUCCESS) throw new IoError(`${this.name}: flush failed: ${resultText(rsp.result)}`);
  }

  /** Objects in the table hold data (this VDI's or a parent's); the rest reads as zeros. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    for (const { idx, len, done } of this.pieces(offset, length)) {
      const kind = this.table[idx] ? 'data' : 'zero';
      const last = out[out.length - 1];
      if (last && last.kind === kind) last.length += len;
      else out.push({ offset: offset + done, length: len, kind });
    }
    return out;
  }

  /** Grow the VDI (sd_truncate): the inode's vdi_size, for tsimg create and --growable. */
  async truncate(size: number, o?: TruncateOptions): Promise<void> {
    refusePreallocation(o);
    if (size < this.size) throw new UsageError(`${this.name}: a Sheepdog VDI cannot shrink`);
    if (size > this.objectSize * MAX_DATA_OBJS || size > MAX_NODE_SIZE) throw new UsageError(`${this.name}: ${size} bytes is more than a VDI can hold`);
    if (size === this.size) return;
    if (Math.ceil(size / this.objectSize) > this.table.length) throw new UsageError(`${this.name}: growing past the objects the VDI was opened with needs a reopen`);
    const header = { ...this.header, vdiSize: size };
    this.dirty = true;
    await writeObject(this.conn, this.name, vidToVdiOid(header.vdiId), 0, encodeInodeHeader(header), { flags: this.cacheFlags, copies: header.nrCopies, copyPolicy: header.copyPolicy });
    this.header = header;
  }

  /**
   * Take a snapshot named `tag` (sd_snapshot_create): the tag is written into the
   * current inode, SD_OP_NEW_VDI with snapid set turns that VDI into the snapshot and
   * makes a new current VDI of the same name whose objects are the snapshot's (copied
   * on write). This node goes on with the new VDI.
   */
  /** What `tsimg snapshot` reaches: Sheepdog snapshots are taken here; deleting and reverting are the sheep tool's (dog vdi). */
  get snapshotControl(): SnapshotControl {
    const refuse = (what: string) => (name: string): Promise<void> =>
      Promise.reject(new UnsupportedError(`${this.name}: tsmount does not ${what} Sheepdog snapshots ('${name}'); clone the snapshot instead (tsimg create -b IMAGE#TAG NEW)`));
    return { create: (tag) => this.createSnapshot(tag), remove: refuse('delete'), apply: refuse('revert to') };
  }

  async createSnapshot(tag: string): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: a snapshot needs the VDI opened read-write`);
    if (!tag || Buffer.byteLength(tag) >= 256 || /^\d+$/.test(tag)) throw new UsageError(`${this.name}: '${tag}' is not a valid snapshot tag`);
    await this.flush();
    const tagged = { ...this.header, tag };
    const common = { flags: this.cacheFlags, copies: tagged.nrCopies, copyPolicy: tagged.copyPolicy };
    await writeObject(this.conn, this.name, vidToVdiOid(tagged.vdiId), 0, encodeInodeHeader(tagged), common);
    this.dirty = true;
    const vid = await newVdi(this.conn, this.name, { name: tagged.name, size: tagged.vdiSize, baseVdiId: tagged.vdiId, snapshot: true, copies: tagged.nrCopies, copyPolicy: tagged.copyPolicy, blockSizeShift: tagged.blockSizeShift });
    const { header } = await readInode(this.conn, this.name, vid, this.cacheFlags);
    this.header = header;
  }

  protected async disconnect(): Promise<void> {
    try {
      await release(this.conn, this.target.vdi, this.lockedVid);
    } finally {
      this.conn.close();
    }
  }
}

/** SD_OP_RELEASE_VDI (sd_close): the name as data, the vid in base_vdi_id. */
async function release(conn: SheepConnection, vdi: string, vid = 0): Promise<void> {
  const name = Buffer.from(`${vdi}\0`);
  const { rsp } = await conn.request({ opcode: SD_OP_RELEASE_VDI, flags: SD_FLAG_CMD_WRITE, baseVdiId: vid, type: LOCK_TYPE_NORMAL }, name);
  if (rsp.result !== SD_RES_SUCCESS && rsp.result !== SD_RES_VDI_NOT_LOCKED) process.stderr.write(`tsmount: ${vdi}: releasing the VDI lock: ${resultText(rsp.result)}\n`);
}

/** SD_OP_NEW_VDI (do_sd_create): a new VDI, a clone of base, or (snapshot) a snapshot of base. */
async function newVdi(
  conn: SheepConnection,
  spec: string,
  o: { name: string; size: number; baseVdiId: number; snapshot: boolean; copies: number; copyPolicy: number; blockSizeShift: number },
): Promise<number> {
  const { rsp } = await conn.request(
    { opcode: SD_OP_NEW_VDI, flags: SD_FLAG_CMD_WRITE, vdiSize: o.size, baseVdiId: o.baseVdiId, snapid: o.snapshot ? 1 : 0, copies: o.copies, copyPolicy: o.copyPolicy, blockSizeShift: o.blockSizeShift },
    nameTagData(o.name, '', false),
  );
  if (rsp.result === SD_RES_VDI_EXIST) throw new UsageError(`${spec}: a VDI named '${o.name}' exists already`);
  if (rsp.result !== SD_RES_SUCCESS) throw new IoError(`${spec}: creating the VDI failed: ${resultText(rsp.result)}`);
  return rsp.vdiId ?? 0;
}

/**
 * `tsimg create sheepdog:///NAME SIZE` (sd_create), or with `backing` a clone of a
 * snapshot (`-b sheepdog:///BASE#TAG`); returns the new VDI's size.
 */
export async function createVdi(spec: string, size: number | undefined, backing: string | undefined): Promise<number> {
  const t = parseSheepdogUri(spec);
  if (t.tag || t.snapId) throw new UsageError(`${spec}: a new VDI cannot name a snapshot`);
  if (Buffer.byteLength(t.vdi) >= SD_MAX_VDI_LEN) throw new UsageError(`${spec}: VDI name is too long`);
  const conn = await SheepConnection.connect(t, spec);
  try {
    let base = { vid: 0, size: 0, copies: 0, copyPolicy: 0, blockSizeShift: 0 };
    if (backing !== undefined) {
      let b: SheepdogTarget;
      try {
        b = parseSheepdogUri(backing);
      } catch {
        throw new UsageError(`${spec}: backing_file must be a sheepdog image, not '${backing}'`);
      }
      const vid = await lookup(conn, backing, b, false);
      const { header } = await readInode(conn, backing, vid, SD_FLAG_CMD_CACHE);
      if (header.snapCtime === 0n) throw new UsageError(`${spec}: cannot clone from a non snapshot vdi (${backing})`);
      base = { vid, size: header.vdiSize, copies: header.nrCopies, copyPolicy: header.copyPolicy, blockSizeShift: header.blockSizeShift };
    }
    const vdiSize = Math.ceil((size ?? base.size) / 512) * 512;
    if (size === undefined && backing === undefined) throw new UsageError(`${spec}: a Sheepdog VDI needs a size`);
    let shift = base.blockSizeShift;
    if (!shift) {
      const { rsp } = await conn.request({ opcode: SD_OP_GET_CLUSTER_DEFAULT });
      shift = rsp.result === SD_RES_SUCCESS && rsp.blockSizeShift ? rsp.blockSizeShift : SD_DEFAULT_BLOCK_SIZE_SHIFT;
    }
    if (shift < 20 || shift > 31) throw new ProtocolError(`${spec}: the cluster's object size 2^${shift} is outside 2^20..2^31`);
    if (vdiSize > 2 ** shift * MAX_DATA_OBJS) throw new UsageError(`${spec}: an image is too large; the maximum is ${(2 ** shift * MAX_DATA_OBJS) / 2 ** 30} GiB`);
    await newVdi(conn, spec, { name: t.vdi, size: vdiSize, baseVdiId: base.vid, snapshot: false, copies: base.copies, copyPolicy: base.copyPolicy, blockSizeShift: shift });
    return vdiSize;
  } finally {
    conn.close();
  }
}
