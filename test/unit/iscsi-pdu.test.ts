// The iSCSI PDU parser/encoder, login state machine, SCSI answers and URL/option
// parsing, without sockets: every target stream is also fed split at every byte.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32c, decodeKeys, encodeKeys, encodePdu, newBhs, OP, PduParser, setU32, snLess, targetFields, u32, type Digests, type Pdu } from '../../drivers/protocol/iscsi/pdu.js';
import { Login, LoginRefused } from '../../drivers/protocol/iscsi/login.js';
import * as scsi from '../../drivers/protocol/iscsi/scsi.js';
import { configureIscsi, DEFAULT_INITIATOR_NAME, iscsiStem, loginSettings, parseIscsiOption, parseIscsiSpec, parseReadconfig, redact } from '../../drivers/protocol/iscsi/uri.js';
import { ProtocolError, UsageError } from '../../drivers/errors.js';
import { parseObjects } from '../../drivers/objects.js';

const cat = (parts: Uint8Array[]): Uint8Array => Buffer.concat(parts);

/** Feed `bytes` whole, then split at every byte into two feeds, then one byte at a time: the same PDUs each way. */
function parseAllWays(bytes: Uint8Array, digests: Digests): Pdu[] {
  const once = (chunks: Uint8Array[]): Pdu[] => {
    const p = new PduParser();
    p.digests = digests;
    const out: Pdu[] = [];
    for (const c of chunks) p.feed(c, (x) => out.push(x));
    expect(p.pending).to.equal(0);
    return out;
  };
  const whole = once([bytes]);
  const flat = (ps: Pdu[]): string => ps.map((p) => Buffer.from(p.bhs).toString('hex') + '/' + Buffer.from(p.data).toString('hex')).join('|');
  for (let i = 1; i < bytes.length; i++) expect(flat(once([bytes.subarray(0, i), bytes.subarray(i)])), `split at ${i}`).to.equal(flat(whole));
  expect(flat(once([...bytes].map((b) => Uint8Array.of(b))))).to.equal(flat(whole));
  return whole;
}

function dataIn(itt: number, offset: number, data: Uint8Array, status?: number): Uint8Array {
  const b = newBhs(OP.DATA_IN, 0x80 | (status !== undefined ? 0x01 : 0), data.length);
  if (status !== undefined) b[3] = status;
  setU32(b, 16, itt);
  setU32(b, 24, 7);
  setU32(b, 28, 10);
  setU32(b, 32, 20);
  setU32(b, 40, offset);
  return b;
}

