// The SSH protocol node: a file on an SFTP server (ssh2, pure JavaScript), authenticated
// through ssh-agent as QEMU's ssh driver is. One SSH session per server, user and
// host_key_check is shared by every node of a chain, so a backing file on the same
// server reuses the connection and its options. Reads and writes are split into SFTP
// requests that are all kept in flight, so throughput is not one round trip per request.
import { Client, type ServerHostKeyAlgorithm, type SFTPWrapper } from 'ssh2';
import { constants as osc } from 'node:os';
import { IoError, UsageError } from '../../errors.js';
import type { TruncateOptions } from '../../types.js';
import { refusePreallocation } from '../../resize.js';
import { checkHostKey, parseHostKeyCheck, preferredAlgorithms } from './hostkey.js';
import { formatSshUri, parseSshSpec, type SshTarget } from './uri.js';
import { inParallel, pieces } from '../parallel.js';
import { Reconnect, RemoteNode, remoteTimeoutMs, SharedConnections, withDeadline } from '../remote-node.js';

const E = osc.errno;

/** Connect, key exchange and authentication must finish within this time. */
const READY_TIMEOUT_MS = 8000;
/** One SFTP read or write request; OpenSSH's limit is 255 KiB, 64 KiB keeps many in flight. */
const SFTP_PIECE = 64 << 10;
/** SFTP requests in flight per call. */
const WINDOW = 32;

const defaultLog = (msg: string): void => void process.stderr.write(`${msg}\n`);

/** ssh2's default host key algorithms, in its order. */
const DEFAULT_HOST_KEY_ALGORITHMS = ['ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', 'rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'];

/** SFTP status codes (draft-ietf-secsh-filexfer-02) to errno. */
function sftpErrno(err: unknown): number {
  const code = (err as { code?: number | string }).code;
  switch (code) {
    case 2:
      return E.ENOENT;
    case 3:
      return E.EACCES;
    case 8:
      return E.ENOTSUP;
    default:
      return E.EIO;
  }
}

function sftpMessage(err: unknown): string {
  const code = (err as { code?: number | string }).code;
  const names: Record<number, string> = { 1: 'end of file', 2: 'no such file', 3: 'permission denied', 4: 'failure', 5: 'bad message', 6: 'no connection', 7: 'connection lost', 8: 'operation unsupported' };
  return (typeof code === 'number' && names[code]) || (err instanceof Error ? err.message : String(err));
}

interface Session {
  key: string;
  client: Client;
  sftp: SFTPWrapper;
  refs: number;
  hostport: string;
  fsyncWarned: boolean;
  dead: string | undefined;
}

/**
 * The open SSH sessions of one process, by server, port, user and host_key_check.
 * Owned by the ssh protocol driver (one per registry), not module state.
 */
export class SshSessions {
  private readonly sessions = new SharedConnections<Session>();

  constructor(private readonly log: (msg: string) => void = defaultLog) {}

  acquire(t: SshTarget, name: string): Promise<Session> {
    const key = `${t.user}@${t.host}:${t.port}?${t.hostKeyCheck}`;
    return this.sessions.acquire(key, () => this.connect(t, key, name), (s) => !s.dead);
  }

  release(s: Session): void {
    this.sessions.release(s.key, s, () => s.client.end());
  }

  /** Take a session for dead (a request went unanswered): it is closed, and the next acquire connects anew. */
  abandon(s: Session, why: string): void {
    if (s.dead) return;
    s.dead = why;
    this.log(`tsmount: ssh://${s.hostport}: ${why}; reconnecting`);
    s.client.end();
    s.client.destroy();
  }

  warnNoFsync(s: Session): void {
    if (s.fsyncWarned) return;
    s.fsyncWarned = true;
    // The text qemu-block-drivers(7) quotes.
    this.log(`warning: ssh server ${s.hostport} does not support fsync`);
  }

