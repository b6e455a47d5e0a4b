// The NBD protocol node: one export, over one connection or (where the server
// advertises multi-conn) several. Large requests are split at the server's block
// limits and kept in flight together; holes and zeros come from base:allocation.
import createDebug from '../../util/debug.js';
import type { BlockNode, CacheMode, Extent } from '../../types.js';
import { IoError, UsageError } from '../../errors.js';
import { BASE_ALLOCATION, NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, NBD_STATE_ZERO } from './constants.js';
import { NbdConnection, type ConnectOptions } from './client.js';
import type { ExportInfo } from './handshake.js';
import { parseNbdSpec, type NbdTarget } from './uri.js';
import { inParallel, pieces } from '../parallel.js';
import { loadTls } from './tls.js';
import { Reconnect, RemoteNode, remoteLog, remoteTimeoutMs } from '../remote-node.js';
import type { NbdCommand } from './constants.js';

export interface NbdOpenOptions {
  readOnly: boolean;
  cache: CacheMode;
  /** Where connection trouble is reported (default: stderr, as tsmount's other warnings). */
  log?: (msg: string) => void;
  /** Connect + handshake limit; wrong hosts and exports fail within it. */
  timeoutMs?: number;
  /** At most this many connections when the server allows multi-conn. */
  maxConnections?: number;
}

const DEFAULT_TIMEOUT_MS = 8000;
const DEFAULT_CONNECTIONS = 4;
/** One request carries at most this much; a larger read or write becomes several in flight. */
const MAX_REQUEST = 2 << 20;
/** Requests in flight for one call (a 1 GiB read is not 512 requests at once). */
const WINDOW = 16;
/** Zeroing and block status have no payload; the length field is 32 bits. */
const MAX_NO_PAYLOAD = 1 << 30;
/** After a failed reconnect, wait this long before the next try (requests fail meanwhile). */
const RECONNECT_BACKOFF_MS = 1000;

const debug = createDebug('tsmount:nbd');

interface Slot {
  conn: NbdConnection | undefined;
  reconnect: Reconnect<NbdConnection>;
  failedAt: number;
}

/** Connect, trying again for up to `ms` (QEMU's open-timeout) while the server is not there. */
async function connectWithin(opts: ConnectOptions, ms: number): Promise<NbdConnection> {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return await NbdConnection.connect(opts);
    } catch (err) {
      if (Date.now() + RECONNECT_BACKOFF_MS > until) throw err;
      await new Promise((r) => setTimeout(r, RECONNECT_BACKOFF_MS));
    }
  }
}

export class NbdNode extends RemoteNode {
  private readonly slots: Slot[];
  private readonly useFua: boolean;
  private readonly contextId: number | undefined;
  private readonly piece: number;

  private constructor(
    name: string,
    private readonly info: ExportInfo,
    conns: NbdConnection[],
    readOnly: boolean,
    cache: CacheMode,
    private readonly connectOpts: ConnectOptions,
    private readonly reconnectDelayMs = 0,
  ) {
    super(name, readOnly);
    this.slots = conns.map((conn) => ({ conn, reconnect: new Reconnect<NbdConnection>(), failedAt: 0 }));
    // Writethrough modes flush after every write; FUA makes each write durable by itself.
    this.useFua = (cache === 'writethrough' || cache === 'directsync') && !!(info.flags & NBD_FLAG.SEND_FUA);
    this.contextId = info.metaContexts.get(BASE_ALLOCATION);
    const max = Math.min(info.maxBlock, MAX_REQUEST);
    this.piece = Math.max(info.minBlock, max - (max % info.minBlock));
  }

  /** The export's minimum block size (proto.md, "Block size constraints"). */
  get requestAlignment(): number | undefined {
    return this.info.minBlock > 1 ? this.info.minBlock : undefined;
  }

  static async open(spec: string, opts: NbdOpenOptions): Promise<BlockNode> {
    return NbdNode.openTarget(spec, parseNbdSpec(spec), opts);
  }