describe('iSCSI PDUs (unit)', () => {
  it('computes CRC32C as RFC 3720 B.4 and the check value', () => {
    expect(crc32c(new TextEncoder().encode('123456789'))).to.equal(0xe3069283);
    expect(crc32c(new Uint8Array(32))).to.equal(0x8a9136aa);
    expect(crc32c(new Uint8Array(32).fill(0xff))).to.equal(0x62a8ab43);
  });

  for (const digests of [{ header: false, data: false }, { header: true, data: false }, { header: true, data: true }]) {
    it(`parses a stream split at every byte (header digest ${digests.header}, data digest ${digests.data})`, () => {
      const d1 = crypto.randomBytes(13); // padded to 16
      const d2 = crypto.randomBytes(8);
      const nop = newBhs(OP.NOP_IN, 0x80, 0);
      setU32(nop, 16, 0xffffffff);
      setU32(nop, 20, 0x1234);
      const stream = cat([...encodePdu(dataIn(1, 0, d1), d1, digests), ...encodePdu(nop, undefined, digests), ...encodePdu(dataIn(1, 13, d2, 0), d2, digests)]);
      const pdus = parseAllWays(stream, digests);
      expect(pdus).to.have.length(3);
      expect(Buffer.from(pdus[0]!.data).equals(d1)).to.equal(true);
      expect(pdus[1]!.data.length).to.equal(0);
      expect(targetFields(pdus[1]!.bhs)).to.include({ opcode: OP.NOP_IN, itt: 0xffffffff, ttt: 0x1234 });
      expect(targetFields(pdus[2]!.bhs)).to.include({ opcode: OP.DATA_IN, itt: 1, statSN: 7, expCmdSN: 10, maxCmdSN: 20, flags: 0x81 });
      expect(u32(pdus[2]!.bhs, 40)).to.equal(13);
    });
  }

  it('refuses a wrong header or data digest and an oversized data segment', () => {
    const d = Uint8Array.of(1, 2, 3, 4);
    const bytes = cat(encodePdu(dataIn(1, 0, d), d, { header: true, data: true }));
    const flip = (at: number): Uint8Array => {
      const b = new Uint8Array(bytes);
      b[at]! ^= 1;
      return b;
    };
    const feed = (b: Uint8Array): void => {
      const p = new PduParser();
      p.digests = { header: true, data: true };
      p.feed(b, () => undefined);
    };
    expect(() => feed(flip(20))).to.throw(ProtocolError, /header digest/);
    expect(() => feed(flip(48 + 4 + 1))).to.throw(ProtocolError, /data digest/);
    const huge = newBhs(OP.DATA_IN, 0, 0);
    huge[5] = 0x20; // 2 MiB
    expect(() => new PduParser().feed(huge, () => undefined)).to.throw(ProtocolError, /data segment/);
  });

  it('encodes and decodes text keys; serial number arithmetic wraps', () => {
    const k = decodeKeys(encodeKeys([['A', '1'], ['TargetName', 'iqn.x:y'], ['E', '']]));
    expect([...k]).to.deep.equal([['A', '1'], ['TargetName', 'iqn.x:y'], ['E', '']]);
    expect(() => decodeKeys(new TextEncoder().encode('novalue\0'))).to.throw(ProtocolError);
    expect(snLess(1, 2)).to.equal(true);
    expect(snLess(0xffffffff, 0)).to.equal(true);
    expect(snLess(0, 0xffffffff)).to.equal(false);
    expect(snLess(5, 5)).to.equal(false);
  });
});

/** A Login Response from a pretend target. */
function loginResp(flags: number, keys: [string, string][], o: { cls?: number; detail?: number; tsih?: number } = {}): Pdu {
  const data = encodeKeys(keys);
  const b = newBhs(OP.LOGIN_RESP, flags, data.length);
  b[15] = o.tsih ?? 0;
  setU32(b, 24, 100);
  setU32(b, 28, 5);
  setU32(b, 32, 36);
  b[36] = o.cls ?? 0;
  b[37] = o.detail ?? 0;
  // Through the parser, split at every byte, as the transport would give it.
  const pdus = parseAllWays(cat(encodePdu(b, data, { header: false, data: false })), { header: false, data: false });
  return pdus[0]!;
}

