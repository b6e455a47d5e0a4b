// The NBD handshake as a named state machine over the pure parser (libnbd's shape):
// fixed newstyle negotiation, NBD_OPT_STARTTLS first when TLS is wanted (proto.md, "TLS
// support": the transport upgrades the socket in state TLS and calls tlsEstablished()),
// NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT for base:allocation, then
// NBD_OPT_GO (NBD_OPT_EXPORT_NAME when the server lacks GO).
// It is fed the server's bytes and queues the client's; it never touches a socket.
import { RefusedError } from '../../errors.js';
import {
  MAX_OPTION_REPLY,
  NBD_CLISERV_MAGIC,
  NBD_FLAG,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO,
  NBD_MAGIC,
  NBD_OPT,
  NBD_OPTS_MAGIC,
  NBD_REP,
  NBD_REP_ERR_BIT,
  NBD_REP_MAGIC,
} from './constants.js';
import { ByteQueue, encodeFields, encodeOption, getU64, NbdProtocolError } from './parser.js';

/** The server refused what we asked (no such export, TLS required...): a person's error. */
export class NbdRefusedError extends RefusedError {}

export interface HandshakeParams {
  exportName: string;
  /** Ask for structured replies (and through them, block status). */
  structuredReplies: boolean;
  /** Meta contexts to ask for when structured replies are on, e.g. base:allocation. */
  metaContexts: string[];
  /** Require TLS: NBD_OPT_STARTTLS before anything else, and no plaintext fallback. */
  startTls?: boolean;
}

export interface ExportInfo {
  size: number;
  /** Transmission flags (NBD_FLAG_*). */
  flags: number;
  /** NBD_INFO_BLOCK_SIZE, or 1 / 4096 / 32 MiB when the server sends none. */
  minBlock: number;
  preferredBlock: number;
  maxBlock: number;
  structuredReplies: boolean;
  /** Negotiated meta contexts: name -> id. */
  metaContexts: Map<string, number>;
}

export type HandshakeState =
  | 'SERVER_MAGIC'
  | 'SERVER_OPT_MAGIC'
  | 'HANDSHAKE_FLAGS'
  | 'STARTTLS'
  | 'TLS'
  | 'STRUCTURED_REPLY'
  | 'SET_META_CONTEXT'
  | 'GO'
  | 'EXPORT_NAME'
  | 'READY';

/** Option reply header: magic, option, reply type, length. */
const OPT_REPLY_HEADER = 20;

export class Handshake {
  private readonly q = new ByteQueue();
  private readonly out: Uint8Array[] = [];
  private st: HandshakeState = 'SERVER_MAGIC';
  private noZeroes = false;
  private structured = false;
  private readonly contexts = new Map<string, number>();
  private info: Partial<ExportInfo> & { minBlock: number; preferredBlock: number; maxBlock: number } = {
    minBlock: 1,
    preferredBlock: 4096,
    maxBlock: 32 << 20,
  };
  private result: ExportInfo | undefined;

  constructor(private readonly params: HandshakeParams) {}

  get state(): HandshakeState {
    return this.st;
  }

  /** The export, once the state is READY. */
  get export(): ExportInfo | undefined {
    return this.result;
  }

  /** Bytes to send to the server, in order; empties the queue. */
  takeOutput(): Uint8Array[] {
    return this.out.splice(0);
  }

  /** Bytes received after READY belong to the transmission phase. */
  leftover(): Uint8Array {
    return this.q.drain();
  }

  /** Feed the server's bytes; throws NbdProtocolError or NbdRefusedError. */
  feed(chunk: Uint8Array): void {
    this.q.push(chunk);
    while (this.step()) {
      /* each step consumes one message */
    }
  }

