// A small sheep daemon for the tests, from the same protocol description as the client
// (sheepdog's include/sheepdog_proto.h and sheep/vdi.c's behaviour as QEMU 5.2's
// block/sheepdog.c relies on it): one process-local store of VDIs and objects, served
// over TCP or a Unix socket. Lookup (by name, tag or snapshot id), lock and release,
// NEW_VDI (create, clone from a snapshot, snapshot), object read, write, create and
// copy-on-write, flush, the cluster default. Sheepdog itself is gone from Debian and
// QEMU (removed in 6.0), so this is what the client is tested against.
import fs from 'node:fs';
import net from 'node:net';
import {
  decodeInodeHeader,
  decodeRequest,
  encodeInodeHeader,
  encodeResponse,
  fnv64a,
  isDataOid,
  MessageParser,
  oidToVid,
  parseNameTag,
  SD_DEFAULT_BLOCK_SIZE_SHIFT,
  SD_FLAG_CMD_COW,
  SD_INODE_HEADER_SIZE,
  SD_NR_VDIS,
  SD_OP_CREATE_AND_WRITE_OBJ,
  SD_OP_FLUSH_VDI,
  SD_OP_GET_CLUSTER_DEFAULT,
  SD_OP_GET_VDI_INFO,
  SD_OP_LOCK_VDI,
  SD_OP_NEW_VDI,
  SD_OP_READ_OBJ,
  SD_OP_RELEASE_VDI,
  SD_OP_WRITE_OBJ,
  SD_PROTO_VER,
  SD_RES_INVALID_PARMS,
  SD_RES_NO_BASE_VDI,
  SD_RES_NO_OBJ,
  SD_RES_NO_TAG,
  SD_RES_NO_VDI,
  SD_RES_SUCCESS,
  SD_RES_VDI_EXIST,
  SD_RES_VDI_LOCKED,
  SD_RES_VDI_NOT_LOCKED,
  SD_RES_VER_MISMATCH,
  type Request,
  type Response,
} from '../../drivers/protocol/sheepdog/proto.js';

/** A VDI's inode object: the header and as much of data_vdi_id as its size needs. */
interface Vdi {
  inode: Buffer;
}

export interface SheepServer {
  /** TCP port, or the Unix socket path. */
  port?: number;
  socketPath?: string;
  /** Requests seen, by opcode (tests check what the client asked). */
  ops: number[];
  /** VDIs by vid, their inode objects. */
  vdis: Map<number, Vdi>;
  /** Data objects by oid. */
  objects: Map<bigint, Buffer>;
  close(): Promise<void>;
}

const MAX_WRITE = 1 << 26;

