// The login phase (RFC 7143 section 6): security negotiation (None or CHAP with MD5,
// RFC 1994, one-way or mutual: RFC 7143 section 12.1.3) then operational negotiation, as a pure state machine: next() gives the
// Login Request to send, answer() takes the target's Login Response.
import crypto from 'node:crypto';
import { decodeKeys, encodeKeys, newBhs, OP, setU32, u32, type Pdu } from './pdu.js';

export type DigestChoice = 'CRC32C' | 'CRC32C-NONE' | 'NONE-CRC32C' | 'NONE';

export interface LoginParams {
  initiatorName: string;
  targetName: string;
  user?: string;
  password?: string;
  /** Mutual CHAP: the name and secret the target must prove it knows (with user only). */
  targetUser?: string;
  targetPassword?: string;
  headerDigest: DigestChoice;
  isid: Uint8Array;
  cmdSN: number;
}

/** What the session runs with once in full feature phase. */
export interface Negotiated {
  headerDigest: boolean;
  dataDigest: boolean;
  /** The most data we may put in one PDU (the target's MaxRecvDataSegmentLength). */
  maxSendData: number;
  maxBurst: number;
  firstBurst: number;
  immediateData: boolean;
  initialR2T: boolean;
  tsih: number;
  statSN: number;
  expCmdSN: number;
  maxCmdSN: number;
}

/** A Login Response that refuses: the class/detail and a readable reason. */
export class LoginRefused extends Error {
  constructor(
    readonly statusClass: number,
    readonly statusDetail: number,
    reason: string,
  ) {
    super(reason);
  }
}

/** We read at most this much in one PDU; offered as MaxRecvDataSegmentLength. */
export const OUR_MAX_RECV = 262144;
const OUR_MAX_BURST = 16776192;
const OUR_FIRST_BURST = 262144;

const DIGEST_OFFER: Record<DigestChoice, string> = { CRC32C: 'CRC32C', 'CRC32C-NONE': 'CRC32C,None', 'NONE-CRC32C': 'None,CRC32C', NONE: 'None' };

const STAGE = { SECURITY: 0, OPERATIONAL: 1, FULL: 3 } as const;

export function loginStatusText(cls: number, detail: number): string {
  if (cls === 2) {
    switch (detail) {
      case 1:
        return 'authentication failed (wrong user or password)';
      case 2:
        return 'authorization failure (this initiator may not use the target)';
      case 3:
        return 'target not found';
      case 4:
        return 'target removed';
      case 7:
        return 'missing parameter';
      case 10:
        return 'session does not exist';
      default:
        return `initiator error (detail 0x${detail.toString(16)})`;
    }
  }
  if (cls === 3) return detail === 2 ? 'the target is out of resources' : `target error (detail 0x${detail.toString(16)})`;
  if (cls === 1) return 'the target redirects elsewhere (not supported)';
  return `status class ${cls} detail ${detail}`;
}

/** CHAP_R for an identifier, a secret and a challenge (RFC 1994: MD5 of the three). */
function chapResponse(id: number, secret: string, challenge: Buffer): string {
  const h = crypto.createHash('md5');
  h.update(Buffer.from([id]));
  h.update(Buffer.from(secret, 'utf8'));
  h.update(challenge);
  return `0x${h.digest('hex')}`;
}

export class Login {
  private stage: number = STAGE.SECURITY;
  private step: 'start' | 'chap-a' | 'chap-r' | 'transit' | 'operational' | 'done' = 'start';
  private tsih = 0;
  private expStatSN = 0;
  private readonly itt = 0;
  private chap: { id: number; challenge: Buffer } | undefined;
  /** Mutual CHAP: the identifier and challenge we sent the target, until it answers them. */
  private ours: { id: number; challenge: Buffer } | undefined;
  private targetProven = false;
  private readonly got = new Map<string, string>();
  private result: Negotiated | undefined;

  constructor(private readonly p: LoginParams) {}

  get done(): Negotiated | undefined {
    return this.result;
  }