  static async openTarget(name: string, target: NbdTarget, opts: NbdOpenOptions): Promise<BlockNode> {
    const connectOpts: ConnectOptions = {
      address: target.address,
      exportName: target.exportName,
      structuredReplies: true,
      metaContexts: [BASE_ALLOCATION],
      timeoutMs: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      name,
      log: opts.log ?? remoteLog,
      // Read once: every connection, and every reconnect, does STARTTLS with these.
      tls: target.tls ? await loadTls(target.tls, target.address, name) : undefined,
      requestTimeoutMs: remoteTimeoutMs(),
    };
    const first = await connectWithin(connectOpts, (target.openTimeout ?? 0) * 1000);
    const conns = [first];
    try {
      const info = first.info;
      if (!opts.readOnly && info.flags & NBD_FLAG.READ_ONLY) throw new UsageError(`${name}: the NBD export is read-only (mount without --rw)`);
      // proto.md: without CAN_MULTI_CONN, writes on one connection may not be seen on another.
      const want = info.flags & NBD_FLAG.CAN_MULTI_CONN ? Math.max(1, opts.maxConnections ?? DEFAULT_CONNECTIONS) : 1;
      for (let i = 1; i < want; i++) {
        const c = await NbdConnection.connect(connectOpts);
        conns.push(c);
        if (c.info.size !== info.size) throw new IoError(`${name}: the export changed size between two connections`);
      }
      debug(
        '%s: %d connection(s), %d bytes, flags %s, blocks %d/%d/%d, structured replies %s, meta contexts %s%s',
        name, conns.length, info.size, info.flags.toString(16), info.minBlock, info.preferredBlock, info.maxBlock,
        info.structuredReplies ? 'yes' : 'no', [...info.metaContexts.keys()].join(' ') || 'none', connectOpts.tls ? ', TLS' : '',
      );
      const node = new NbdNode(name, info, conns, opts.readOnly, opts.cache, connectOpts, (target.reconnectDelay ?? 0) * 1000);
      return node;
    } catch (err) {
      await Promise.allSettled(conns.map((c) => c.close()));
      throw err;
    }
  }

  get size(): number {
    return this.info.size;
  }

  /** How many connections are open (tests and messages). */
  get connections(): number {
    return this.slots.filter((s) => s.conn?.alive).length;
  }

