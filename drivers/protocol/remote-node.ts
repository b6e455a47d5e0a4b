// What every remote protocol node (nbd/, ssh/, iscsi/, gluster/, sheepdog/) shares, so
// that a driver holds only its protocol: the bound on one request
// (TSMOUNT_REMOTE_TIMEOUT), the dirty bookkeeping behind flush and close, one reconnect
// at a time, and the small pieces of I/O they all need. A new remote driver extends
// RemoteNode and writes read, write, sync (make writes durable) and disconnect.
import type { BlockNode, Extent } from '../types.js';
import { IoError, UsageError } from '../errors.js';

/** Default bound on one request to a remote server (TSMOUNT_REMOTE_TIMEOUT, in seconds). */
export const DEFAULT_REMOTE_TIMEOUT_S = 30;

/**
 * How long a remote node waits for one answer before the request fails with EIO (and
 * the connection is taken for dead, so the next request reconnects): the
 * TSMOUNT_REMOTE_TIMEOUT environment variable in seconds, 30 by default, 0 for never.
 */
export function remoteTimeoutMs(): number {
  const v = process.env.TSMOUNT_REMOTE_TIMEOUT;
  if (v === undefined || v === '') return DEFAULT_REMOTE_TIMEOUT_S * 1000;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new UsageError(`TSMOUNT_REMOTE_TIMEOUT: '${v}' is not a number of seconds`);
  return n === 0 ? 0 : Math.max(1, Math.round(n * 1000));
}

/** `p`, or the error `onTimeout` makes if it has not settled within `ms` (0: no bound). */
export function withDeadline<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  if (!ms) return p;
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(onTimeout()), ms);
    p.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}

/** Where remote nodes report connection trouble unless told otherwise: stderr, as tsmount's other warnings. */
export const remoteLog = (msg: string): void => void process.stderr.write(`tsmount: ${msg}\n`);

/**
 * One reconnect at a time: every request that finds the connection dead waits for the
 * same attempt, and the next failure after it settles starts a new one.
 */
export class Reconnect<T> {
  private attempt: Promise<T> | undefined;

  run(connect: () => Promise<T>): Promise<T> {
    this.attempt ??= connect().finally(() => {
      this.attempt = undefined;
    });
    return this.attempt;
  }

  /** Wait for the attempt in progress, whatever its outcome (close, before closing what it made). */
  async settled(): Promise<void> {
    await this.attempt?.catch(() => undefined);
  }
}

/**
 * Connections shared by the nodes of one chain, by key (an SSH session per server and
 * user, a glfs instance per volume): a backing file on the same server costs no second
 * connection. The first acquire connects; later ones reuse the connection while it is
 * usable; the last release ends it, and the next acquire connects anew. Owned by a
 * protocol driver (one per registry), never module state.
 */
export class SharedConnections<C extends { refs: number }> {
  private readonly entries = new Map<string, { pending: Promise<C>; value?: C }>();

  /** `connect` makes a new connection; `usable` says whether a shared one may still serve. */
  async acquire(key: string, connect: () => Promise<C>, usable: (c: C) => boolean): Promise<C> {
    for (;;) {
      const old = this.entries.get(key);
      if (old) {
        // Someone else's connect: its failure is theirs, and we try on our own.
        const c = await old.pending.catch(() => undefined);
        // Still shared once we have it (its last user may have released it meanwhile).
        if (c && usable(c) && this.entries.get(key) === old) {
          c.refs++;
          return c;
        }
        if (this.entries.get(key) === old) this.entries.delete(key);
        continue;
      }
      const entry: { pending: Promise<C>; value?: C } = { pending: connect() };
      this.entries.set(key, entry);
      try {
        const c = await entry.pending;
        entry.value = c;
        c.refs++;
        return c;
      } catch (err) {
        if (this.entries.get(key) === entry) this.entries.delete(key);
        throw err;
      }
    }
  }

  /** One user fewer; the last one ends the connection (`end`), and it is shared no more. */
  release(key: string, c: C, end: (c: C) => void): void {
    if (--c.refs > 0) return;
    // The entry may already be a successor's (this connection died and was replaced).
    if (this.entries.get(key)?.value === c) this.entries.delete(key);
    end(c);
  }
}

/**
 * The shape of a remote protocol node. Writes mark the node dirty; flush makes them
 * durable through the driver's sync() (nothing under cache=unsafe, nothing when clean,
 * dirty again if it fails); close syncs what is still dirty, cache=unsafe or not, then
 * disconnects once. Nodes know no holes unless their protocol tells them (NBD's
 * base:allocation, Sheepdog's object table), so blockStatus says data.
 */
export abstract class RemoteNode implements BlockNode {
  abstract readonly size: number;
  /** Something was written since the last sync. */
  protected dirty = false;
  protected closed = false;
  /** TSMOUNT_REMOTE_TIMEOUT as it was when the node opened. */
  protected readonly timeoutMs = remoteTimeoutMs();

  protected constructor(
    readonly name: string,
    readonly readOnly: boolean,
    /** cache=unsafe: flush does nothing (close still makes writes durable). */
    private readonly ignoreFlush = false,
  ) {}

  abstract read(offset: number, dst: Uint8Array): Promise<void>;
  abstract write(offset: number, src: Uint8Array): Promise<void>;

  /** Make everything written so far durable on the server (the protocol's fsync). */
  protected abstract sync(): Promise<void>;

  /** Let go of the connection (and any lock it holds); called once, by close. */
  protected abstract disconnect(): Promise<void>;

  async flush(): Promise<void> {
    if (!this.ignoreFlush) await this.syncIfDirty();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, kind: 'data' }];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.syncIfDirty();
    } finally {
      this.closed = true;
      await this.disconnect();
    }
  }

  private async syncIfDirty(): Promise<void> {
    if (this.readOnly || !this.dirty) return;
    this.dirty = false;
    try {
      await this.sync();
    } catch (err) {
      this.dirty = true;
      throw err;
    }
  }

  /** Requests after close fail rather than reconnect. */
  protected checkOpen(): void {
    if (this.closed) throw new IoError(`${this.name}: closed`);
  }

  /**
   * How much of a read at `offset` lies inside the node; the rest of `dst` is zeroed
   * here (a raw image's size is rounded up to 512, and reads past the end are zeros, as
   * for local files).
   */
  protected inside(offset: number, dst: Uint8Array): number {
    const n = Math.max(0, Math.min(dst.length, this.size - offset));
    if (n < dst.length) dst.fill(0, n);
    return n;
  }

  /** Zeros written `piece` bytes at a time, where the protocol (or the server) cannot zero a range. */
  protected async writeZeros(offset: number, length: number, piece: number): Promise<void> {
    const zeros = new Uint8Array(Math.min(length, piece));
    for (let done = 0; done < length; done += zeros.length) {
      await this.write(offset + done, zeros.subarray(0, Math.min(zeros.length, length - done)));
    }
  }

  /** `p` bounded by the remote request timeout. */
  protected bounded<T>(p: Promise<T>, onTimeout: () => Error): Promise<T> {
    return withDeadline(p, this.timeoutMs, onTimeout);
  }
}
