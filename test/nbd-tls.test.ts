// NBD over TLS: the STARTTLS step of the handshake (no sockets), nbds:// names and
// QEMU's --object tls-creds-*, then real servers on loopback (qemu-nbd --tls-creds,
// nbdkit --tls=require) with certificates and PSK keys made by the test with openssl.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { openImage, type ImageOptions } from '../drivers/open.js';
import { NbdNode } from '../drivers/protocol/nbd/node.js';
import { TsmountError } from '../drivers/errors.js';
import { NBD_MAGIC, NBD_OPT, NBD_OPTS_MAGIC, NBD_REP, NBD_REP_MAGIC, NBD_INFO } from '../drivers/protocol/nbd/constants.js';
import { Handshake, NbdRefusedError } from '../drivers/protocol/nbd/handshake.js';
import { NbdProtocolError } from '../drivers/protocol/nbd/parser.js';
import { formatNbdUri, parseNbdSpec } from '../drivers/protocol/nbd/uri.js';
import { parseObjects } from '../drivers/objects.js';
import { imageOptsToSpec, jsonToSpec } from '../drivers/protocol/remote.js';
import { checkImage, createImage, md5File, qemuIo, rawMd5, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';
import { nodeMd5, pattern, testOptions } from './helpers/images.js';
import { freePort, startServer, type RunningServer } from './helpers/servers.js';
import { makePki, makePsk, type TestPki } from './helpers/tls-certs.js';

const MiB = 1 << 20;
const ro: ImageOptions = testOptions({ metadataCacheBytes: 4 * MiB });

// ---- the handshake's STARTTLS step, without sockets ---------------------------------

function cat(...parts: Uint8Array[]): Uint8Array {
  return Uint8Array.from(Buffer.concat(parts));
}
function be(bytes: number, v: bigint | number): Uint8Array {
  const b = Buffer.alloc(bytes);
  if (bytes === 8) b.writeBigUInt64BE(BigInt(v));
  else if (bytes === 4) b.writeUInt32BE(Number(v));
  else b.writeUInt16BE(Number(v));
  return b;
}
const optReply = (opt: number, type: number, data: Uint8Array = new Uint8Array(0)): Uint8Array => cat(be(8, NBD_REP_MAGIC), be(4, opt), be(4, type), be(4, data.length), data);
const greeting = cat(be(8, NBD_MAGIC), be(8, NBD_OPTS_MAGIC), be(2, 3));

/** The options the client sent, in order (after the 4 bytes of client flags). */
function optionsSent(sent: Uint8Array[]): number[] {
  const b = Buffer.concat(sent.slice(1));
  const out: number[] = [];
  for (let at = 0; at < b.length; at += 16 + b.readUInt32BE(at + 12)) out.push(b.readUInt32BE(at + 8));
  return out;
}

describe('NBD TLS: STARTTLS in the handshake state machine', () => {
  const params = { exportName: 'disk', structuredReplies: true, metaContexts: ['base:allocation'], startTls: true };
  const afterTls = cat(
    optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ACK),
    optReply(NBD_OPT.SET_META_CONTEXT, NBD_REP.ACK),
    optReply(NBD_OPT.GO, NBD_REP.INFO, cat(be(2, NBD_INFO.EXPORT), be(8, 1 << 20), be(2, 1))),
    optReply(NBD_OPT.GO, NBD_REP.ACK),
  );

  it('sends STARTTLS first, waits for the transport in state TLS, then negotiates the rest, however the bytes are split', () => {
    const plain = cat(greeting, optReply(NBD_OPT.STARTTLS, NBD_REP.ACK));
    for (let cut = 0; cut <= plain.length; cut++) {
      const hs = new Handshake(params);
      const sent: Uint8Array[] = [];
      for (const piece of [plain.subarray(0, cut), plain.subarray(cut)]) {
        hs.feed(piece);
        sent.push(...hs.takeOutput());
      }
      expect(hs.state, `cut ${cut}`).to.equal('TLS');
      expect(optionsSent(sent)).to.deep.equal([NBD_OPT.STARTTLS]);
      hs.tlsEstablished();
      sent.push(...hs.takeOutput());
      for (const b of afterTls) {
        hs.feed(Uint8Array.of(b));
        sent.push(...hs.takeOutput());
      }
      expect(hs.state).to.equal('READY');
      expect(hs.export?.size).to.equal(1 << 20);
      expect(optionsSent(sent)).to.deep.equal([NBD_OPT.STARTTLS, NBD_OPT.STRUCTURED_REPLY, NBD_OPT.SET_META_CONTEXT, NBD_OPT.GO]);
    }
  });

  it('never falls back to plaintext: a server that refuses STARTTLS is refused', () => {
    for (const type of [NBD_REP.ERR_UNSUP, NBD_REP.ERR_POLICY, NBD_REP.ERR_INVALID]) {
      const hs = new Handshake(params);
      expect(() => hs.feed(cat(greeting, optReply(NBD_OPT.STARTTLS, type)))).to.throw(NbdRefusedError, /does not offer TLS.*not connecting without it/);
      expect(optionsSent(hs.takeOutput())).to.deep.equal([NBD_OPT.STARTTLS]);
    }
  });

  it('rejects plaintext bytes after the STARTTLS acknowledgement', () => {
    const hs = new Handshake(params);
    expect(() => hs.feed(cat(greeting, optReply(NBD_OPT.STARTTLS, NBD_REP.ACK), Uint8Array.of(0x16)))).to.throw(NbdProtocolError, /plaintext/);
  });

  it('without TLS, a server that requires it is refused at the first option with one line', () => {
    const hs = new Handshake({ ...params, startTls: false });
    expect(() => hs.feed(cat(greeting, optReply(NBD_OPT.STRUCTURED_REPLY, NBD_REP.ERR_TLS_REQD)))).to.throw(NbdRefusedError, /requires TLS.*nbds:\/\/ or tls-creds/);
  });
});

