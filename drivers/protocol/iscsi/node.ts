// The iSCSI protocol node: one LUN of one target, over one session. Disks (device type
// 0) read and write with READ/WRITE(16), or (10) where the LUN refuses 16; CD-ROMs
// (type 5, 2048-byte blocks) are read-only and read with READ(10)/(12). Large requests
// are split at the LUN's block limits and kept in flight together. A dropped
// connection is logged in again and the commands it took are sent again.
import type { CacheMode } from '../../types.js';
import { IoError, ReadOnlyError, TsmountError, UsageError } from '../../errors.js';
import { constants as osc } from 'node:os';
import { inParallel, pieces } from '../parallel.js';
import { Reconnect, RemoteNode, remoteLog, withDeadline } from '../remote-node.js';
import { ConnectionLost, IscsiConnection, type ConnectOptions, type TaskRequest, type TaskResult } from './connection.js';
import * as scsi from './scsi.js';
import { loginSettings, parseIscsiSpec, redact } from './uri.js';

const E = osc.errno;

export interface IscsiOpenOptions {
  readOnly: boolean;
  cache: CacheMode;
  log?: (msg: string) => void;
  /** Connect + login limit; wrong hosts and targets fail within it. */
  timeoutMs?: number;
  /** How long a dropped connection is tried again before commands fail with EIO. */
  reconnectForMs?: number;
  env?: NodeJS.ProcessEnv;
}