  private connect(t: SshTarget, key: string, name: string): Promise<Session> {
    const policy = parseHostKeyCheck(t.hostKeyCheck, name);
    const agent = process.env.SSH_AUTH_SOCK;
    if (!agent) return Promise.reject(new UsageError(`${name}: SSH_AUTH_SOCK is not set: tsmount authenticates through ssh-agent`));
    const hostport = `${t.host}:${t.port}`;
    return new Promise((resolve, reject) => {
      const client = new Client();
      let refusal: string | undefined;
      let settled = false;
      const fail = (msg: string, errno?: number): void => {
        if (settled) return;
        settled = true;
        client.end();
        reject(errno === undefined ? new UsageError(`${name}: ${msg}`) : new IoError(`${name}: ${msg}`, errno));
      };
      client.on('error', (err: Error & { level?: string; code?: string }) => {
        if (refusal) return fail(refusal);
        if (err.level === 'client-authentication') return fail(`ssh-agent has no key that ${t.user}@${hostport} accepts (authentication failed)`);
        if (err.level === 'client-timeout') return fail(`no answer from ssh server ${hostport} within ${READY_TIMEOUT_MS / 1000} s`, E.ETIMEDOUT);
        if (err.level === 'agent') return fail(`ssh-agent at ${agent} failed: ${err.message}`);
        const code = err.code;
        if (code === 'ECONNREFUSED') return fail(`cannot connect to ssh server ${hostport}: connection refused`);
        if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return fail(`cannot connect to ssh server ${hostport}: unknown host`);
        return fail(`ssh connection to ${hostport} failed: ${code ?? err.message}`);
      });
      client.on('close', () => {
        if (!settled) fail(refusal ?? `the ssh server ${hostport} closed the connection`);
      });
      client.on('ready', () => {
        client.sftp((err, sftp) => {
          if (err) return fail(`the ssh server ${hostport} refused the SFTP subsystem: ${err.message}`);
          settled = true;
          const s: Session = { key, client, sftp, refs: 0, hostport, fsyncWarned: false, dead: undefined };
          const lost = (why: string): void => {
            if (s.dead) return;
            s.dead = why;
            if (s.refs > 0) this.log(`tsmount: ssh://${hostport}: ${why}`);
          };
          client.on('close', () => lost('the ssh connection was closed'));
          client.on('error', (e: Error) => lost(`ssh connection error: ${e.message}`));
          sftp.on('close', () => lost('the SFTP session ended'));
          resolve(s);
        });
      });
      const preferred = policy.mode === 'yes' ? preferredAlgorithms(t.host, t.port) : [];
      client.connect({
        host: t.host,
        port: t.port,
        username: t.user,
        agent,
        readyTimeout: READY_TIMEOUT_MS,
        // Keys of the types known_hosts holds are asked for first, as OpenSSH does.
        ...(preferred.length ? { algorithms: { serverHostKey: [...preferred, ...DEFAULT_HOST_KEY_ALGORITHMS.filter((a) => !preferred.includes(a))] as ServerHostKeyAlgorithm[] } } : {}),
        hostVerifier: (keyBlob: Buffer) => {
          refusal = checkHostKey(policy, keyBlob, t.host, t.port);
          return refusal === undefined;
        },
      });
    });
  }
}

function call<T>(fn: (cb: (err: Error | null | undefined, v: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));
}


export class SshNode extends RemoteNode {
  private readonly reopening = new Reconnect<void>();

  private constructor(
    name: string,
    private readonly target: SshTarget,
    private readonly sessions: SshSessions,
    private session: Session,
    private handle: Buffer,
    private currentSize: number,
    readOnly: boolean,
    ignoreFlush: boolean,
  ) {
    super(name, readOnly, ignoreFlush);
  }

  static async open(spec: string, opts: { readOnly: boolean; ignoreFlush?: boolean }, sessions: SshSessions): Promise<SshNode> {
    const t = parseSshSpec(spec);
    const { session, handle, size } = await SshNode.openHandle(spec, t, opts.readOnly, sessions);
    return new SshNode(spec, t, sessions, session, handle, size, opts.readOnly, !!opts.ignoreFlush);
  }

  /** A session, the file opened on it, and its size. */
  private static async openHandle(name: string, t: SshTarget, readOnly: boolean, sessions: SshSessions): Promise<{ session: Session; handle: Buffer; size: number }> {
    const s = await sessions.acquire(t, name);
    try {
      const ms = remoteTimeoutMs();
      const timeout = (): IoError => new IoError(`${name}: no answer from the ssh server within ${ms / 1000} s`, E.ETIMEDOUT);
      let handle: Buffer;
      try {
        handle = await withDeadline(call<Buffer>((cb) => s.sftp.open(t.path, readOnly ? 'r' : 'r+', cb)), ms, timeout);
      } catch (err) {
        if (err instanceof IoError) throw err;
        const errno = sftpErrno(err);
        if (errno === E.ENOENT) throw new UsageError(`${name}: no such file on the server`);
        throw new IoError(`${name}: cannot open on the server: ${sftpMessage(err)}`, errno);
      }
      const st = await withDeadline(call<{ size?: number }>((cb) => s.sftp.fstat(handle, cb)), ms, timeout).catch((err: unknown) => {
        if (err instanceof IoError) throw err;
        throw new IoError(`${name}: cannot stat on the server: ${sftpMessage(err)}`, sftpErrno(err));
      });
      return { session: s, handle, size: st.size ?? 0 };
    } catch (err) {
      sessions.release(s);
      throw err;
    }
  }

