// One NBD connection: a thin transport around the handshake state machine and the
// reply parser. Many requests may be in flight; replies are matched by handle. When
// the server breaks the protocol or hangs up, every request still waiting fails with
// EIO and the reason is logged once; the connection is then dead (node.ts reconnects).
import net from 'node:net';
import tls from 'node:tls';
import { IoError, UsageError } from '../../errors.js';
import { NBD_CMD, NBD_ERRNO, NBD_OPT, type NbdCommand } from './constants.js';
import { Handshake, NbdRefusedError, type ExportInfo, type HandshakeParams } from './handshake.js';
import { encodeOption, encodeRequest, nbdErrnoName, NbdProtocolError, ReplyParser, type ReplyEvent } from './parser.js';
import { describeAddress, type NbdAddress } from './uri.js';
import { describeTlsFailure, type TlsSetup } from './tls.js';
import { constants as osc } from 'node:os';

const E = osc.errno;

export interface ConnectOptions extends HandshakeParams {
  address: NbdAddress;
  /** Connect and handshake must finish within this time. */
  timeoutMs: number;
  /** Names the image in messages. */
  name: string;
  log: (msg: string) => void;
  /** Present: STARTTLS with these credentials, and never plaintext. */
  tls?: TlsSetup;
  /** A request unanswered this long kills the connection (its requests fail, node.ts reconnects); 0: never. */
  requestTimeoutMs?: number;
}

interface Pending {
  cmd: NbdCommand;
  offset: number;
  length: number;
  dst?: Uint8Array;
  received: number;
  error?: { errno: number; message: string };
  status?: { contextId: number; extents: { length: number; flags: number }[] };
  resolve: (r: RequestResult) => void;
  reject: (e: Error) => void;
}

export interface RequestResult {
  status?: { contextId: number; extents: { length: number; flags: number }[] };
}

/** Errno values from the wire to the host's, for FUSE. */
function hostErrno(nbd: number): number {
  switch (nbd) {
    case NBD_ERRNO.EPERM:
      return E.EPERM;
    case NBD_ERRNO.ENOMEM:
      return E.ENOMEM;
    case NBD_ERRNO.EINVAL:
      return E.EINVAL;
    case NBD_ERRNO.ENOSPC:
      return E.ENOSPC;
    case NBD_ERRNO.EOVERFLOW:
      return E.EOVERFLOW;
    case NBD_ERRNO.ENOTSUP:
      return E.ENOTSUP;
    default:
      return E.EIO;
  }
}

const CMD_NAMES: Record<number, string> = { 0: 'read', 1: 'write', 2: 'disconnect', 3: 'flush', 4: 'trim', 5: 'cache', 6: 'write zeroes', 7: 'block status' };

export class NbdConnection {
  private readonly parser: ReplyParser;
  private readonly pending = new Map<number, Pending>();
  private nextHandle = 1;
  private readonly outstanding = new Set<Promise<RequestResult>>();
  private deadReason: string | undefined;
  private readonly closedPromise: Promise<void>;