const DEFAULT_TIMEOUT_MS = 8000;
const DEFAULT_RECONNECT_MS = 30_000;
const TASK_TIMEOUT_MS = 30_000;
/** One command moves at most this much (and less where the LUN's block limits say so). */
const MAX_REQUEST = 1 << 20;
/** Commands in flight for one call. */
const WINDOW = 8;
/** Sizes we believe: a block of 512 B to 64 KiB; the LUN under 2^53 bytes. */
const MAX_BLOCK = 65536;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class IscsiNode extends RemoteNode {
  private conn: IscsiConnection | undefined;
  private readonly reconnecting = new Reconnect<IscsiConnection>();
  private rwSize: 10 | 16 = 16;
  private writeSame = true;
  readonly size: number;
  readonly isCdrom: boolean;
  private readonly piece: number;

  private constructor(
    name: string,
    private readonly lun: number,
    private readonly connectOpts: ConnectOptions,
    private readonly reconnectForMs: number,
    conn: IscsiConnection,
    readonly blockSize: number,
    blocks: number,
    deviceType: number,
    readOnly: boolean,
    private readonly limits: scsi.BlockLimits,
    private readonly provisioning: scsi.Provisioning | undefined,
  ) {
    const isCdrom = deviceType === scsi.DEVICE_TYPE.CDROM;
    super(name, readOnly || isCdrom);
    this.isCdrom = isCdrom;
    this.conn = conn;
    this.size = blocks * blockSize;
    const byLimits = limits.maxTransfer > 0 ? limits.maxTransfer * blockSize : MAX_REQUEST;
    // READ(10) carries at most 65535 blocks.
    const lim = Math.min(MAX_REQUEST, byLimits, 65535 * blockSize);
    this.piece = Math.max(blockSize, lim - (lim % blockSize));
  }

  get requestAlignment(): number {
    return this.blockSize;
  }

  /** Negotiated session parameters (tests and messages). */
  get session(): IscsiConnection['params'] | undefined {
    return this.conn?.params;
  }

  static async open(spec: string, opts: IscsiOpenOptions): Promise<IscsiNode> {
    const t = parseIscsiSpec(spec);
    const login = loginSettings(t, opts.env);
    const name = redact(spec);
    const connectOpts: ConnectOptions = {
      host: t.host,
      port: t.port,
      targetName: t.iqn,
      initiatorName: login.initiatorName,
      user: login.user,
      password: login.password,
      targetUser: login.targetUser,
      targetPassword: login.targetPassword,
      headerDigest: login.headerDigest,
      timeoutMs: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      taskTimeoutMs: TASK_TIMEOUT_MS,
      name,
      log: opts.log ?? remoteLog,
    };
    const conn = await IscsiConnection.connect(connectOpts);
    try {
      // A command on a fresh session: retried past unit attentions, failing fast otherwise.
      const once = async (req: TaskRequest, what: string): Promise<TaskResult> => {
        for (let i = 0; ; i++) {
          const r = await withDeadline(conn.command(req), connectOpts.timeoutMs, () => new IoError(`${name}: no answer to ${what}`, E.ETIMEDOUT));
          const sense = r.status === scsi.STATUS.CHECK_CONDITION ? scsi.parseSense(r.senseData) : undefined;
          if (r.status === scsi.STATUS.GOOD) return r;
          if (i < 8 && (r.status === scsi.STATUS.BUSY || (sense && scsi.senseRetryable(sense)))) continue;
          throw commandError(name, what, t.lun, r.status, sense);
        }
      };
      const inq = new Uint8Array(96);
      const ir = await once({ lun: t.lun, cdb: scsi.inquiry(undefined, inq.length), dst: inq }, 'INQUIRY');
      const std = scsi.parseInquiry(inq.subarray(0, ir.received));
      if (std.qualifier !== 0) throw new UsageError(`${name}: LUN ${t.lun} does not exist on target ${t.iqn}`, E.ENXIO);
      if (std.deviceType !== scsi.DEVICE_TYPE.DISK && std.deviceType !== scsi.DEVICE_TYPE.CDROM) {
        throw new UsageError(`${name}: LUN ${t.lun} is a SCSI device of type ${std.deviceType}, not a disk or CD-ROM`, E.ENODEV);
      }
      const cd = std.deviceType === scsi.DEVICE_TYPE.CDROM;
      await once({ lun: t.lun, cdb: scsi.testUnitReady() }, 'TEST UNIT READY');
      let cap: scsi.Capacity | undefined;
      if (!cd) {
        const b = new Uint8Array(32);
        try {
          const r = await once({ lun: t.lun, cdb: scsi.readCapacity16(), dst: b }, 'READ CAPACITY(16)');
          cap = scsi.parseCapacity16(b.subarray(0, r.received));
        } catch (err) {
          if (!(err instanceof TsmountError) || (err.errno !== E.ENOTSUP && err.errno !== E.EINVAL)) throw err;
        }
      }
      let rwSize: 10 | 16 = 16;
      if (!cap) {
        const b = new Uint8Array(8);
        const r = await once({ lun: t.lun, cdb: scsi.readCapacity10(), dst: b }, 'READ CAPACITY(10)');
        cap = scsi.parseCapacity10(b.subarray(0, r.received));
        rwSize = 10;
      }
      if (cap.blockSize < 512 || cap.blockSize > MAX_BLOCK || cap.blockSize & (cap.blockSize - 1)) throw new IoError(`${name}: the LUN reports blocks of ${cap.blockSize} bytes`);
      if (cap.blocks * cap.blockSize > Number.MAX_SAFE_INTEGER) throw new IoError(`${name}: the LUN reports ${cap.blocks} blocks (too large)`);
      let limits: scsi.BlockLimits = { maxTransfer: 0, maxUnmapBlocks: 0, maxUnmapDescriptors: 0, maxWriteSame: 0 };
      let prov: scsi.Provisioning | undefined;
      if (!cd) {
        // VPD pages are optional: a LUN without them just gets the defaults.
        const vpd = async (page: number): Promise<Uint8Array | undefined> => {
          const b = new Uint8Array(252);
          try {
            const r = await once({ lun: t.lun, cdb: scsi.inquiry(page, b.length), dst: b }, `INQUIRY VPD 0x${page.toString(16)}`);
            return b.subarray(0, r.received);
          } catch (err) {
            if (err instanceof ConnectionLost) throw err;
            return undefined;
          }
        };
        const pages = await vpd(0x00);
        const have = pages ? scsi.parseSupportedPages(pages) : new Set<number>();
        if (have.has(0xb0)) {
          const b = await vpd(0xb0);
          if (b) limits = scsi.parseBlockLimits(b);
        }
        if (have.has(0xb2) && cap.lbpme) {
          const b = await vpd(0xb2);
          if (b) prov = scsi.parseProvisioning(b);
        }
      }
      const node = new IscsiNode(name, t.lun, connectOpts, opts.reconnectForMs ?? DEFAULT_RECONNECT_MS, conn, cap.blockSize, cap.blocks, std.deviceType, opts.readOnly, limits, prov);
      node.rwSize = rwSize;
      return node;
    } catch (err) {
      await conn.close().catch(() => undefined);
      throw err;
    }
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    const inside = this.inside(offset, dst);
    this.aligned(offset, inside);
    await inParallel(pieces(offset, inside, this.piece), WINDOW, async ([o, n]) => {
      const part = dst.subarray(o - offset, o - offset + n);
      await this.readWrite(false, o, part);
    });
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    this.writable();
    this.aligned(offset, src.length);
    if (offset + src.length > this.size) throw new IoError(`${this.name}: write past the end of the LUN`, E.ENOSPC);
    this.dirty = true;
    await inParallel(pieces(offset, src.length, this.piece), WINDOW, async ([o, n]) => {
      await this.readWrite(true, o, src.subarray(o - offset, o - offset + n));
    });
  }

  /** WRITE SAME(16) of a zero block (unmapping where the LUN reads unmapped blocks as zeros), else zeros written. */
  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    this.writable();
    this.aligned(offset, length);
    this.dirty = true;
    const bs = this.blockSize;
    const prov = this.provisioning;
    // UNMAP alone where the LUN reads unmapped blocks as zeros but has no WRITE SAME unmap.
    if (unmap && prov?.unmap && prov.zeroAfterUnmap && !prov.writeSame16Unmap) {
      const maxBlocks = Math.min(this.limits.maxUnmapBlocks || 65536, 1 << 22);
      for (let o = offset; o < offset + length; ) {
        const blocks = Math.min(maxBlocks, (offset + length - o) / bs);
        const u = scsi.unmap(o / bs, blocks);
        await this.run({ lun: this.lun, cdb: u.cdb, data: u.data }, 'UNMAP', o);
        o += blocks * bs;
      }
      return;
    }
    if (this.writeSame) {
      const useUnmap = unmap && !!prov?.writeSame16Unmap && prov.zeroAfterUnmap;
      const maxBlocks = Math.min(this.limits.maxWriteSame || 65536, 65536);
      try {
        for (let o = offset; o < offset + length; ) {
          const blocks = Math.min(maxBlocks, (offset + length - o) / bs);
          await this.run({ lun: this.lun, cdb: scsi.writeSame16(o / bs, blocks, useUnmap), data: new Uint8Array(bs) }, 'WRITE SAME(16)', o);
          o += blocks * bs;
        }
        return;
      } catch (err) {
        if (!(err instanceof TsmountError) || (err.errno !== E.ENOTSUP && err.errno !== E.EINVAL)) throw err;
        this.writeSame = false;
      }
    }
    await this.writeZeros(offset, length, this.piece);
  }

  protected async sync(): Promise<void> {
    try {
      await this.run({ lun: this.lun, cdb: scsi.synchronizeCache(10) }, 'SYNCHRONIZE CACHE', 0);
    } catch (err) {
      // A LUN without a cache to synchronize.
      if (!(err instanceof TsmountError && err.errno === E.ENOTSUP)) throw err;
    }
  }

  protected async disconnect(): Promise<void> {
    await this.reconnecting.settled();
    await this.conn?.close();
  }

  private writable(): void {
    if (this.isCdrom) throw new ReadOnlyError(`${this.name}: a CD-ROM LUN is read-only`, E.EROFS);
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: opened read-only`, E.EROFS);
  }

  private aligned(offset: number, length: number): void {
    if (offset % this.blockSize || length % this.blockSize) throw new IoError(`${this.name}: request ${offset}+${length} is not in ${this.blockSize}-byte blocks`, E.EINVAL);
  }

  private async readWrite(write: boolean, offset: number, buf: Uint8Array): Promise<void> {
    const bs = this.blockSize;
    const lba = offset / bs;
    const blocks = buf.length / bs;
    for (;;) {
      const size = this.isCdrom ? (blocks > 0xffff ? 12 : 10) : lba + blocks > 0xffffffff ? 16 : this.rwSize;
      const what = `${write ? 'WRITE' : 'READ'}(${size})`;
      try {
        const r = await this.run({ lun: this.lun, cdb: scsi.readWrite(write, size, lba, blocks), ...(write ? { data: buf } : { dst: buf }) }, what, offset);
        if (!write && r.received !== buf.length) throw new IoError(`${this.name}: ${what} at ${offset}: the target sent ${r.received} of ${buf.length} bytes`);
        return;
      } catch (err) {
        // A LUN without the 16-byte commands: use 10 from now on.
        if (size === 16 && lba + blocks <= 0xffffffff && err instanceof TsmountError && err.errno === E.ENOTSUP) {
          this.rwSize = 10;
          continue;
        }
        throw err;
      }
    }
  }

  /**
   * One command to completion: sent again after a unit attention or a busy LUN, and
   * after a dropped connection (logged in again) for as long as reconnectForMs.
   */
  private async run(req: TaskRequest, what: string, offset: number): Promise<TaskResult> {
    let attention = 0;
    let busy = 0;
    let lostAt: number | undefined;
    for (;;) {
      if (this.closed && !this.conn?.alive) throw new IoError(`${this.name}: closed`);
      let r: TaskResult;
      try {
        const conn = await this.connection();
        r = await conn.command(req);
      } catch (err) {
        if (!(err instanceof ConnectionLost)) throw err;
        lostAt ??= Date.now();
        if (Date.now() - lostAt > this.reconnectForMs) throw new IoError(`${this.name}: ${what} at ${offset}: the target is unreachable`);
        continue;
      }
      if (r.status === scsi.STATUS.GOOD) return r;
      const sense = r.status === scsi.STATUS.CHECK_CONDITION ? scsi.parseSense(r.senseData) : undefined;
      if ((r.status === scsi.STATUS.BUSY || r.status === scsi.STATUS.TASK_SET_FULL) && busy++ < 100) {
        await sleep(Math.min(100, 5 * busy));
        continue;
      }
      if (sense && scsi.senseRetryable(sense) && attention++ < 8) continue;
      throw commandError(this.name, `${what} at ${offset}`, this.lun, r.status, sense);
    }
  }

  /** The LUN's size in bytes as a new session sees it (past unit attentions). */
  private async capacityOn(c: IscsiConnection): Promise<number> {
    const sixteen = !this.isCdrom && this.rwSize === 16;
    for (let i = 0; ; i++) {
      const b = new Uint8Array(sixteen ? 32 : 8);
      const r = await c.command({ lun: this.lun, cdb: sixteen ? scsi.readCapacity16() : scsi.readCapacity10(), dst: b });
      const sense = r.status === scsi.STATUS.CHECK_CONDITION ? scsi.parseSense(r.senseData) : undefined;
      if (r.status !== scsi.STATUS.GOOD) {
        if (i < 8 && (r.status === scsi.STATUS.BUSY || (sense && scsi.senseRetryable(sense)))) continue;
        throw commandError(this.name, 'READ CAPACITY', this.lun, r.status, sense);
      }
      const cap = sixteen ? scsi.parseCapacity16(b.subarray(0, r.received)) : scsi.parseCapacity10(b.subarray(0, r.received));
      return cap.blocks * cap.blockSize;
    }
  }

  /** The live connection, or a new session in place of a dead one (tried every 500 ms). */
  private async connection(): Promise<IscsiConnection> {
    if (this.conn?.alive) return this.conn;
    this.checkOpen();
    return this.reconnecting.run(async () => {
      try {
        const c = await IscsiConnection.connect(this.connectOpts);
        const size = await this.capacityOn(c).catch(async (err: unknown) => {
          await c.close().catch(() => undefined);
          throw err;
        });
        if (size !== this.size) {
          await c.close().catch(() => undefined);
          throw new IoError(`${this.name}: the LUN is ${size} bytes now, not ${this.size}; not logging in again`);
        }
        this.connectOpts.log(`${this.name}: logged in again`);
        this.conn = c;
        return c;
      } catch (err) {
        await sleep(500);
        if (err instanceof ConnectionLost || !(err instanceof TsmountError)) throw err;
        // A refused login (the target not back yet) is tried again; a changed LUN is not.
        throw /not logging in again/.test(err.message) ? err : new ConnectionLost(err.message);
      }
    });
  }
}

function commandError(name: string, what: string, lun: number, status: number, sense: scsi.Sense | undefined): TsmountError {
  if (sense) {
    if (sense.key === scsi.SENSE_KEY.ILLEGAL_REQUEST && sense.asc === 0x25) return new UsageError(`${name}: LUN ${lun} does not exist on the target`, E.ENXIO);
    const errno = scsi.senseErrno(sense);
    if (errno === E.EROFS) return new ReadOnlyError(`${name}: ${what}: ${scsi.describeSense(sense)}`, errno);
    return new IoError(`${name}: ${what}: ${scsi.describeSense(sense)}`, errno);
  }
  const s = status === scsi.STATUS.RESERVATION_CONFLICT ? 'reservation conflict' : `SCSI status 0x${status.toString(16)}`;
  return new IoError(`${name}: ${what}: ${s}`, status === scsi.STATUS.RESERVATION_CONFLICT ? E.EBUSY : E.EIO);
}