  /**
   * One SFTP request on the current session and handle, bounded by the remote request
   * timeout. When the connection is lost (or a request goes unanswered, which abandons
   * the session), the node reconnects, re-opens its file, and runs the request once
   * more: reads, writes at an offset, truncate and fsync are all idempotent.
   */
  private async request<T>(what: string, fn: (sftp: SFTPWrapper, handle: Buffer) => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      this.checkOpen();
      if (this.session.dead) await this.reopen();
      const s = this.session;
      try {
        return await this.bounded(fn(s.sftp, this.handle), () => {
          this.sessions.abandon(s, `SFTP ${what}: no answer within ${this.timeoutMs / 1000} s`);
          return new IoError(`${this.name}: SFTP ${what}: no answer from the server within ${this.timeoutMs / 1000} s`, E.EIO);
        });
      } catch (err) {
        // Only a lost connection is retried; an error the server sent is the answer.
        if (!s.dead || attempt > 0) throw this.ioError(what, err);
      }
    }
  }

  private reopen(): Promise<void> {
    return this.reopening.run(async () => {
      const old = this.session;
      const { session, handle, size } = await SshNode.openHandle(this.name, this.target, this.readOnly, this.sessions);
      if (size !== this.currentSize && this.readOnly) {
        this.sessions.release(session);
        throw new IoError(`${this.name}: the file changed size while disconnected; not reconnecting`);
      }
      this.session = session;
      this.handle = handle;
      this.sessions.release(old);
    });
  }

  /** Make an empty file on the server (tsimg create); fails if the server refuses. */
  static async create(spec: string, sessions: SshSessions): Promise<void> {
    const t = parseSshSpec(spec);
    const s = await sessions.acquire(t, spec);
    try {
      const h = await call<Buffer>((cb) => s.sftp.open(t.path, 'w', cb));
      await call<void>((cb) => s.sftp.close(h, (e) => cb(e, undefined)));
    } catch (err) {
      throw new UsageError(`${spec}: cannot create on the server: ${sftpMessage(err)}`);
    } finally {
      sessions.release(s);
    }
  }

  static async remove(spec: string, sessions: SshSessions): Promise<void> {
    const t = parseSshSpec(spec);
    const s = await sessions.acquire(t, spec);
    try {
      await call<void>((cb) => s.sftp.unlink(t.path, (e) => cb(e, undefined))).catch(() => undefined);
    } finally {
      sessions.release(s);
    }
  }

  get size(): number {
    return this.currentSize;
  }

  private ioError(what: string, err: unknown): IoError {
    if (err instanceof IoError) return err;
    const dead = this.session.dead;
    return new IoError(`${this.name}: SFTP ${what} failed: ${dead ?? sftpMessage(err)}`, dead ? E.EIO : sftpErrno(err));
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    const buf = Buffer.from(dst.buffer, dst.byteOffset, dst.byteLength);
    await inParallel(pieces(offset, this.inside(offset, dst), SFTP_PIECE), WINDOW, async ([o, n]) => {
      let done = 0;
      while (done < n) {
        const at = o - offset + done;
        // Into a buffer of its own: a request that timed out may still be answered later.
        const piece = Buffer.allocUnsafe(n - done);
        const got = await this.request('read', (sftp, handle) =>
          new Promise<number>((resolve, reject) => sftp.read(handle, piece, 0, piece.length, o + done, (err, nb) => (err ? reject(err) : resolve(nb)))),
        );
        piece.copy(buf, at, 0, got);
        if (got === 0) {
          // The file is shorter than it was: the rest reads as zeros, as for local files.
          buf.fill(0, at, o - offset + n);
          return;
        }
        done += got;
      }
    });
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    this.dirty = true;
    const buf = Buffer.from(src.buffer, src.byteOffset, src.byteLength);
    await inParallel(pieces(offset, src.length, SFTP_PIECE), WINDOW, async ([o, n]) => {
      await this.request('write', (sftp, handle) => call<void>((cb) => sftp.write(handle, buf, o - offset, n, o, (e) => cb(e, undefined))));
    });
    if (offset + src.length > this.currentSize) this.currentSize = offset + src.length;
  }

  async zero(offset: number, length: number): Promise<void> {
    // SFTP has no way to zero or punch a range.
    await this.writeZeros(offset, length, 1 << 20);
  }

  async truncate(size: number, o?: TruncateOptions): Promise<void> {
    refusePreallocation(o);
    await this.request('truncate', (sftp, handle) => call<void>((cb) => sftp.fsetstat(handle, { size }, (e) => cb(e, undefined))));
    this.currentSize = size;
    this.dirty = true;
  }

  protected async sync(): Promise<void> {
    if (this.session.dead) await this.reopen();
    const ext = (this.session.sftp as unknown as { _extensions?: Record<string, string> })._extensions;
    if (ext?.['fsync@openssh.com'] !== '1') return this.sessions.warnNoFsync(this.session);
    await this.request('fsync', (sftp, handle) => call<void>((cb) => sftp.ext_openssh_fsync(handle, (e) => cb(e, undefined))));
  }

  protected async disconnect(): Promise<void> {
    await this.reopening.settled();
    const s = this.session;
    if (!s.dead) {
      const closing = call<void>((cb) => s.sftp.close(this.handle, (e) => cb(e, undefined)));
      await this.bounded(closing, () => new IoError(`${this.name}: no answer from the ssh server within ${this.timeoutMs / 1000} s`)).catch(() => undefined);
    }
    this.sessions.release(s);
  }

  /** The target with every option, for messages. */
  static describe(spec: string): string {
    return formatSshUri(parseSshSpec(spec));
  }
}