describe('iSCSI login (unit)', () => {
  const base = { initiatorName: 'iqn.i', targetName: 'iqn.t', isid: new Uint8Array(6), cmdSN: 5 };

  it('logs in with CHAP: the answer is MD5(id, secret, challenge)', () => {
    const l = new Login({ ...base, user: 'alice', password: 'pw', headerDigest: 'CRC32C' });
    let req = l.next();
    expect(req.bhs[0]).to.equal(0x43);
    expect(req.bhs[1]).to.equal(0x00);
    expect(decodeKeys(req.data).get('AuthMethod')).to.equal('CHAP,None');
    l.answer(loginResp(0x00, [['AuthMethod', 'CHAP']]));
    req = l.next();
    expect(decodeKeys(req.data).get('CHAP_A')).to.equal('5');
    const challenge = crypto.randomBytes(16);
    l.answer(loginResp(0x00, [['CHAP_A', '5'], ['CHAP_I', '7'], ['CHAP_C', `0x${challenge.toString('hex')}`]]));
    req = l.next();
    const want = crypto.createHash('md5').update(Buffer.concat([Buffer.of(7), Buffer.from('pw'), challenge])).digest('hex');
    expect(decodeKeys(req.data).get('CHAP_R')).to.equal(`0x${want}`);
    expect(decodeKeys(req.data).get('CHAP_N')).to.equal('alice');
    expect(req.bhs[1]).to.equal(0x81); // T, CSG 0, NSG 1
    l.answer(loginResp(0x81, []));
    req = l.next();
    const ops = decodeKeys(req.data);
    expect(ops.get('HeaderDigest')).to.equal('CRC32C');
    expect(req.bhs[1]).to.equal(0x87); // T, CSG 1, NSG 3
    expect(u32(req.bhs, 28)).to.equal(101); // ExpStatSN
    l.answer(loginResp(0x87, [['HeaderDigest', 'CRC32C'], ['DataDigest', 'None'], ['MaxRecvDataSegmentLength', '8192'], ['MaxBurstLength', '1048576'], ['FirstBurstLength', '65536'], ['ImmediateData', 'Yes']], { tsih: 9 }));
    expect(l.done).to.include({ headerDigest: true, dataDigest: false, maxSendData: 8192, maxBurst: 1048576, firstBurst: 65536, immediateData: true, tsih: 9, statSN: 100, maxCmdSN: 36 });
  });

  it('goes straight on without credentials; refusals become LoginRefused with the reason', () => {
    const l = new Login({ ...base, headerDigest: 'NONE-CRC32C' });
    const req = l.next();
    expect(req.bhs[1]).to.equal(0x81);
    expect(decodeKeys(req.data).get('AuthMethod')).to.equal('None');
    expect(() => l.answer(loginResp(0x00, [], { cls: 2, detail: 3 }))).to.throw(LoginRefused, /target not found/);
    const m = new Login({ ...base, headerDigest: 'NONE' });
    m.next();
    expect(() => m.answer(loginResp(0x00, [], { cls: 2, detail: 1 }))).to.throw(LoginRefused, /requires CHAP/);
    const c = new Login({ ...base, user: 'u', password: 'p', headerDigest: 'NONE' });
    c.next();
    expect(() => c.answer(loginResp(0x00, [], { cls: 2, detail: 1 }))).to.throw(LoginRefused, /authentication failed/);
  });
});