// ---- names: nbds:// and --object -----------------------------------------------------

describe('NBD TLS: nbds:// names, --object tls-creds-*, tls-creds= in --image-opts and json:', () => {
  const table: [string, ReturnType<typeof parseNbdSpec>][] = [
    ['nbds://h.example/disk', { address: { kind: 'tcp', host: 'h.example', port: 10809 }, exportName: 'disk', tls: { verifyPeer: true } }],
    [
      'nbds://h:99/d?tls-certificates=/etc/pki/a%26b&tls-hostname=srv.example',
      { address: { kind: 'tcp', host: 'h', port: 99 }, exportName: 'd', tls: { verifyPeer: true, certificates: '/etc/pki/a&b', hostname: 'srv.example' } },
    ],
    ['nbds://h/?tls-certificates=/c&tls-verify-peer=false', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: '', tls: { verifyPeer: false, certificates: '/c' } }],
    ['nbds://alice@h/x?tls-psk-file=/k/keys.psk', { address: { kind: 'tcp', host: 'h', port: 10809 }, exportName: 'x', tls: { verifyPeer: true, pskFile: '/k/keys.psk', username: 'alice' } }],
    [
      'nbds+unix://bob@/e?socket=/run/s.sock&tls-psk-file=/k.psk',
      { address: { kind: 'unix', path: '/run/s.sock' }, exportName: 'e', tls: { verifyPeer: true, pskFile: '/k.psk', username: 'bob' } },
    ],
  ];
  for (const [spec, want] of table) {
    it(`parses ${spec} and writes it back`, () => {
      expect(parseNbdSpec(spec)).to.deep.equal(want);
      expect(parseNbdSpec(formatNbdUri(want))).to.deep.equal(want);
    });
  }
  const bad: [string, RegExp][] = [
    ['nbd://h/x?tls-certificates=/c', /needs TLS: use nbds:\/\//],
    ['nbd+unix:///x?socket=/s&tls-psk-file=/k', /needs TLS: use nbds\+unix:\/\//],
    ['nbd://alice@h/x', /user name is for TLS-PSK/],
    ['nbds://h/x?tls-certificates=/c&tls-psk-file=/k', /not both/],
    ['nbds://alice@h/x?tls-certificates=/c', /needs tls-psk-file/],
    ['nbds://h/x?tls-verify-peer=maybe', /true or false/],
    ['nbds://h/x?tls-priority=NORMAL', /unknown NBD URI parameter/],
  ];
  for (const [spec, msg] of bad) it(`refuses ${spec}`, () => expect(() => parseNbdSpec(spec)).to.throw(TsmountError, msg));

  it('parses QEMU --object tls-creds-x509 and tls-creds-psk, and refuses what it cannot honour', () => {
    const objs = parseObjects(['tls-creds-x509,id=tls0,dir=/pki/a,,b,endpoint=client,verify-peer=off', 'qom-type=tls-creds-psk,id=p1,dir=/psk']);
    expect(objs.get('tls0')).to.deep.equal({ type: 'tls-creds-x509', id: 'tls0', dir: '/pki/a,b', verifyPeer: false, username: 'qemu' });
    expect(objs.get('p1')).to.deep.equal({ type: 'tls-creds-psk', id: 'p1', dir: '/psk', verifyPeer: true, username: 'qemu' });
    const refusals: [string[], RegExp][] = [
      [['tls-creds-x509,id=a,dir=/d,endpoint=server'], /endpoint must be client/],
      [['tls-creds-x509,id=a'], /dir=DIR is required/],
      [['tls-creds-x509,dir=/d'], /id=ID is required/],
      [['iothread,id=s'], /not supported here/],
      [['secret,id=s'], /data=TEXT or file=FILE/],
      [['secret,id=s,data=x,keyid=k,iv=i'], /encrypted secrets/],
      [['tls-creds-x509,id=a,dir=/d,priority=NORMAL'], /'priority' is not supported/],
      [['tls-creds-x509,id=a,dir=/d', 'tls-creds-psk,id=a,dir=/e'], /given twice/],
    ];
    for (const [defs, msg] of refusals) expect(() => parseObjects(defs), defs.join(' ')).to.throw(TsmountError, msg);
  });

  it('turns tls-creds=ID in --image-opts and json: into the same nbds:// name', () => {
    const objs = parseObjects(['tls-creds-x509,id=tls0,dir=/pki', 'tls-creds-psk,id=psk0,dir=/keys,username=alice']);
    const want = { spec: 'nbds://srv:10809/vm?tls-certificates=/pki&tls-hostname=srv.example', format: 'qcow2' };
    expect(imageOptsToSpec('driver=qcow2,file.driver=nbd,file.server.host=srv,file.export=vm,file.tls-creds=tls0,file.tls-hostname=srv.example', objs)).to.deep.equal(want);
    const json = { driver: 'qcow2', file: { driver: 'nbd', server: { type: 'inet', host: 'srv', port: 10809 }, export: 'vm', 'tls-creds': 'tls0', 'tls-hostname': 'srv.example' } };
    expect(jsonToSpec(`json:${JSON.stringify(json)}`, objs)).to.deep.equal(want);
    expect(imageOptsToSpec('driver=nbd,server.type=unix,server.path=/s,tls-creds=psk0', objs)).to.deep.equal({ spec: 'nbds+unix://alice@/?socket=/s&tls-psk-file=/keys/keys.psk', format: 'raw' });
    expect(() => imageOptsToSpec('driver=nbd,server.host=h,tls-creds=nope', objs)).to.throw(TsmountError, /no --object with id 'nope'/);
    expect(() => imageOptsToSpec('driver=nbd,server.host=h,tls-hostname=x', objs)).to.throw(TsmountError, /tls-hostname needs tls-creds/);
    expect(() => jsonToSpec('json:{"driver":', objs)).to.throw(TsmountError, /json:/);
  });
});

// ---- real servers --------------------------------------------------------------------

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; result?: T; error?: unknown }> {
  const t = Date.now();
  try {
    return { ms: Date.now() - t, result: await fn() };
  } catch (error) {
    return { ms: Date.now() - t, error };
  }
}