  /** The next Login Request. */
  next(): Pdu {
    const p = this.p;
    let keys: [string, string][] = [];
    let transit = false;
    let nsg = 0;
    if (this.step === 'start') {
      keys = [
        ['InitiatorName', p.initiatorName],
        ['TargetName', p.targetName],
        ['SessionType', 'Normal'],
        ['AuthMethod', p.user !== undefined ? 'CHAP,None' : 'None'],
      ];
      // Without credentials there is nothing to haggle over: go on at once.
      if (p.user === undefined) {
        transit = true;
        nsg = STAGE.OPERATIONAL;
      }
    } else if (this.step === 'chap-a') {
      keys = [['CHAP_A', '5']];
    } else if (this.step === 'chap-r') {
      const c = this.chap!;
      keys = [
        ['CHAP_N', p.user ?? ''],
        ['CHAP_R', chapResponse(c.id, p.password ?? '', c.challenge)],
      ];
      if (p.targetUser !== undefined) {
        // A challenge of our own, never the target's (RFC 7143 12.1.3: no reflection).
        let challenge: Buffer;
        do challenge = crypto.randomBytes(16);
        while (challenge.equals(c.challenge));
        this.ours = { id: crypto.randomInt(256), challenge };
        keys.push(['CHAP_I', String(this.ours.id)], ['CHAP_C', `0x${challenge.toString('hex')}`]);
      }
      transit = true;
      nsg = STAGE.OPERATIONAL;
    } else if (this.step === 'transit') {
      transit = true;
      nsg = STAGE.OPERATIONAL;
    } else if (this.step === 'operational') {
      keys = this.got.size || this.sentOperational ? [] : this.operationalKeys();
      this.sentOperational = true;
      transit = true;
      nsg = STAGE.FULL;
    }
    const data = encodeKeys(keys);
    const bhs = newBhs(OP.LOGIN_REQ, (transit ? 0x80 : 0) | (this.stage << 2) | (transit ? nsg : 0), data.length, true);
    bhs.set(p.isid, 8);
    bhs[14] = this.tsih >> 8;
    bhs[15] = this.tsih & 0xff;
    setU32(bhs, 16, this.itt);
    setU32(bhs, 24, p.cmdSN);
    setU32(bhs, 28, this.expStatSN);
    return { bhs, data };
  }

  private sentOperational = false;

  private operationalKeys(): [string, string][] {
    return [
      ['HeaderDigest', DIGEST_OFFER[this.p.headerDigest]],
      ['DataDigest', 'None,CRC32C'],
      ['MaxConnections', '1'],
      ['InitialR2T', 'Yes'],
      ['ImmediateData', 'Yes'],
      ['MaxRecvDataSegmentLength', String(OUR_MAX_RECV)],
      ['MaxBurstLength', String(OUR_MAX_BURST)],
      ['FirstBurstLength', String(OUR_FIRST_BURST)],
      ['DefaultTime2Wait', '2'],
      ['DefaultTime2Retain', '0'],
      ['MaxOutstandingR2T', '1'],
      ['DataPDUInOrder', 'Yes'],
      ['DataSequenceInOrder', 'Yes'],
      ['ErrorRecoveryLevel', '0'],
    ];
  }