describe('iSCSI SCSI answers (unit)', () => {
  it('builds CDBs and reads capacity, inquiry and VPD pages', () => {
    expect([...scsi.readWrite(false, 16, 0x1_0000_0001, 8)].slice(0, 14)).to.deep.equal([0x88, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 8]);
    expect([...scsi.readWrite(true, 10, 0x01020304, 0x10)].slice(0, 9)).to.deep.equal([0x2a, 0, 1, 2, 3, 4, 0, 0, 0x10]);
    expect([...scsi.readWrite(false, 12, 2, 3)].slice(0, 10)).to.deep.equal([0xa8, 0, 0, 0, 0, 2, 0, 0, 0, 3]);
    const cap = new Uint8Array(32);
    cap[7] = 0xff;
    cap[10] = 0x02;
    cap[14] = 0xc0;
    expect(scsi.parseCapacity16(cap)).to.deep.equal({ blocks: 256, blockSize: 512, lbpme: true, lbprz: true });
    expect(scsi.parseCapacity10(Uint8Array.of(0, 0, 0, 9, 0, 0, 8, 0))).to.deep.equal({ blocks: 10, blockSize: 2048, lbpme: false, lbprz: false });
    expect(scsi.parseInquiry(Uint8Array.of(0x05, 0x80, 0, 0, 0))).to.include({ qualifier: 0, deviceType: 5, removable: true });
    expect(scsi.parseInquiry(Uint8Array.of(0x7f, 0, 0, 0, 0)).qualifier).to.equal(3);
    expect([...scsi.parseSupportedPages(Uint8Array.of(0, 0, 0, 3, 0, 0xb0, 0xb2))]).to.deep.equal([0, 0xb0, 0xb2]);
    expect([...scsi.parseSupportedPages(Uint8Array.of(0, 0, 0xff, 0xff, 0))]).to.deep.equal([0]); // length capped by the data
    const u = scsi.unmap(5, 7);
    expect(u.cdb[0]).to.equal(0x42);
    expect(u.cdb[8]).to.equal(24);
    expect(u.data[15]).to.equal(5);
    expect(u.data[19]).to.equal(7);
  });

  it('turns sense data into errno and a readable line', () => {
    const fixed = (key: number, asc: number, ascq: number): Uint8Array => {
      const s = new Uint8Array(20);
      s[1] = 18;
      s[2] = 0x70;
      s[4] = key;
      s[14] = asc;
      s[15] = ascq;
      return s;
    };
    const s = scsi.parseSense(fixed(5, 0x21, 0))!;
    expect(s).to.deep.equal({ key: 5, asc: 0x21, ascq: 0 });
    expect(scsi.describeSense(s)).to.equal('illegal request: logical block address out of range');
    expect(scsi.senseErrno(scsi.parseSense(fixed(7, 0x27, 0))!)).to.equal(30); // EROFS
    expect(scsi.senseErrno(scsi.parseSense(fixed(5, 0x20, 0))!)).to.equal(95); // ENOTSUP
    expect(scsi.senseRetryable(scsi.parseSense(fixed(6, 0x29, 0))!)).to.equal(true);
    expect(scsi.parseSense(Uint8Array.of(0, 4, 0x72, 0x03, 0x11, 0x00))).to.deep.equal({ key: 3, asc: 0x11, ascq: 0 });
    expect(scsi.parseSense(Uint8Array.of(0, 200, 0x70))).to.equal(undefined);
  });
});