describe('NBD TLS: qemu-nbd and nbdkit on loopback', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  let pki: TestPki;
  let qcow2: string;
  const PSK_HEX = 'a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90';
  let pskDir: string;
  const servers: RunningServer[] = [];
  const mounts = new MountTracker();

  const serve = async (cmd: string, args: string[], port: number): Promise<RunningServer> => {
    const s = await startServer(cmd, args, { port });
    servers.push(s);
    return s;
  };
  /** qemu-nbd with x509 (verify-peer on: it wants our client certificate) or PSK credentials. */
  const qemuNbd = async (file: string, opts: { psk?: boolean; rw?: boolean; format?: string; verifyPeer?: boolean } = {}): Promise<number> => {
    const port = await freePort();
    const creds = opts.psk
      ? `tls-creds-psk,id=tls0,dir=${pskDir},endpoint=server`
      : `tls-creds-x509,id=tls0,dir=${pki.server},endpoint=server,verify-peer=${opts.verifyPeer === false ? 'off' : 'on'}`;
    const args = ['--object', creds, '--tls-creds', 'tls0', '-t', '-e', '8', '-x', 'vm', '-f', opts.format ?? 'qcow2', '-b', '127.0.0.1', '-p', String(port)];
    if (!opts.rw) args.push('-r');
    await serve('qemu-nbd', [...args, file], port);
    return port;
  };
  const nbdkit = async (tls: string[], plugin: string[]): Promise<number> => {
    const port = await freePort();
    await serve('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), ...tls, ...plugin], port);
    return port;
  };

  before(async () => {
    tmp = tempDir('nbd-tls');
    pki = await makePki(tmp.dir);
    pskDir = makePsk(tmp.dir, 'alice', PSK_HEX);
    qcow2 = path.join(tmp.dir, 'disk.qcow2');
    await createImage(qcow2, 'qcow2', '64M');
    await qemuIo(qcow2, 'qcow2', ['write -P 0x11 0 1M', 'write -P 0x22 5M 3M', 'write -z 20M 1M', 'write -P 0x33 63M 512k']);
  });
  afterEach(() => mounts.cleanup());
  after(async () => {
    await Promise.allSettled(servers.map((s) => s.stop()));
    tmp.cleanup();
  });

  it('reads a qcow2 from qemu-nbd --tls-creds (x509, client certificate), byte-identical to qemu-img, by address and by name', async () => {
    const port = await qemuNbd(qcow2);
    const want = await rawMd5(qcow2);
    for (const host of ['127.0.0.1', 'localhost']) {
      const spec = `nbds://${host}:${port}/vm?tls-certificates=${pki.client}`;
      const node = await openImage(spec, ro);
      try {
        expect(node.size, spec).to.equal(64 * MiB);
        expect(await nodeMd5(node, 4 * MiB), spec).to.equal(want);
        const ext = await node.blockStatus(0, 64 * MiB);
        expect(ext.find((e) => e.offset <= 30 * MiB && e.offset + e.length > 30 * MiB)?.kind, spec).to.equal('zero');
      } finally {
        await node.close();
      }
    }
  });

  it('mounts --rw through --object tls-creds-x509 and --image-opts: a qcow2 served raw by qemu-nbd reads identically, writes land, qemu-img check passes', async () => {
    const img = path.join(tmp.dir, 'rw.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', '-o', 'preallocation=metadata', qcow2, img]);
    const want = await rawMd5(img);
    const port = await qemuNbd(img, { rw: true, format: 'raw' });
    const mp = path.join(tmp.dir, 'mnt');
    fs.mkdirSync(mp, { recursive: true });
    await mounts.mount([
      '--rw',
      '--object',
      `tls-creds-x509,id=tls0,dir=${pki.client},endpoint=client`,
      '--image-opts',
      `driver=qcow2,file.driver=nbd,file.server.host=127.0.0.1,file.server.port=${port},file.export=vm,file.tls-creds=tls0`,
      mp,
    ]);
    const flat = path.join(mp, 'vm.raw');
    expect(await md5File(flat)).to.equal(want);
    const fd = fs.openSync(flat, 'r+');
    try {
      fs.writeSync(fd, pattern(3 * MiB, 7), 0, 3 * MiB, 40 * MiB + 512);
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(mp);
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const out = path.join(tmp.dir, 'rw.raw');
    await runOk('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', img, out]);
    const got = fs.readFileSync(out);
    expect(got.subarray(40 * MiB + 512, 43 * MiB + 512).equals(pattern(3 * MiB, 7))).to.equal(true);
    expect(got.subarray(5 * MiB, 8 * MiB).every((b) => b === 0x22)).to.equal(true);
  });

  it('writes and reads nbdkit --tls=require memory over TLS with several connections (no client certificate)', async () => {
    const port = await nbdkit(['--tls=require', `--tls-certificates=${pki.server}`], ['memory', '64M']);
    const logs: string[] = [];
    const node = await NbdNode.open(`nbds://localhost:${port}/?tls-certificates=${pki.clientNoCert}`, { readOnly: false, cache: 'writeback', log: (m) => logs.push(m) });
    try {
      expect((node as NbdNode).connections).to.be.greaterThan(1);
      const ref = Buffer.alloc(64 * MiB);
      const writes: [number, number][] = [[0, 4096], [MiB + 17, 100_000], [7 * MiB, 9 * MiB + 3]];
      await Promise.all(writes.map(([off, n], i) => {
        const data = pattern(n, i + 1);
        data.copy(ref, off);
        return node.write(off, data);
      }));
      await node.flush();
      const got = Buffer.alloc(64 * MiB);
      await node.read(0, got);
      expect(got.equals(ref)).to.equal(true);
    } finally {
      await node.close();
    }
    expect(logs).to.deep.equal([]);
  });

  it('with verify-peer off, connects to a server whose certificate its CA did not sign (encrypted, not authenticated)', async () => {
    const port = await nbdkit(['--tls=require', `--tls-certificates=${pki.server}`], ['memory', '1M']);
    const objs = parseObjects([`tls-creds-x509,id=t,dir=${pki.wrongCa},verify-peer=off`]);
    const { spec } = imageOptsToSpec(`driver=nbd,server.host=127.0.0.1,server.port=${port},tls-creds=t,tls-hostname=wrong.example`, objs);
    expect(spec).to.match(/tls-verify-peer=false/);
    const node = await openImage(spec, ro);
    try {
      expect(node.size).to.equal(MiB);
    } finally {
      await node.close();
    }
  });

  it('reads over TLS-PSK from qemu-nbd (tls-creds-psk) and nbdkit --tls-psk', async () => {
    const want = await rawMd5(qcow2);
    const qPort = await qemuNbd(qcow2, { psk: true });
    const objs = parseObjects([`tls-creds-psk,id=psk0,dir=${pskDir},username=alice`]);
    const { spec } = imageOptsToSpec(`driver=nbd,server.host=127.0.0.1,server.port=${qPort},export=vm,tls-creds=psk0`, objs);
    const node = await openImage(spec, ro);
    try {
      expect(await nodeMd5(node, 4 * MiB)).to.equal(want);
    } finally {
      await node.close();
    }
    const kPort = await nbdkit(['--tls=require', `--tls-psk=${path.join(pskDir, 'keys.psk')}`], ['file', qcow2, '--readonly']);
    const node2 = await openImage(`nbds://alice@127.0.0.1:${kPort}/?tls-psk-file=${path.join(pskDir, 'keys.psk')}`, ro);
    try {
      expect(await nodeMd5(node2, 4 * MiB)).to.equal(want);
    } finally {
      await node2.close();
    }
  });

  it('opens a backing file as another export of the same TLS server, over a unix socket, with the same credentials', async () => {
    const chain = path.join(tmp.dir, 'chain');
    fs.mkdirSync(chain);
    await createImage(path.join(chain, 'base.qcow2'), 'qcow2', '16M');
    await qemuIo(path.join(chain, 'base.qcow2'), 'qcow2', ['write -P 0x44 0 4M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', '16M'], { cwd: chain });
    await qemuIo(path.join(chain, 'top.qcow2'), 'qcow2', ['write -P 0x55 1M 1M']);
    const sock = path.join(tmp.dir, 'tls-dir.sock');
    servers.push(await startServer('nbdkit', ['-f', '-r', '--exit-with-parent', '-U', sock, '--tls=require', `--tls-certificates=${pki.server}`, 'file', `dir=${chain}`], { path: sock }));
    const node = await openImage(`nbds+unix:///top.qcow2?socket=${sock}&tls-certificates=${pki.clientNoCert}`, ro);
    try {
      expect(await nodeMd5(node, 4 * MiB)).to.equal(await rawMd5(path.join(chain, 'top.qcow2')));
      expect(node.backing?.name).to.equal(`nbds+unix:///base.qcow2?socket=${sock}&tls-certificates=${pki.clientNoCert}`);
    } finally {
      await node.close();
    }
  });

  it('reconnects over TLS after the server restarts, doing STARTTLS again', async () => {
    const file = path.join(tmp.dir, 'reconnect.raw');
    fs.writeFileSync(file, Buffer.alloc(8 * MiB));
    const port = await freePort();
    const args = ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '--tls=require', `--tls-certificates=${pki.server}`, 'file', file];
    let server = await serve('nbdkit', args, port);
    const logs: string[] = [];
    const node = await NbdNode.open(`nbds://127.0.0.1:${port}/?tls-certificates=${pki.clientNoCert}`, { readOnly: false, cache: 'writeback', log: (m) => logs.push(m) });
    try {
      await node.write(MiB, pattern(MiB, 5));
      await node.flush();
      await server.stop();
      server = await serve('nbdkit', args, port);
      const b = Buffer.alloc(MiB);
      // The first request finds the old connection dead (EIO, logged); after the back-off one reconnects.
      await node.read(MiB, b).catch(() => undefined);
      await new Promise((r) => setTimeout(r, 1100));
      await node.read(MiB, b);
      expect(b.equals(pattern(MiB, 5))).to.equal(true);
      expect(logs.join('\n')).to.match(/reconnected/);
    } finally {
      await node.close();
    }
  });

  it('refuses bad TLS set-ups with one line naming the server and the problem, within seconds', async () => {
    const qPort = await qemuNbd(qcow2);
    const kPort = await nbdkit(['--tls=require', `--tls-certificates=${pki.server}`], ['memory', '1M']);
    const plainPort = await nbdkit([], ['memory', '1M']);
    const qPskPort = await qemuNbd(qcow2, { psk: true });
    const wrongPsk = makePsk(path.join(tmp.dir, 'wrong'), 'alice', 'ff'.repeat(32));
    const cases: [string, RegExp][] = [
      [`nbds://127.0.0.1:${qPort}/vm?tls-certificates=${pki.wrongCa}`, /TLS with NBD server 127\.0\.0\.1:\d+ failed: the server's certificate is not signed by the CA in .*wrong-ca\/ca-cert\.pem/],
      [`nbd://127.0.0.1:${kPort}/`, /requires TLS/],
      [`nbds://127.0.0.1:${kPort}/?tls-certificates=${pki.clientNoCert}&tls-hostname=wrong.example`, /certificate is not for 'wrong\.example'/],
      [`nbds://127.0.0.1:${plainPort}/?tls-certificates=${pki.clientNoCert}`, /does not offer TLS.*not connecting without it/],
      [`nbds://127.0.0.1:${qPort}/vm?tls-certificates=${pki.clientNoCert}`, /client certificate/],
      [`nbds://alice@127.0.0.1:${qPskPort}/vm?tls-psk-file=${wrongPsk}/keys.psk`, /PSK/],
      [`nbds://bob@127.0.0.1:${qPskPort}/vm?tls-psk-file=${pskDir}/keys.psk`, /has no key for user 'bob'/],
      [`nbds://127.0.0.1:${kPort}/?tls-certificates=${tmp.dir}`, /ca-cert\.pem: no such file/],
    ];
    for (const [spec, msg] of cases) {
      const r = await timed(() => openImage(spec, ro));
      expect(r.error, spec).to.be.instanceOf(TsmountError);
      const m = (r.error as Error).message;
      if (process.env.SHOW_MSG) console.log(m, r.ms);
      expect(m, spec).to.match(msg);
      expect(m.includes('\n'), spec).to.equal(false);
      expect(r.ms, spec).to.be.lessThan(5000);
    }
  });

  it('tsmount says a TLS refusal in one line and mounts nothing', async () => {
    const kPort = await nbdkit(['--tls=require', `--tls-certificates=${pki.server}`], ['memory', '1M']);
    const mp = path.join(tmp.dir, 'mnt-refused');
    fs.mkdirSync(mp, { recursive: true });
    mounts.track(mp);
    const r = await tsmount(['--object', `tls-creds-x509,id=t,dir=${pki.wrongCa}`, `json:{"driver":"nbd","server":{"host":"127.0.0.1","port":"${kPort}"},"tls-creds":"t"}`, mp]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    expect(r.stderr).to.match(/^tsmount: nbds:\/\/127\.0\.0\.1:\d+\/\?tls-certificates=.*: TLS with NBD server .* not signed by/);
    expect(fs.readFileSync('/proc/mounts', 'utf8').includes(mp)).to.equal(false);
  });
});
