// One iSCSI session over one TCP connection: a thin transport around the login state
// machine and the PDU parser. Tasks are matched by initiator task tag; CmdSN waits
// for the target's window (MaxCmdSN); R2Ts are answered with Data-Out, NOP-In pings
// with NOP-Out. When the connection fails, every task still waiting is rejected with
// ConnectionLost (node.ts logs in again and sends them again).
import crypto from 'node:crypto';
import net from 'node:net';
import { constants as osc } from 'node:os';
import { IoError, UsageError } from '../../errors.js';
import { Login, LoginRefused, type DigestChoice, type Negotiated } from './login.js';
import { encodePdu, newBhs, OP, PduParser, RESERVED_TAG, setLun, setU32, snLess, targetFields, u32, type Pdu } from './pdu.js';

const E = osc.errno;

export interface ConnectOptions {
  host: string;
  port: number;
  targetName: string;
  initiatorName: string;
  user?: string;
  password?: string;
  /** Mutual CHAP: what the target must prove it knows. */
  targetUser?: string;
  targetPassword?: string;
  headerDigest: DigestChoice;
  /** Connect and login must finish within this time. */
  timeoutMs: number;
  /** A task without an answer this long kills the connection. */
  taskTimeoutMs: number;
  /** Names the image in messages (no password). */
  name: string;
  log: (msg: string) => void;
}

export interface TaskRequest {
  lun: number;
  cdb: Uint8Array;
  /** Bytes a read expects; Data-In lands here. */
  dst?: Uint8Array;
  /** A write's data. */
  data?: Uint8Array;
}

export interface TaskResult {
  status: number;
  /** The SCSI Response's data segment (sense length + sense) when status is not GOOD. */
  senseData: Uint8Array;
  /** Bytes the target sent into dst. */
  received: number;
}

/** The connection went away while the task waited: worth sending again on a new one. */
export class ConnectionLost extends IoError {}

interface Task extends TaskRequest {
  itt: number;
  cmdSN: number;
  received: number;
  started: number;
  resolve: (r: TaskResult) => void;
  reject: (e: Error) => void;
}

export class IscsiConnection {
  private readonly parser = new PduParser();
  private readonly tasks = new Map<number, Task>();
  private readonly waiting: Task[] = [];
  private nextItt = 1;
  private cmdSN: number;
  private expStatSN: number;
  private maxCmdSN: number;
  private deadReason: string | undefined;
  private readonly closed: Promise<void>;
  private readonly watchdog: NodeJS.Timeout;
  private logoutDone: (() => void) | undefined;