  private constructor(
    private readonly socket: net.Socket,
    readonly info: ExportInfo,
    private readonly opts: ConnectOptions,
    leftover: Uint8Array,
  ) {
    this.parser = new ReplyParser(info.structuredReplies);
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.die(`connection error: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
    socket.on('close', () => this.die('the server closed the connection'));
    if (leftover.length) this.onData(leftover);
  }

  /** Connect and negotiate; one-line UsageError/IoError on failure, within the timeout. */
  static connect(opts: ConnectOptions): Promise<NbdConnection> {
    const where = describeAddress(opts.address);
    return new Promise((resolve, reject) => {
      const hs = new Handshake({ ...opts, startTls: !!opts.tls });
      const raw = opts.address.kind === 'unix' ? net.connect({ path: opts.address.path }) : net.connect({ host: opts.address.host, port: opts.address.port });
      raw.setNoDelay(true);
      // The raw socket until STARTTLS is acknowledged, the TLS socket over it from then on.
      let socket: net.Socket = raw;
      let secured: tls.TLSSocket | undefined;
      // In TLS 1.3 a server checks our certificate after our side is done: one that
      // rejects it (gnutls: without an alert) hangs up before its first reply.
      let heardOverTls = false;
      let settled = false;
      const fail = (err: Error, politely = false): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        const closeAll = (): void => {
          socket.destroy();
          if (socket !== raw) raw.destroy();
        };
        // A refused option leaves the server waiting for the next one: say goodbye.
        if (politely) {
          socket.end(encodeOption(NBD_OPT.ABORT));
          setTimeout(closeAll, 1000).unref();
        } else {
          closeAll();
        }
        reject(err);
      };
      const timer = setTimeout(() => fail(new IoError(`${opts.name}: no NBD handshake from ${where} within ${opts.timeoutMs / 1000} s`, E.ETIMEDOUT)), opts.timeoutMs);
      const tlsFailed = (err: Error | undefined): void => fail(new UsageError(`${opts.name}: TLS with NBD server ${where} failed: ${describeTlsFailure(err, opts.tls!)}`));
      const onData = (chunk: Buffer): void => {
        if (secured) heardOverTls = true;
        try {
          hs.feed(chunk);
          for (const b of hs.takeOutput()) socket.write(b);
        } catch (err) {
          if (err instanceof NbdRefusedError) fail(new UsageError(`${opts.name}: ${err.message}`), hs.state !== 'SERVER_OPT_MAGIC' && hs.state !== 'HANDSHAKE_FLAGS');
          else if (err instanceof NbdProtocolError) fail(new IoError(`${opts.name}: NBD handshake with ${where} failed: ${err.message}`));
          else fail(err as Error);
          return;
        }
        if (hs.state === 'TLS' && !secured) return startTls();
        const info = hs.export;
        if (info && !settled) {
          settled = true;
          clearTimeout(timer);
          socket.off('data', onData);
          socket.off('error', onError);
          socket.off('close', onClose);
          resolve(new NbdConnection(socket, info, opts, hs.leftover()));
        }
      };
      const onError = (err: NodeJS.ErrnoException): void => {
        if (secured) return tlsFailed(err);
        const why = err.code === 'ECONNREFUSED' ? 'connection refused' : err.code === 'ENOENT' ? 'no such socket' : err.code === 'ENOTFOUND' || err.code === 'EAI_AGAIN' ? 'unknown host' : (err.code ?? err.message);
        fail(new UsageError(`${opts.name}: cannot connect to NBD server ${where}: ${why}`));
      };
      const onClose = (): void => {
        if (hs.state === 'TLS' || (secured && !heardOverTls)) return tlsFailed(undefined);
        fail(new UsageError(`${opts.name}: the NBD server ${where} hung up during the handshake (state ${hs.state})`));
      };
      // proto.md: after NBD_REP_ACK the client MUST upgrade at once; the rest of the
      // option haggling happens inside TLS. The TLS socket takes over the raw one.
      const startTls = (): void => {
        raw.off('data', onData);
        raw.off('error', onError);
        raw.off('close', onClose);
        // The TLS socket reports what happens below it; this only keeps an unheard error quiet.
        raw.on('error', () => undefined);
        secured = tls.connect({ ...opts.tls!.options, socket: raw });
        socket = secured;
        secured.once('secureConnect', () => {
          try {
            hs.tlsEstablished();
          } catch (err) {
            return fail(err as Error);
          }
          for (const b of hs.takeOutput()) secured!.write(b);
        });
        secured.on('data', onData);
        secured.on('error', onError);
        secured.on('close', onClose);
      };
      raw.on('data', onData);
      raw.on('error', onError);
      raw.on('close', onClose);
    });
  }

  get alive(): boolean {
    return this.deadReason === undefined;
  }

  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Send one request; resolves when the server has answered it fully. `dst` receives a
   * read's bytes; `payload` is a write's. Rejects with IoError (errno from the server,
   * or EIO when the connection fails).
   */
  request(cmd: NbdCommand, flags: number, offset: number, length: number, io?: { dst?: Uint8Array; payload?: Uint8Array }): Promise<RequestResult> {
    if (this.deadReason !== undefined) return Promise.reject(new IoError(`${this.opts.name}: ${this.deadReason}`));
    const handle = this.nextHandle++;
    const limit = this.opts.requestTimeoutMs ?? 0;
    const timer = limit
      ? setTimeout(() => this.die(`no reply to NBD ${CMD_NAMES[cmd] ?? cmd} at ${offset} within ${limit / 1000} s`), limit)
      : undefined;
    const done = new Promise<RequestResult>((resolve, reject) => {
      this.pending.set(handle, { cmd, offset, length, dst: io?.dst, received: 0, resolve, reject });
      this.parser.expect(handle, { cmd, offset, length });
      const header = encodeRequest(flags, cmd, handle, offset, length);
      if (io?.payload) {
        this.socket.cork();
        this.socket.write(header);
        this.socket.write(io.payload);
        this.socket.uncork();
      } else {
        this.socket.write(header);
      }
    });
    this.outstanding.add(done);
    const forget = (): void => {
      clearTimeout(timer);
      this.outstanding.delete(done);
    };
    done.then(forget, forget);
    return done;
  }

  /** Tell the server goodbye (NBD_CMD_DISC) and close; outstanding requests finish first. */
  async close(): Promise<void> {
    if (this.deadReason === undefined) {
      await Promise.allSettled([...this.outstanding]);
      this.deadReason = 'connection closed';
      this.socket.end(encodeRequest(0, NBD_CMD.DISC, 0, 0, 0));
      const t = setTimeout(() => this.socket.destroy(), 2000);
      await this.closedPromise;
      clearTimeout(t);
    } else {
      this.socket.destroy();
    }
  }

  private onData(chunk: Uint8Array): void {
    if (this.deadReason !== undefined) return;
    try {
      this.parser.feed(chunk, (ev) => this.onEvent(ev));
    } catch (err) {
      const why = err instanceof Error ? err.message : String(err);
      this.die(`malformed reply from the NBD server: ${why}`);
    }
  }

  private onEvent(ev: ReplyEvent): void {
    const p = this.pending.get(ev.handle)!;
    switch (ev.kind) {
      case 'data':
        p.dst!.set(ev.bytes, ev.offset - p.offset);
        p.received += ev.bytes.length;
        break;
      case 'hole':
        p.dst!.fill(0, ev.offset - p.offset, ev.offset - p.offset + ev.length);
        p.received += ev.length;
        break;
      case 'block-status':
        // Only the first context's chunk is kept: we ask for base:allocation alone.
        p.status ??= { contextId: ev.contextId, extents: ev.extents };
        break;
      case 'error':
        p.error ??= { errno: ev.errno, message: ev.message };
        break;
      case 'done':
        this.pending.delete(ev.handle);
        this.settle(p);
        break;
    }
  }

  private settle(p: Pending): void {
    const what = `NBD ${CMD_NAMES[p.cmd] ?? p.cmd} at ${p.offset} (+${p.length})`;
    if (p.error) {
      const msg = `${this.opts.name}: ${what} failed: ${nbdErrnoName(p.error.errno)}${p.error.message ? ` (${p.error.message})` : ''}`;
      p.reject(new IoError(msg, hostErrno(p.error.errno)));
    } else if (p.cmd === NBD_CMD.READ && this.info.structuredReplies && p.received !== p.length) {
      // Chunks may not overlap (proto.md), so a sum short of the length is a gap.
      this.opts.log(`${this.opts.name}: ${what}: the server answered ${p.received} of ${p.length} bytes`);
      p.reject(new IoError(`${this.opts.name}: ${what}: incomplete reply from the server`));
    } else if (p.cmd === NBD_CMD.BLOCK_STATUS && !p.status) {
      p.reject(new IoError(`${this.opts.name}: ${what}: no status in the reply`));
    } else {
      p.resolve({ status: p.status });
    }
  }

  /** The connection is unusable: fail what waits, log why once. */
  private die(reason: string): void {
    if (this.deadReason !== undefined) return;
    this.deadReason = reason;
    if (this.pending.size) this.opts.log(`${this.opts.name}: ${reason}; failing ${this.pending.size} request(s) in flight with EIO`);
    else this.opts.log(`${this.opts.name}: ${reason}`);
    for (const p of this.pending.values()) p.reject(new IoError(`${this.opts.name}: ${reason}`));
    this.pending.clear();
    this.socket.destroy();
  }
}