  /** What the server advertised. */
  get exportInfo(): ExportInfo {
    return this.info;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    await inParallel(pieces(offset, this.inside(offset, dst), this.piece), WINDOW, async ([o, n]) => {
      await this.send(NBD_CMD.READ, 0, o, n, { dst: dst.subarray(o - offset, o - offset + n) });
    });
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    if (!this.useFua) this.dirty = true;
    const flags = this.useFua ? NBD_CMD_FLAG.FUA : 0;
    await inParallel(pieces(offset, src.length, this.piece), WINDOW, async ([o, n]) => {
      await this.send(NBD_CMD.WRITE, flags, o, n, { payload: src.subarray(o - offset, o - offset + n) });
    });
  }

  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    if (!(this.info.flags & NBD_FLAG.SEND_WRITE_ZEROES)) return this.writeZeros(offset, length, this.piece);
    if (!this.useFua) this.dirty = true;
    // NO_HOLE keeps the range allocated unless the caller lets the server unmap.
    const flags = (unmap ? 0 : NBD_CMD_FLAG.NO_HOLE) | (this.useFua ? NBD_CMD_FLAG.FUA : 0);
    await inParallel(pieces(offset, length, this.alignedLimit()), WINDOW, async ([o, n]) => {
      await this.send(NBD_CMD.WRITE_ZEROES, flags, o, n);
    });
  }

  /** NBD_CMD_TRIM: the server may drop the range (reads then return anything); false where it cannot. */
  async discard(offset: number, length: number): Promise<boolean> {
    if (!(this.info.flags & NBD_FLAG.SEND_TRIM)) return false;
    this.dirty = true;
    await inParallel(pieces(offset, length, this.alignedLimit()), WINDOW, async ([o, n]) => {
      await this.send(NBD_CMD.TRIM, 0, o, n);
    });
    return true;
  }

  protected async sync(): Promise<void> {
    if (!(this.info.flags & NBD_FLAG.SEND_FLUSH)) return;
    // With multi-conn, a flush on one connection covers writes completed on all of them
    // (proto.md, NBD_FLAG_CAN_MULTI_CONN); without it there is only one connection.
    await this.send(NBD_CMD.FLUSH, 0, 0, 0);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = Math.min(offset + length, this.size);
    if (this.contextId === undefined || offset >= end) return [{ offset, length, kind: 'data' }];
    const out: Extent[] = [];
    const push = (o: number, n: number, kind: Extent['kind']): void => {
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.offset + last.length === o) last.length += n;
      else out.push({ offset: o, length: n, kind });
    };
    let pos = offset;
    while (pos < end) {
      const n = Math.min(end - pos, this.alignedLimit());
      const { status } = await this.send(NBD_CMD.BLOCK_STATUS, 0, pos, n);
      if (!status || status.contextId !== this.contextId) throw new IoError(`${this.name}: block status for an unknown meta context`);
      const before = pos;
      for (const e of status.extents) {
        if (pos >= end) break;
        if (e.length === 0) break;
        const len = Math.min(e.length, end - pos);
        push(pos, len, e.flags & NBD_STATE_ZERO ? 'zero' : 'data');
        pos += len;
      }
      if (pos === before) throw new IoError(`${this.name}: the NBD server's block status made no progress at ${pos}`);
    }
    if (offset + length > end) push(end, offset + length - end, 'zero');
    return out;
  }

  protected async disconnect(): Promise<void> {
    await Promise.allSettled(this.slots.map(async (s) => {
      await s.reconnect.settled();
      await s.conn?.close();
    }));
  }

  private alignedLimit(): number {
    const a = this.info.minBlock;
    return MAX_NO_PAYLOAD - (MAX_NO_PAYLOAD % a);
  }


  /**
   * One request on the least busy live connection. When that connection dies under it
   * (hung up, or no reply within the remote request timeout), the request is sent once
   * more on a new connection: every NBD command here is idempotent (a read, a write of
   * the same bytes at the same offset, zeroes, trim, flush, block status). A dead
   * connection copies nothing more into a read's buffer.
   */
  private async send(cmd: NbdCommand, flags: number, offset: number, length: number, io?: { dst?: Uint8Array; payload?: Uint8Array }) {
    let until: number | undefined;
    for (let attempt = 0; ; attempt++) {
      let conn: NbdConnection | undefined;
      try {
        conn = await this.pick();
        return await conn.request(cmd, flags, offset, length, io);
      } catch (err) {
        // An error the server sent is its answer; and a closed node retries nothing.
        if (conn?.alive || this.closed) throw err;
        until ??= Date.now() + this.reconnectDelayMs;
        // One retry at least; more while reconnect-delay lasts.
        if (attempt > 0 && Date.now() >= until) throw err;
        if (attempt > 0) await new Promise((r) => setTimeout(r, Math.min(RECONNECT_BACKOFF_MS, until! - Date.now())));
        else if (conn) this.connectOpts.log(`${this.name}: retrying NBD request at ${offset} (+${length}) on a new connection`);
        else if (!this.reconnectDelayMs) throw err;
      }
    }
  }

  /** The live connection with the fewest requests in flight; reconnects a dead one. */
  private async pick(): Promise<NbdConnection> {
    this.checkOpen();
    let best: NbdConnection | undefined;
    for (const s of this.slots) if (s.conn?.alive && (!best || s.conn.inFlight < best.inFlight)) best = s.conn;
    if (best) return best;
    return this.reconnect(this.slots[0]!);
  }

  /**
   * A new connection in place of one that died. Safe: requests that were in flight
   * have already failed with EIO; only later requests use the new connection, and
   * only if the server still offers the same export.
   */
  private reconnect(slot: Slot): Promise<NbdConnection> {
    const log = this.connectOpts.log;
    return slot.reconnect.run(async () => {
      if (Date.now() - slot.failedAt < RECONNECT_BACKOFF_MS) throw new IoError(`${this.name}: the NBD server is unreachable`);
      debug('%s: connection lost; reconnecting', this.name);
      try {
        const c = await NbdConnection.connect(this.connectOpts);
        if (c.info.size !== this.info.size || c.info.structuredReplies !== this.info.structuredReplies || (c.info.flags & NBD_FLAG.READ_ONLY && !this.readOnly)) {
          await c.close();
          throw new IoError(`${this.name}: the export changed while disconnected; not reconnecting`);
        }
        log(`${this.name}: reconnected to the NBD server`);
        slot.conn = c;
        return c;
      } catch (err) {
        slot.failedAt = Date.now();
        log(`${this.name}: reconnecting failed: ${err instanceof Error ? err.message : String(err)}`);
        throw err instanceof IoError ? err : new IoError(`${this.name}: the NBD server is unreachable`);
      }
    });
  }
}