  private constructor(
    private readonly socket: net.Socket,
    readonly params: Negotiated,
    private readonly opts: ConnectOptions,
    cmdSN: number,
    leftover: Uint8Array,
  ) {
    this.cmdSN = cmdSN;
    this.expStatSN = (params.statSN + 1) >>> 0;
    this.maxCmdSN = params.maxCmdSN;
    this.parser.digests = { header: params.headerDigest, data: params.dataDigest };
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.die(`connection error: ${(err as NodeJS.ErrnoException).code ?? err.message}`));
    socket.on('close', () => this.die('the target closed the connection'));
    this.watchdog = setInterval(() => {
      const now = Date.now();
      for (const t of this.tasks.values()) {
        if (now - t.started > opts.taskTimeoutMs) return this.die(`no answer from the target for ${Math.round(opts.taskTimeoutMs / 1000)} s`);
      }
    }, Math.min(5000, opts.taskTimeoutMs)).unref();
    if (leftover.length) this.onData(leftover);
  }

  /** Connect and log in; one-line UsageError/IoError on failure, within the timeout. */
  static connect(opts: ConnectOptions): Promise<IscsiConnection> {
    const where = `${opts.host.includes(':') ? `[${opts.host}]` : opts.host}:${opts.port}`;
    return new Promise((resolve, reject) => {
      const isid = new Uint8Array(6);
      isid[0] = 0x80; // random qualifier format (RFC 7143 10.12.5)
      isid.set(crypto.randomBytes(5), 1);
      const cmdSN = crypto.randomBytes(4).readUInt32BE(0) >>> 8;
      const login = new Login({ initiatorName: opts.initiatorName, targetName: opts.targetName, user: opts.user, password: opts.password, targetUser: opts.targetUser, targetPassword: opts.targetPassword, headerDigest: opts.headerDigest, isid, cmdSN });
      const parser = new PduParser();
      const socket = net.connect({ host: opts.host, port: opts.port });
      socket.setNoDelay(true);
      let settled = false;
      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new IoError(`${opts.name}: no iSCSI login from ${where} within ${opts.timeoutMs / 1000} s`, E.ETIMEDOUT)), opts.timeoutMs);
      const send = (p: Pdu): void => {
        for (const b of encodePdu(p.bhs, p.data, { header: false, data: false })) socket.write(b);
      };
      const onData = (chunk: Buffer): void => {
        try {
          const got: Pdu[] = [];
          parser.feed(chunk, (p) => got.push(p));
          for (const p of got) {
            if (settled) return;
            login.answer(p);
            const done = login.done;
            if (done) {
              settled = true;
              clearTimeout(timer);
              socket.off('data', onData);
              socket.off('error', onError);
              socket.off('close', onClose);
              // Nothing may follow the last Login Response before our first command.
              return resolve(new IscsiConnection(socket, done, opts, cmdSN, new Uint8Array(0)));
            }
            send(login.next());
          }
        } catch (err) {
          if (err instanceof LoginRefused) fail(new UsageError(`${opts.name}: iSCSI login to ${where} refused: ${err.message}`, err.statusDetail === 3 ? E.ENOENT : err.statusClass === 2 && err.statusDetail <= 2 ? E.EACCES : E.EIO));
          else fail(new IoError(`${opts.name}: iSCSI login to ${where} failed: ${err instanceof Error ? err.message : String(err)}`));
        }
      };
      const onError = (err: NodeJS.ErrnoException): void => {
        const why = err.code === 'ECONNREFUSED' ? 'connection refused' : err.code === 'ENOTFOUND' || err.code === 'EAI_AGAIN' ? 'unknown host' : (err.code ?? err.message);
        fail(new UsageError(`${opts.name}: cannot connect to iSCSI target ${where}: ${why}`, err.code === 'ECONNREFUSED' ? E.ECONNREFUSED : E.EHOSTUNREACH));
      };
      const onClose = (): void => fail(new UsageError(`${opts.name}: the iSCSI target ${where} hung up during login`, E.ECONNRESET));
      socket.on('data', onData);
      socket.on('error', onError);
      socket.on('close', onClose);
      socket.once('connect', () => send(login.next()));
    });
  }

  get alive(): boolean {
    return this.deadReason === undefined;
  }

  get inFlight(): number {
    return this.tasks.size + this.waiting.length;
  }

  /** Send one SCSI command; resolves with its status once the target has answered. */
  command(req: TaskRequest): Promise<TaskResult> {
    if (this.deadReason !== undefined) return Promise.reject(new ConnectionLost(`${this.opts.name}: ${this.deadReason}`));
    return new Promise<TaskResult>((resolve, reject) => {
      let itt = this.nextItt;
      this.nextItt = (this.nextItt + 1) >>> 0;
      if (this.nextItt === RESERVED_TAG) this.nextItt = 1;
      if (itt === RESERVED_TAG) itt = 0;
      const t: Task = { ...req, itt, cmdSN: 0, received: 0, started: Date.now(), resolve, reject };
      this.tasks.set(itt, t);
      this.waiting.push(t);
      this.pump();
    });
  }

  /** Log out (outstanding tasks finish first) and close. */
  async close(): Promise<void> {
    clearInterval(this.watchdog);
    if (this.deadReason === undefined) {
      const t0 = Date.now();
      while (this.tasks.size && this.deadReason === undefined && Date.now() - t0 < this.opts.taskTimeoutMs) await new Promise((r) => setTimeout(r, 20));
    }
    if (this.deadReason === undefined) {
      const bhs = newBhs(OP.LOGOUT_REQ, 0x80, 0, true);
      setU32(bhs, 16, RESERVED_TAG - 1);
      setU32(bhs, 24, this.cmdSN);
      setU32(bhs, 28, this.expStatSN);
      const answered = new Promise<void>((r) => (this.logoutDone = r));
      this.write(bhs);
      const t = setTimeout(() => this.socket.destroy(), 2000);
      await Promise.race([answered, this.closed]);
      this.deadReason = 'connection closed';
      this.socket.end();
      await this.closed;
      clearTimeout(t);
    } else {
      this.socket.destroy();
    }
  }

  private write(bhs: Uint8Array, data?: Uint8Array): void {
    const parts = encodePdu(bhs, data, { header: this.params.headerDigest, data: this.params.dataDigest });
    this.socket.cork();
    for (const p of parts) this.socket.write(p);
    this.socket.uncork();
  }

  /** Send the waiting commands the target's window admits. */
  private pump(): void {
    while (this.waiting.length && this.deadReason === undefined && !snLess(this.maxCmdSN, this.cmdSN)) {
      const t = this.waiting.shift()!;
      t.cmdSN = this.cmdSN;
      this.cmdSN = (this.cmdSN + 1) >>> 0;
      const read = !!t.dst;
      const write = !!t.data;
      const length = read ? t.dst!.length : write ? t.data!.length : 0;
      const immediate = write && this.params.immediateData ? t.data!.subarray(0, Math.min(length, this.params.firstBurst, this.params.maxSendData)) : undefined;
      const bhs = newBhs(OP.SCSI_CMD, 0x80 | (read ? 0x40 : 0) | (write ? 0x20 : 0) | 1, immediate?.length ?? 0);
      setLun(bhs, 8, t.lun);
      setU32(bhs, 16, t.itt);
      setU32(bhs, 20, length);
      setU32(bhs, 24, t.cmdSN);
      setU32(bhs, 28, this.expStatSN);
      bhs.set(t.cdb.subarray(0, 16), 32);
      t.started = Date.now();
      this.write(bhs, immediate);
    }
  }

  private onData(chunk: Uint8Array): void {
    if (this.deadReason !== undefined) return;
    try {
      this.parser.feed(chunk, (p) => this.onPdu(p));
    } catch (err) {
      this.die(`bad PDU from the target: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  private onPdu(p: Pdu): void {
    if (this.deadReason !== undefined) return;
    const f = targetFields(p.bhs);
    const windowed = f.opcode !== OP.REJECT;
    if (windowed && snLess(this.maxCmdSN, f.maxCmdSN) && !snLess(f.maxCmdSN, (f.expCmdSN - 1) >>> 0)) this.maxCmdSN = f.maxCmdSN;
    switch (f.opcode) {
      case OP.SCSI_RESP: {
        this.statSN(f.statSN);
        const t = this.tasks.get(f.itt);
        if (!t) return this.die(`a SCSI Response for unknown task 0x${f.itt.toString(16)}`);
        this.tasks.delete(f.itt);
        if (p.bhs[2] !== 0) {
          t.reject(new IoError(`${this.opts.name}: the target failed the command (iSCSI response 0x${p.bhs[2]!.toString(16)})`));
        } else {
          t.resolve({ status: p.bhs[3]!, senseData: p.data, received: t.received });
        }
        break;
      }
      case OP.DATA_IN: {
        const t = this.tasks.get(f.itt);
        if (!t || !t.dst) return this.die(`Data-In for unknown task 0x${f.itt.toString(16)}`);
        const offset = u32(p.bhs, 40);
        if (offset + p.data.length > t.dst.length) return this.die(`Data-In past the end of the buffer (${offset}+${p.data.length} > ${t.dst.length})`);
        t.dst.set(p.data, offset);
        t.received += p.data.length;
        if (f.flags & 0x01) {
          this.statSN(f.statSN);
          this.tasks.delete(f.itt);
          t.resolve({ status: p.bhs[3]!, senseData: new Uint8Array(0), received: t.received });
        }
        break;
      }
      case OP.R2T: {
        const t = this.tasks.get(f.itt);
        if (!t || !t.data) return this.die(`R2T for unknown task 0x${f.itt.toString(16)}`);
        const offset = u32(p.bhs, 40);
        const want = u32(p.bhs, 44);
        if (offset + want > t.data.length || want === 0) return this.die(`R2T for ${offset}+${want} of a ${t.data.length}-byte write`);
        let dataSN = 0;
        for (let o = offset; o < offset + want; o += this.params.maxSendData) {
          const n = Math.min(this.params.maxSendData, offset + want - o);
          const last = o + n >= offset + want;
          const bhs = newBhs(OP.DATA_OUT, last ? 0x80 : 0, n);
          bhs.set(p.bhs.subarray(8, 16), 8);
          setU32(bhs, 16, t.itt);
          setU32(bhs, 20, f.ttt);
          setU32(bhs, 28, this.expStatSN);
          setU32(bhs, 36, dataSN++);
          setU32(bhs, 40, o);
          this.write(bhs, t.data.subarray(o, o + n));
        }
        break;
      }
      case OP.NOP_IN: {
        if (f.itt !== RESERVED_TAG) this.statSN(f.statSN);
        if (f.ttt !== RESERVED_TAG) {
          // A ping from the target: answer at once, echoing its data (RFC 7143 11.18).
          const bhs = newBhs(OP.NOP_OUT, 0x80, p.data.length, true);
          bhs.set(p.bhs.subarray(8, 16), 8);
          setU32(bhs, 16, RESERVED_TAG);
          setU32(bhs, 20, f.ttt);
          setU32(bhs, 24, this.cmdSN);
          setU32(bhs, 28, this.expStatSN);
          this.write(bhs, p.data);
        }
        break;
      }
      case OP.LOGOUT_RESP:
        this.statSN(f.statSN);
        this.logoutDone?.();
        break;
      case OP.ASYNC: {
        const event = p.bhs[36]!;
        // 1: the target asks us to log out; 2/3: it drops the connection/session.
        if (event >= 1 && event <= 3) this.die(`the target ends the session (async event ${event})`);
        break;
      }
      case OP.REJECT: {
        const reason = p.bhs[2]!;
        const itt = p.data.length >= 20 ? u32(p.data, 16) : RESERVED_TAG;
        const t = this.tasks.get(itt);
        if (t) {
          this.tasks.delete(itt);
          t.reject(new IoError(`${this.opts.name}: the target rejected a PDU (reason 0x${reason.toString(16)})`));
        } else {
          this.opts.log(`${this.opts.name}: the target rejected a PDU (reason 0x${reason.toString(16)})`);
        }
        break;
      }
      default:
        this.opts.log(`${this.opts.name}: ignoring iSCSI PDU opcode 0x${f.opcode.toString(16)}`);
    }
    this.pump();
  }

  private statSN(sn: number): void {
    const next = (sn + 1) >>> 0;
    if (snLess(this.expStatSN, next)) this.expStatSN = next;
  }

  /** The connection is unusable: every task fails with ConnectionLost. */
  die(reason: string): void {
    if (this.deadReason !== undefined) return;
    this.deadReason = reason;
    clearInterval(this.watchdog);
    const n = this.tasks.size;
    this.opts.log(`${this.opts.name}: ${reason}${n ? `; ${n} command(s) in flight` : ''}`);
    for (const t of this.tasks.values()) t.reject(new ConnectionLost(`${this.opts.name}: ${reason}`));
    this.tasks.clear();
    this.waiting.length = 0;
    this.socket.destroy();
  }
}