export async function startSheep(opts: { socketPath?: string } = {}): Promise<SheepServer> {
  const vdis = new Map<number, Vdi>();
  const objects = new Map<bigint, Buffer>();
  // By vid, as sheep's vdi_state: a snapshot and the current VDI of one name lock apart.
  const locks = new Set<number>();
  const ops: number[] = [];
  const sockets = new Set<net.Socket>();

  const header = (v: Vdi) => decodeInodeHeader(v.inode);
  const objectSize = (v: Vdi) => 2 ** (header(v).blockSizeShift || SD_DEFAULT_BLOCK_SIZE_SHIFT);

  function find(name: string, tag: string, snapid: number): { vid?: number; result: number } {
    const named = [...vdis.entries()].filter(([, v]) => header(v).name === name);
    if (!named.length) return { result: SD_RES_NO_VDI };
    let hit: [number, Vdi] | undefined;
    if (tag) {
      hit = named.find(([, v]) => header(v).tag === tag && header(v).snapCtime !== 0n);
      if (!hit) return { result: SD_RES_NO_TAG };
    } else if (snapid) {
      hit = named.find(([, v]) => header(v).snapId === snapid);
      if (!hit) return { result: SD_RES_NO_VDI };
    } else {
      hit = named.find(([, v]) => header(v).snapCtime === 0n);
      if (!hit) return { result: SD_RES_NO_VDI };
    }
    return { vid: hit[0], result: SD_RES_SUCCESS };
  }

  /** sheep's vid allocation: the name's FNV-1a hash, then the next free one. */
  function freeVid(name: string): number {
    let vid = Number(fnv64a(Buffer.from(name)) & BigInt(SD_NR_VDIS - 1));
    while (vid === 0 || vdis.has(vid)) vid = (vid + 1) % SD_NR_VDIS;
    return vid;
  }

  function newVdi(r: Request, name: string): { vid?: number; result: number } {
    const size = r.vdiSize ?? 0;
    const shift = r.blockSizeShift || SD_DEFAULT_BLOCK_SIZE_SHIFT;
    const count = Math.ceil(size / 2 ** shift);
    let base: Vdi | undefined;
    if (r.baseVdiId) {
      base = vdis.get(r.baseVdiId);
      if (!base) return { result: SD_RES_NO_BASE_VDI };
    }
    const now = BigInt(Math.floor(Date.now() / 1000)) << 32n;
    if (r.snapid) {
      // Snapshot: the base, the current VDI of this name, becomes the snapshot.
      if (!base || header(base).name !== name || header(base).snapCtime !== 0n) return { result: SD_RES_INVALID_PARMS };
      const bh = header(base);
      encodeInodeHeader({ ...bh, snapCtime: now }, base.inode);
    } else if (find(name, '', 0).result === SD_RES_SUCCESS) {
      return { result: SD_RES_VDI_EXIST };
    }
    const vid = freeVid(name);
    const inode = Buffer.alloc(SD_INODE_HEADER_SIZE + 4 * count);
    const bh = base && header(base);
    encodeInodeHeader(
      {
        name,
        tag: '',
        ctime: now,
        snapCtime: 0n,
        vdiSize: size,
        copyPolicy: r.copyPolicy ?? 0,
        nrCopies: r.copies || 3,
        blockSizeShift: shift,
        snapId: r.snapid && bh ? bh.snapId + 1 : 1,
        vdiId: vid,
        parentVdiId: r.baseVdiId ?? 0,
      },
      inode,
    );
    // A clone or the new current VDI starts with the base's objects (copied on write).
    if (base) base.inode.copy(inode, SD_INODE_HEADER_SIZE, SD_INODE_HEADER_SIZE, Math.min(base.inode.length, inode.length));
    vdis.set(vid, { inode });
    return { vid, result: SD_RES_SUCCESS };
  }

  function handle(r: Request, data: Buffer): { rsp: Omit<Response, 'id' | 'dataLength' | 'opcode'>; data?: Buffer } {
    ops.push(r.opcode);
    if (r.protoVer !== SD_PROTO_VER) return { rsp: { result: SD_RES_VER_MISMATCH } };
    switch (r.opcode) {
      case SD_OP_GET_VDI_INFO:
      case SD_OP_LOCK_VDI: {
        const { name, tag } = parseNameTag(data);
        const f = find(name, tag, r.snapid ?? 0);
        if (f.result !== SD_RES_SUCCESS) return { rsp: { result: f.result } };
        if (r.opcode === SD_OP_LOCK_VDI) {
          if (locks.has(f.vid!)) return { rsp: { result: SD_RES_VDI_LOCKED } };
          locks.add(f.vid!);
        }
        return { rsp: { result: SD_RES_SUCCESS, vdiId: f.vid } };
      }
      case SD_OP_RELEASE_VDI: {
        const { name } = parseNameTag(data);
        const vid = r.baseVdiId || find(name, '', 0).vid;
        if (vid === undefined || !locks.delete(vid)) return { rsp: { result: SD_RES_VDI_NOT_LOCKED } };
        return { rsp: { result: SD_RES_SUCCESS } };
      }
      case SD_OP_NEW_VDI: {
        const { name } = parseNameTag(data);
        if (!name) return { rsp: { result: SD_RES_INVALID_PARMS } };
        const made = newVdi(r, name);
        return { rsp: { result: made.result, vdiId: made.vid } };
      }
      case SD_OP_GET_CLUSTER_DEFAULT:
        return { rsp: { result: SD_RES_SUCCESS, nrCopies: 3, blockSizeShift: SD_DEFAULT_BLOCK_SIZE_SHIFT } };
      case SD_OP_FLUSH_VDI:
        return { rsp: { result: vdis.has(oidToVid(r.oid ?? 0n)) ? SD_RES_SUCCESS : SD_RES_NO_VDI } };
      case SD_OP_READ_OBJ:
      case SD_OP_WRITE_OBJ:
      case SD_OP_CREATE_AND_WRITE_OBJ:
        return objectOp(r, data);
      default:
        return { rsp: { result: SD_RES_INVALID_PARMS } };
    }
  }

  function objectOp(r: Request, data: Buffer): { rsp: Omit<Response, 'id' | 'dataLength' | 'opcode'>; data?: Buffer } {
    const oid = r.oid ?? 0n;
    const offset = r.offset ?? 0;
    let target: Buffer | undefined;
    if (isDataOid(oid)) {
      const owner = vdis.get(oidToVid(oid));
      if (!owner) return { rsp: { result: SD_RES_NO_OBJ } };
      if (r.opcode === SD_OP_CREATE_AND_WRITE_OBJ) {
        let obj = Buffer.alloc(objectSize(owner));
        if (r.flags! & SD_FLAG_CMD_COW) {
          const from = objects.get(r.cowOid ?? 0n);
          if (!from) return { rsp: { result: SD_RES_NO_OBJ } };
          obj = Buffer.from(from);
        }
        objects.set(oid, obj);
      }
      target = objects.get(oid);
    } else {
      // The inode object: reads past what is kept are zeros (an unused table).
      target = vdis.get(oidToVid(oid))?.inode;
      if (target && r.opcode === SD_OP_READ_OBJ && offset + r.dataLength > target.length) {
        const out = Buffer.alloc(r.dataLength);
        if (offset < target.length) target.copy(out, 0, offset);
        return { rsp: { result: SD_RES_SUCCESS }, data: out };
      }
    }
    if (!target) return { rsp: { result: SD_RES_NO_OBJ } };
    if (r.opcode === SD_OP_READ_OBJ) {
      if (offset + r.dataLength > target.length) return { rsp: { result: SD_RES_INVALID_PARMS } };
      return { rsp: { result: SD_RES_SUCCESS }, data: Buffer.from(target.subarray(offset, offset + r.dataLength)) };
    }
    if (offset + data.length > target.length) return { rsp: { result: SD_RES_INVALID_PARMS } };
    data.copy(target, offset);
    return { rsp: { result: SD_RES_SUCCESS } };
  }

  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    const parser = new MessageParser(decodeRequest, () => MAX_WRITE, true);
    socket.on('data', (chunk: Buffer) => {
      let msgs;
      try {
        msgs = parser.push(chunk);
      } catch {
        socket.destroy();
        return;
      }
      for (const { header: r, data } of msgs) {
        const out = handle(r, data);
        socket.write(Buffer.concat([encodeResponse({ ...out.rsp, opcode: r.opcode, id: r.id, dataLength: out.data?.length ?? 0 }), out.data ?? Buffer.alloc(0)]));
      }
    });
  });
  if (opts.socketPath) {
    fs.rmSync(opts.socketPath, { force: true });
    await new Promise<void>((resolve) => server.listen(opts.socketPath, resolve));
  } else {
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  }
  const addr = server.address();
  return {
    port: typeof addr === 'object' && addr ? addr.port : undefined,
    socketPath: opts.socketPath,
    ops,
    vdis,
    objects,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (opts.socketPath) fs.rmSync(opts.socketPath, { force: true });
    },
  };
}