  /** Take a Login Response; throws LoginRefused or Error (protocol trouble). */
  answer(pdu: Pdu): void {
    const b = pdu.bhs;
    if ((b[0]! & 0x3f) !== OP.LOGIN_RESP) throw new Error(`expected a Login Response, got opcode 0x${(b[0]! & 0x3f).toString(16)}`);
    const cls = b[36]!;
    const detail = b[37]!;
    if (cls !== 0) {
      if (cls === 2 && detail === 1 && this.p.user === undefined) throw new LoginRefused(cls, detail, 'the target requires CHAP: give a user and password (URL, LIBISCSI_CHAP_USERNAME/LIBISCSI_CHAP_PASSWORD, --iscsi)');
      throw new LoginRefused(cls, detail, loginStatusText(cls, detail));
    }
    this.expStatSN = (u32(b, 24) + 1) >>> 0;
    this.tsih = (b[14]! << 8) | b[15]!;
    const keys = decodeKeys(pdu.data);
    const transit = !!(b[1]! & 0x80);
    const csg = (b[1]! >> 2) & 3;
    const nsg = b[1]! & 3;
    if (csg !== this.stage) throw new Error(`login response for stage ${csg} while in stage ${this.stage}`);
    if (this.stage === STAGE.SECURITY) {
      const method = keys.get('AuthMethod');
      if (this.step === 'start' && method !== undefined) {
        if (method === 'CHAP') {
          if (this.p.user === undefined) throw new LoginRefused(2, 1, 'the target wants CHAP: give a user and password');
          this.step = 'chap-a';
          return;
        }
        if (method !== 'None') throw new LoginRefused(2, 1, `the target offers authentication '${method}' (only CHAP and None are supported)`);
      }
      if (this.step === 'chap-a') {
        if (keys.get('CHAP_A') !== '5') throw new LoginRefused(2, 1, `the target wants CHAP algorithm ${keys.get('CHAP_A')} (only MD5)`);
        const id = Number(keys.get('CHAP_I'));
        const c = keys.get('CHAP_C') ?? '';
        if (!Number.isInteger(id) || id < 0 || id > 255 || !/^0x[0-9a-f]+$/i.test(c) || c.length > 2050) throw new Error('bad CHAP challenge from the target');
        this.chap = { id, challenge: Buffer.from(c.slice(2).length % 2 ? `0${c.slice(2)}` : c.slice(2), 'hex') };
        this.step = 'chap-r';
        return;
      }
      if (this.ours) {
        // The answer to our CHAP_R carries the target's proof: its name and response.
        const o = this.ours;
        this.ours = undefined;
        const name = keys.get('CHAP_N');
        const r = keys.get('CHAP_R');
        if (name === undefined || r === undefined) throw new LoginRefused(2, 1, 'the target did not answer our CHAP challenge (mutual CHAP: is an outgoing account bound to the target?)');
        if (name !== this.p.targetUser || r.toLowerCase() !== chapResponse(o.id, this.p.targetPassword ?? '', o.challenge)) {
          throw new LoginRefused(2, 1, 'the target failed mutual CHAP (wrong target user or secret)');
        }
        this.targetProven = true;
      }
      if (transit && nsg === STAGE.OPERATIONAL) {
        if (this.p.targetUser !== undefined && !this.targetProven) throw new LoginRefused(2, 1, 'the target did not authenticate itself (mutual CHAP asked for)');
        this.stage = STAGE.OPERATIONAL;
        this.step = 'operational';
        return;
      }
      if (transit && nsg === STAGE.FULL) throw new Error('the target skipped operational negotiation');
      // The target is not ready to move on (or the CHAP answer is pending): ask again.
      this.step = 'transit';
      return;
    }
    // Operational stage.
    for (const [k, v] of keys) this.got.set(k, v);
    if (transit && nsg === STAGE.FULL) {
      this.stage = STAGE.FULL;
      this.step = 'done';
      this.result = this.negotiated(b);
    }
  }

  private negotiated(b: Uint8Array): Negotiated {
    const g = this.got;
    const num = (k: string, dflt: number, min: number, max: number): number => {
      const v = g.get(k);
      if (v === undefined) return dflt;
      const n = Number(v);
      if (!Number.isInteger(n)) throw new Error(`bad ${k}=${v} from the target`);
      return Math.min(max, Math.max(min, n));
    };
    const yes = (k: string, dflt: boolean): boolean => (g.has(k) ? g.get(k) === 'Yes' : dflt);
    const hd = g.get('HeaderDigest') ?? 'None';
    const dd = g.get('DataDigest') ?? 'None';
    if (!['CRC32C', 'None'].includes(hd) || !['CRC32C', 'None'].includes(dd)) throw new Error(`digests the target chose: HeaderDigest=${hd} DataDigest=${dd}`);
    if (hd === 'CRC32C' && this.p.headerDigest === 'NONE') throw new Error('the target chose a header digest we did not offer');
    if (hd === 'None' && this.p.headerDigest === 'CRC32C') throw new LoginRefused(2, 0, 'the target does not do header digest CRC32C');
    return {
      headerDigest: hd === 'CRC32C',
      dataDigest: dd === 'CRC32C',
      // 512 bytes to 16 MiB - 1 (RFC 7143 13.12); the target declares what it receives.
      maxSendData: num('MaxRecvDataSegmentLength', 8192, 512, 16777215),
      maxBurst: Math.min(OUR_MAX_BURST, num('MaxBurstLength', 262144, 512, 16777215)),
      firstBurst: Math.min(OUR_FIRST_BURST, num('FirstBurstLength', 65536, 512, 16777215)),
      immediateData: yes('ImmediateData', true),
      initialR2T: true,
      tsih: this.tsih,
      statSN: u32(b, 24),
      expCmdSN: u32(b, 28),
      maxCmdSN: u32(b, 32),
    };
  }
}
