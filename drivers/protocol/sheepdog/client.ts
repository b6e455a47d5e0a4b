// One connection to a sheep daemon: a thin transport around proto.ts. Requests are
// sent whole (header, then data) and may be many in flight; responses are matched by
// id. When the daemon hangs up or breaks the protocol, every waiting request fails
// with EIO and the connection is dead.
import net from 'node:net';
import { IoError, RefusedError } from '../../errors.js';
import { remoteTimeoutMs, withDeadline } from '../remote-node.js';
import { decodeResponse, encodeRequest, MessageParser, SD_HEADER_SIZE, type Request, type Response, type SheepdogTarget } from './proto.js';

/** The largest response a request may get: what it asked to read. */
interface Pending {
  expect: number;
  resolve: (r: { rsp: Response; data: Buffer }) => void;
  reject: (e: Error) => void;
}

export function describeSheepAddress(a: SheepdogTarget['address']): string {
  return a.kind === 'unix' ? a.path : `${a.host}:${a.port}`;
}

export class SheepConnection {
  private readonly parser: MessageParser<Response>;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private dead: string | undefined;

  private constructor(
    private readonly socket: net.Socket,
    private readonly name: string,
  ) {
    this.parser = new MessageParser(decodeResponse, (h) => this.pending.get(h.id)?.expect ?? 0);
    socket.on('data', (chunk: Buffer) => {
      let msgs;
      try {
        msgs = this.parser.push(chunk);
      } catch (err) {
        this.fail(`${this.name}: ${(err as Error).message}`);
        return;
      }
      for (const { header, data } of msgs) {
        const p = this.pending.get(header.id);
        if (!p) {
          this.fail(`${this.name}: sheep answered request ${header.id}, which was not asked`);
          return;
        }
        this.pending.delete(header.id);
        p.resolve({ rsp: header, data });
      }
    });
    socket.on('error', (err) => this.fail(`${this.name}: connection to sheep failed: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
    socket.on('close', () => this.fail(`${this.name}: sheep closed the connection`));
  }

  /** Connect within `timeoutMs`; one line naming the address when it cannot. */
  static connect(t: SheepdogTarget, name: string, timeoutMs = 5000): Promise<SheepConnection> {
    return new Promise((resolve, reject) => {
      const socket = t.address.kind === 'unix' ? net.connect(t.address.path) : net.connect(t.address.port, t.address.host);
      const where = describeSheepAddress(t.address);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new RefusedError(`${name}: no sheep answered at ${where} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(new RefusedError(`${name}: cannot connect to sheep at ${where}: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        if (t.address.kind === 'tcp') socket.setNoDelay(true);
        resolve(new SheepConnection(socket, name));
      });
    });
  }

  /** Send a request (and its data for writes); resolves with the response and its data. */
  request(r: Omit<Request, 'id' | 'dataLength'> & { dataLength?: number }, data?: Uint8Array, readLength = 0): Promise<{ rsp: Response; data: Buffer }> {
    if (this.dead) return Promise.reject(new IoError(this.dead));
    const id = this.nextId;
    this.nextId = (this.nextId + 1) >>> 0 || 1;
    const dataLength = r.dataLength ?? (data ? data.length : readLength);
    const answer = new Promise<{ rsp: Response; data: Buffer }>((resolve, reject) => {
      this.pending.set(id, { expect: readLength, resolve, reject });
      const head = encodeRequest({ ...r, id, dataLength });
      this.socket.write(data && data.length ? Buffer.concat([head, data]) : head);
    });
    // A sheep that stays connected but never answers: the connection is taken for dead
    // (every request on it fails with EIO), as for the other remote nodes (remote.ts).
    const ms = remoteTimeoutMs();
    return withDeadline(answer, ms, () => {
      this.fail(`${this.name}: sheep did not answer within ${ms / 1000} s`);
      return new IoError(this.dead!);
    });
  }

  private fail(reason: string): void {
    if (this.dead) return;
    this.dead = reason;
    for (const p of this.pending.values()) p.reject(new IoError(reason));
    this.pending.clear();
    this.socket.destroy();
  }

  close(): void {
    this.dead ??= `${this.name}: connection closed`;
    for (const p of this.pending.values()) p.reject(new IoError(this.dead));
    this.pending.clear();
    this.socket.end();
    this.socket.destroy();
  }
}

export { SD_HEADER_SIZE };