  private step(): boolean {
    switch (this.st) {
      case 'SERVER_MAGIC': {
        const b = this.q.take(8);
        if (!b) return false;
        if (view(b).getBigUint64(0) !== NBD_MAGIC) throw new NbdProtocolError('not an NBD server (bad greeting)');
        this.st = 'SERVER_OPT_MAGIC';
        return true;
      }
      case 'SERVER_OPT_MAGIC': {
        const b = this.q.take(8);
        if (!b) return false;
        const magic = view(b).getBigUint64(0);
        if (magic === NBD_CLISERV_MAGIC) throw new NbdRefusedError('the server speaks oldstyle negotiation, which has no export names; not supported');
        if (magic !== NBD_OPTS_MAGIC) throw new NbdProtocolError('bad newstyle magic');
        this.st = 'HANDSHAKE_FLAGS';
        return true;
      }
      case 'HANDSHAKE_FLAGS': {
        const b = this.q.take(2);
        if (!b) return false;
        const flags = view(b).getUint16(0);
        if (!(flags & NBD_FLAG_FIXED_NEWSTYLE)) throw new NbdRefusedError('the server does not speak fixed newstyle negotiation');
        this.noZeroes = !!(flags & NBD_FLAG_NO_ZEROES);
        this.send(encodeFields([{ u32: NBD_FLAG_C_FIXED_NEWSTYLE | (this.noZeroes ? NBD_FLAG_C_NO_ZEROES : 0) }]));
        if (this.params.startTls) {
          // First, so that no option is haggled in the clear (proto.md, "Client-side requirements").
          this.send(encodeOption(NBD_OPT.STARTTLS));
          this.st = 'STARTTLS';
        } else {
          this.sendOptions();
        }
        return true;
      }
      case 'STARTTLS': {
        const r = this.optionReply(NBD_OPT.STARTTLS);
        if (!r) return false;
        if (r.type !== NBD_REP.ACK) {
          const why = r.type === NBD_REP.ERR_UNSUP ? 'it does not support TLS' : r.type === NBD_REP.ERR_POLICY ? 'TLS is off by its policy' : `NBD_OPT_STARTTLS refused (reply ${r.type >>> 0})`;
          const text = r.data.length ? `: ${new TextDecoder().decode(r.data)}` : '';
          throw new NbdRefusedError(`the NBD server does not offer TLS (${why}${text}); not connecting without it`);
        }
        // Anything the server sent after its ACK came in the clear where only TLS may come.
        if (this.q.length) throw new NbdProtocolError('plaintext data after the STARTTLS acknowledgement');
        this.st = 'TLS';
        return false;
      }
      case 'TLS':
        return false;
      case 'STRUCTURED_REPLY': {
        const r = this.optionReply(NBD_OPT.STRUCTURED_REPLY);
        if (!r) return false;
        if (r.type === NBD_REP.ERR_TLS_REQD) throw this.refusal(r.type, r.data);
        this.structured = r.type === NBD_REP.ACK;
        if (this.structured && this.params.metaContexts.length) {
          const queries = this.params.metaContexts.map((str) => ({ str }));
          this.send(encodeOption(NBD_OPT.SET_META_CONTEXT, encodeFields([{ str: this.params.exportName }, { u32: queries.length }, ...queries])));
          this.st = 'SET_META_CONTEXT';
        } else {
          this.sendGo();
        }
        return true;
      }
      case 'SET_META_CONTEXT': {
        const r = this.optionReply(NBD_OPT.SET_META_CONTEXT);
        if (!r) return false;
        if (r.type === NBD_REP.META_CONTEXT) {
          if (r.data.length < 4) throw new NbdProtocolError('short meta context reply');
          const id = view(r.data).getUint32(0);
          this.contexts.set(new TextDecoder().decode(r.data.subarray(4)), id);
          return true; // more may follow, then ACK
        }
        // ACK ends the list; an error means no contexts (block status is then unknown).
        if (r.type !== NBD_REP.ACK) this.contexts.clear();
        this.sendGo();
        return true;
      }
      case 'GO': {
        const r = this.optionReply(NBD_OPT.GO);
        if (!r) return false;
        if (r.type === NBD_REP.INFO) {
          this.takeInfo(r.data);
          return true;
        }
        if (r.type === NBD_REP.ACK) {
          if (this.info.size === undefined || this.info.flags === undefined) throw new NbdProtocolError('NBD_OPT_GO finished without NBD_INFO_EXPORT');
          this.ready();
          return true;
        }
        if (r.type === NBD_REP.ERR_UNSUP) {
          // An old server: NBD_OPT_EXPORT_NAME has no error reply, it just hangs up.
          this.send(encodeOption(NBD_OPT.EXPORT_NAME, new TextEncoder().encode(this.params.exportName)));
          this.st = 'EXPORT_NAME';
          return true;
        }
        throw this.refusal(r.type, r.data);
      }
      case 'EXPORT_NAME': {
        const n = this.noZeroes ? 10 : 134;
        const b = this.q.take(n);
        if (!b) return false;
        const dv = view(b);
        this.info.size = getU64(dv, 0, 'export size');
        this.info.flags = dv.getUint16(8);
        this.ready();
        return true;
      }
      case 'READY':
        return false;
    }
  }

  /** The transport has completed the TLS handshake: negotiate the rest over it. */
  tlsEstablished(): void {
    if (this.st !== 'TLS') throw new NbdProtocolError(`TLS established in handshake state ${this.st}`);
    this.sendOptions();
  }

  private send(b: Uint8Array): void {
    this.out.push(b);
  }