describe('iSCSI URLs and options (unit)', () => {
  afterEach(() => configureIscsi({}));

  it('parses iscsi:// URLs as QEMU does', () => {
    expect(parseIscsiSpec('iscsi://host/iqn.2001-04.com.example:disk/1')).to.deep.equal({ host: 'host', port: 3260, iqn: 'iqn.2001-04.com.example:disk', lun: 1 });
    expect(parseIscsiSpec('iscsi://me%p%w@[::1]:3261/iqn.x:y/0')).to.deep.equal({ host: '::1', port: 3261, iqn: 'iqn.x:y', lun: 0, user: 'me', password: 'p%w' });
    expect(() => parseIscsiSpec('iscsi://host/iqn.x')).to.throw(UsageError);
    expect(() => parseIscsiSpec('iscsi://host:99999/iqn.x/1')).to.throw(UsageError, /port/);
    expect(() => parseIscsiSpec('iscsi://host/iqn.x/lun')).to.throw(UsageError, /LUN/);
    expect(redact('iscsi://me%secret@h/iqn.x/1')).to.equal('iscsi://me%***@h/iqn.x/1');
    expect(iscsiStem('iscsi://h/iqn.2001-04.com.example:storage.disk1/2')).to.equal('storage.disk1-lun2');
  });

  it('reads --iscsi, [iscsi] sections and LIBISCSI_CHAP_* in QEMU order', () => {
    expect(parseIscsiOption('user=a,password=b,,c,header-digest=crc32c')).to.deep.equal({ user: 'a', password: 'b,c', headerDigest: 'CRC32C' });
    expect(() => parseIscsiOption('colour=blue')).to.throw(UsageError, /unknown/);
    const conf = parseReadconfig('# c\n[drive "x"]\n  file = "y"\n[iscsi]\n  user = "gen"\n  password = "gp"\n[iscsi "iqn.t"]\n  user = "tu"\n  password = "t\\"p"\n', 'f');
    expect(conf.get('')).to.deep.equal({ user: 'gen', password: 'gp' });
    expect(conf.get('iqn.t')).to.deep.equal({ user: 'tu', password: 't"p' });
    expect(() => parseReadconfig('[iscsi]\nuser = bare\n', 'f')).to.throw(UsageError, /f:2/);
    const t = parseIscsiSpec('iscsi://h/iqn.t/1');
    expect(loginSettings(t, {})).to.deep.equal({ user: undefined, password: undefined, initiatorName: DEFAULT_INITIATOR_NAME, headerDigest: 'NONE-CRC32C' });
    expect(loginSettings(t, { LIBISCSI_CHAP_USERNAME: 'e', LIBISCSI_CHAP_PASSWORD: 'ep' })).to.include({ user: 'e', password: 'ep' });
    expect(loginSettings(parseIscsiSpec('iscsi://u%up@h/iqn.t/1'), { LIBISCSI_CHAP_USERNAME: 'e' })).to.include({ user: 'u', password: 'up' });
    configureIscsi({ iscsi: ['initiator-name=iqn.me'] });
    expect(loginSettings(t, {})).to.include({ initiatorName: 'iqn.me', user: undefined });
    configureIscsi({ iscsi: ['user=cli,password=cp'] });
    expect(loginSettings(parseIscsiSpec('iscsi://u%up@h/iqn.t/1'), {})).to.include({ user: 'cli', password: 'cp' });
  });

  it('takes password-secret=ID (an --object secret) in --iscsi and in [iscsi] sections of --readconfig', () => {
    const objs = parseObjects(['secret,id=s1,data=wonderland12', 'secret,id=s2,data=bG9va2luZyxnbGFzcw==,format=base64', 'tls-creds-psk,id=t,dir=/nonexistent']);
    expect(parseIscsiOption('user=alice,password-secret=s1', objs)).to.deep.equal({ user: 'alice', password: 'wonderland12' });
    const conf = parseReadconfig('[iscsi]\n  user = "gen"\n  password-secret = "s1"\n[iscsi "iqn.t"]\n  user = "bob"\n  password-secret = "s2"\n', 'f', objs);
    expect(conf.get('')).to.deep.equal({ user: 'gen', password: 'wonderland12' });
    expect(conf.get('iqn.t')).to.deep.equal({ user: 'bob', password: 'looking,glass' });
    // What QEMU refuses, refused in one line naming where.
    expect(() => parseIscsiOption('user=a,password-secret=nope', objs)).to.throw(UsageError, /--iscsi: iscsi password-secret=nope: no --object with id 'nope'/);
    expect(() => parseIscsiOption('user=a,password-secret=t', objs)).to.throw(UsageError, /'t' is not a secret object/);
    expect(() => parseIscsiOption('user=a,password=p,password-secret=s1', objs)).to.throw(UsageError, /'password' and 'password-secret' properties are mutually exclusive/);
    expect(() => parseReadconfig('[iscsi "iqn.t"]\npassword-secret = "s9"\n', 'f', objs)).to.throw(UsageError, /f \[iscsi "iqn.t"\]: .*no --object with id 's9'/);
    // Through configureIscsi, as tsmount and tsimg call it: the objects come from --object.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'iscsi-conf-'));
    try {
      const file = path.join(dir, 'iscsi.conf');
      fs.writeFileSync(file, '[iscsi "iqn.t"]\n  user = "carol"\n  password-secret = "pw"\n');
      configureIscsi({ readconfig: [file], object: ['secret,id=pw,data=from-object'] });
      expect(loginSettings(parseIscsiSpec('iscsi://h/iqn.t/1'), {})).to.include({ user: 'carol', password: 'from-object' });
      configureIscsi({ iscsi: ['user=dave,password-secret=pw'], object: ['secret,id=pw,data=cli-object'] });
      expect(loginSettings(parseIscsiSpec('iscsi://h/iqn.t/1'), {})).to.include({ user: 'dave', password: 'cli-object' });
      expect(() => configureIscsi({ iscsi: ['user=dave,password-secret=pw'] })).to.throw(UsageError, /no --object with id 'pw'/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
      configureIscsi({});
    }
  });
});