  private sendOptions(): void {
    if (this.params.structuredReplies) {
      this.send(encodeOption(NBD_OPT.STRUCTURED_REPLY));
      this.st = 'STRUCTURED_REPLY';
    } else {
      this.sendGo();
    }
  }

  private sendGo(): void {
    // Ask for the block size constraints too (NBD_INFO_BLOCK_SIZE); EXPORT always comes.
    this.send(encodeOption(NBD_OPT.GO, encodeFields([{ str: this.params.exportName }, { u16: 1 }, { u16: NBD_INFO.BLOCK_SIZE }])));
    this.st = 'GO';
  }

  private optionReply(option: number): { type: number; data: Uint8Array } | undefined {
    if (this.q.length < OPT_REPLY_HEADER) return undefined;
    const h = this.q.take(OPT_REPLY_HEADER)!;
    const dv = view(h);
    const len = dv.getUint32(16);
    if (dv.getBigUint64(0) !== NBD_REP_MAGIC) throw new NbdProtocolError('bad option reply magic');
    if (dv.getUint32(8) !== option) throw new NbdProtocolError(`reply to option ${dv.getUint32(8)} while waiting for ${option}`);
    if (len > MAX_OPTION_REPLY) throw new NbdProtocolError(`option reply of ${len} bytes`);
    const data = this.q.take(len);
    if (!data) {
      // Not all here: put the header back for the next feed.
      const rest = this.q.drain();
      const again = new Uint8Array(h.length + rest.length);
      again.set(h, 0);
      again.set(rest, h.length);
      this.q.push(again);
      return undefined;
    }
    return { type: dv.getUint32(12), data };
  }

  private takeInfo(d: Uint8Array): void {
    if (d.length < 2) throw new NbdProtocolError('empty NBD_REP_INFO');
    const dv = view(d);
    const type = dv.getUint16(0);
    if (type === NBD_INFO.EXPORT) {
      if (d.length !== 12) throw new NbdProtocolError('NBD_INFO_EXPORT of the wrong size');
      this.info.size = getU64(dv, 2, 'export size');
      this.info.flags = dv.getUint16(10);
    } else if (type === NBD_INFO.BLOCK_SIZE) {
      if (d.length !== 14) throw new NbdProtocolError('NBD_INFO_BLOCK_SIZE of the wrong size');
      const min = dv.getUint32(2);
      const pref = dv.getUint32(6);
      const max = dv.getUint32(10);
      // proto.md: powers of two, min <= 64 KiB, min <= pref, pref <= max (max may be odd-sized).
      const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
      if (!pow2(min) || min > 65536 || !pow2(pref) || pref < min || max < min) {
        throw new NbdProtocolError(`bad block sizes min ${min} preferred ${pref} max ${max}`);
      }
      this.info.minBlock = min;
      this.info.preferredBlock = pref;
      this.info.maxBlock = max;
    }
    // NAME, DESCRIPTION and unknown types are informational.
  }

  private ready(): void {
    const flags = this.info.flags!;
    this.result = {
      size: this.info.size!,
      flags: flags & NBD_FLAG.HAS_FLAGS ? flags : 0,
      minBlock: this.info.minBlock,
      preferredBlock: this.info.preferredBlock,
      maxBlock: this.info.maxBlock,
      structuredReplies: this.structured,
      metaContexts: new Map(this.contexts),
    };
    this.st = 'READY';
  }

  private refusal(type: number, data: Uint8Array): Error {
    const text = data.length ? `: ${new TextDecoder().decode(data)}` : '';
    const what = `export '${this.params.exportName}'`;
    switch (type) {
      case NBD_REP.ERR_UNKNOWN:
        return new NbdRefusedError(`the server has no ${what}${text}`);
      case NBD_REP.ERR_POLICY:
        return new NbdRefusedError(`the server refused ${what} by policy${text}`);
      case NBD_REP.ERR_TLS_REQD:
        return new NbdRefusedError(`the server requires TLS for ${what}${text} (use nbds:// or tls-creds)`);
      case NBD_REP.ERR_SHUTDOWN:
        return new NbdRefusedError(`the server is shutting down${text}`);
      case NBD_REP.ERR_BLOCK_SIZE_REQD:
        return new NbdRefusedError(`the server requires block size negotiation${text}`);
      case NBD_REP.ERR_INVALID:
        return new NbdRefusedError(`the server calls the request for ${what} invalid${text}`);
      default:
        if (type & NBD_REP_ERR_BIT) return new NbdRefusedError(`the server refused ${what} (error ${type - NBD_REP_ERR_BIT})${text}`);
        throw new NbdProtocolError(`unexpected option reply type ${type}`);
    }
  }
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
