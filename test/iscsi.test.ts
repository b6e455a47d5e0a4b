// iSCSI against a real target (tgtd from Debian's tgt) on loopback, started and stopped
// here, judged by qemu-img and the files behind the LUNs. Needs tgt and qemu-utils.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { openImage } from '../drivers/open.js';
import { IscsiNode } from '../drivers/protocol/iscsi/node.js';
import { configureIscsi } from '../drivers/protocol/iscsi/uri.js';
import { imageOptsToSpec } from '../drivers/protocol/remote.js';
import { parseObjects } from '../drivers/objects.js';
import { TsmountError } from '../drivers/errors.js';
import { createImage, md5File, qemuIo, rawMd5, run, runOk, tempDir, checkImage } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { nodeMd5, pattern, testOptions, tsimg } from './helpers/images.js';
import { freePort, startServer, type RunningServer } from './helpers/servers.js';
import { constants as osc } from 'node:os';

const MiB = 1 << 20;
const E = osc.errno;
const IQN = 'iqn.2026-12.org.tsmount.test';

/** One tgtd on 127.0.0.1:port with its own control port; the configuration replays after a restart. */
class Tgtd {
  private server: RunningServer | undefined;
  private readonly config: string[][] = [];
  private constructor(
    readonly port: number,
    private readonly ctl: number,
  ) {}

  static async start(): Promise<Tgtd> {
    const port = await freePort();
    // tgtd takes control ports up to 32767.
    const t = new Tgtd(port, 1000 + (port % 30000));
    await t.up();
    return t;
  }

  private async up(): Promise<void> {
    fs.mkdirSync('/var/run/tgtd', { recursive: true });
    this.server = await startServer('tgtd', ['-f', '--iscsi', `portal=127.0.0.1:${this.port}`, '-C', String(this.ctl)], { port: this.port });
    // The control socket comes up with the portal, but give tgtadm a few tries.
    for (const args of this.config) await this.tgtadm(args);
  }

  async tgtadm(args: string[]): Promise<void> {
    for (let i = 0; ; i++) {
      const r = await run('tgtadm', ['-C', String(this.ctl), '--lld', 'iscsi', ...args]);
      if (r.code === 0) return;
      if (i >= 20) throw new Error(`tgtadm ${args.join(' ')}: ${r.stderr.trim()}`);
      await new Promise((r2) => setTimeout(r2, 100));
    }
  }

  async configure(args: string[]): Promise<void> {
    this.config.push(args);
    await this.tgtadm(args);
  }

  /** A target; bound last, so a restarted tgtd lets nobody in before it is whole. */
  async target(tid: number, name: string, luns: { file: string; cd?: boolean }[], o: { bind?: string[]; params?: [string, string][]; account?: string; outgoing?: string } = {}): Promise<string> {
    await this.configure(['--op', 'new', '--mode', 'target', '--tid', String(tid), '-T', `${IQN}:${name}`]);
    for (const [i, l] of luns.entries()) await this.configure(['--op', 'new', '--mode', 'logicalunit', '--tid', String(tid), '--lun', String(i + 1), '-b', l.file, ...(l.cd ? ['--device-type=cd'] : [])]);
    for (const [k, v] of o.params ?? []) await this.configure(['--mode', 'target', '--op', 'update', '--tid', String(tid), '--name', k, '--value', v]);
    if (o.account) await this.configure(['--mode', 'account', '--op', 'bind', '--tid', String(tid), '--user', o.account]);
    if (o.outgoing) await this.configure(['--mode', 'account', '--op', 'bind', '--tid', String(tid), '--user', o.outgoing, '--outgoing']);
    await this.configure(['--op', 'bind', '--mode', 'target', '--tid', String(tid), ...(o.bind ?? ['-I', 'ALL'])]);
    return `${IQN}:${name}`;
  }

  /** SIGKILL, as a crash: the connections drop at once. */
  async crash(): Promise<void> {
    this.server!.child.kill('SIGKILL');
    await this.server!.stop();
  }

  async restart(): Promise<void> {
    await this.up();
  }

  async stop(): Promise<void> {
    if (!this.server) return;
    // tgtd ignores SIGTERM while it has targets: delete them (`--mode system --force` is an
    // invalid request for tgtadm 1.0.85), then the system, which ends tgtd.
    const tids = new Set(this.config.filter((a) => a[1] === 'new' && a[3] === 'target').map((a) => a[5]!));
    for (const tid of tids) await run('tgtadm', ['-C', String(this.ctl), '--op', 'delete', '--mode', 'target', '--tid', tid, '--force']);
    await run('tgtadm', ['-C', String(this.ctl), '--op', 'delete', '--mode', 'system']);
    await this.server.stop();
    this.server = undefined;
  }
}

const md5 = (b: Uint8Array): string => crypto.createHash('md5').update(b).digest('hex');

describe('iSCSI: LUNs on tgtd', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  let tgtd: Tgtd;
  const mounts = new MountTracker();
  let disk: string;
  let qcow2: string;
  let cdFile: string;
  let thin: string;
  let url: (target: string, lun?: number, user?: string) => string;
  const T: Record<string, string> = {};

  before(async () => {
    tmp = tempDir('iscsi');
    disk = path.join(tmp.dir, 'disk.raw');
    await createImage(disk, 'raw', '16M');
    await qemuIo(disk, 'raw', ['write -P 0x11 0 1M', 'write -P 0x22 5M 3M', 'write -P 0x33 15M 1M']);
    qcow2 = path.join(tmp.dir, 'disk.qcow2');
    // A LUN does not grow: the qcow2 has room for its clusters already (as on a block device).
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', qcow2, '32M']);
    await qemuIo(qcow2, 'qcow2', ['write -P 0x44 0 2M', 'write -P 0x55 17M 1M', 'write -z 30M 1M']);
    // Any file serves as a CD; an ISO is whole 2048-byte blocks.
    cdFile = path.join(tmp.dir, 'cd.iso');
    fs.writeFileSync(cdFile, pattern(3 * MiB + 6 * 2048, 7));
    fs.copyFileSync(disk, path.join(tmp.dir, 'chap.raw'));
    fs.copyFileSync(disk, path.join(tmp.dir, 'digest.raw'));
    tgtd = await Tgtd.start();
    T.disk = await tgtd.target(1, 'disk', [{ file: disk }, { file: qcow2 }]);
    await tgtd.configure(['--mode', 'account', '--op', 'new', '--user', 'alice', '--password', 'wonderland12']);
    T.chap = await tgtd.target(2, 'chap', [{ file: path.join(tmp.dir, 'chap.raw') }], { account: 'alice' });
    T.digest = await tgtd.target(3, 'digest', [{ file: path.join(tmp.dir, 'digest.raw') }], { params: [['HeaderDigest', 'CRC32C']] });
    T.cd = await tgtd.target(4, 'cd', [{ file: cdFile, cd: true }]);
    // Only this initiator name may log in.
    // Thin provisioning: the LUN advertises unmap (LBP VPD page) and punches holes in the file.
    thin = path.join(tmp.dir, 'thin.raw');
    fs.writeFileSync(thin, pattern(8 * MiB, 9));
    await tgtd.configure(['--op', 'new', '--mode', 'target', '--tid', '6', '-T', `${IQN}:thin`]);
    await tgtd.configure(['--op', 'new', '--mode', 'logicalunit', '--tid', '6', '--lun', '1', '-b', thin]);
    await tgtd.configure(['--op', 'update', '--mode', 'logicalunit', '--tid', '6', '--lun', '1', '--params', 'thin_provisioning=1']);
    await tgtd.configure(['--op', 'bind', '--mode', 'target', '--tid', '6', '-I', 'ALL']);
    T.thin = `${IQN}:thin`;
    T.named = await tgtd.target(5, 'named', [{ file: disk }], { bind: ['--initiator-name', 'iqn.2026-12.org.tsmount.test:me'] });
    // Mutual CHAP: alice logs in, and the target answers as hatter (an outgoing account).
    await tgtd.configure(['--mode', 'account', '--op', 'new', '--user', 'hatter', '--password', 'teaparty1234']);
    T.mutual = await tgtd.target(7, 'mutual', [{ file: path.join(tmp.dir, 'chap.raw') }], { account: 'alice', outgoing: 'hatter' });
    url = (target, lun = 1, user) => `iscsi://${user ? `${user}@` : ''}127.0.0.1:${tgtd.port}/${target}/${lun}`;
  });

  afterEach(async () => {
    configureIscsi({});
    delete process.env.LIBISCSI_CHAP_USERNAME;
    delete process.env.LIBISCSI_CHAP_PASSWORD;
    await mounts.cleanup();
  });

  after(async () => {
    await tgtd?.stop();
    tmp?.cleanup();
  });

  it('reads a raw LUN byte-identically to the file behind it', async () => {
    const node = await openImage(url(T.disk!), testOptions({ format: 'raw' }));
    try {
      expect(node.size).to.equal(16 * MiB);
      expect(await nodeMd5(node, 3 * MiB + 4096)).to.equal(await md5File(disk));
    } finally {
      await node.close();
    }
  });

  it('probes a qcow2 served as a LUN and reads it as qemu-img does', async () => {
    const node = await openImage(url(T.disk!, 2), testOptions());
    try {
      expect(node.size).to.equal(32 * MiB);
      expect(await nodeMd5(node)).to.equal(await rawMd5(qcow2, 'qcow2'));
    } finally {
      await node.close();
    }
  });

  it('logs in with CHAP from the URL and from LIBISCSI_CHAP_*; mounts with tsmount', async () => {
    const want = await md5File(path.join(tmp.dir, 'chap.raw'));
    const a = await openImage(url(T.chap!, 1, 'alice%wonderland12'), testOptions({ format: 'raw' }));
    try {
      expect(await nodeMd5(a, MiB)).to.equal(want);
    } finally {
      await a.close();
    }
    process.env.LIBISCSI_CHAP_USERNAME = 'alice';
    process.env.LIBISCSI_CHAP_PASSWORD = 'wonderland12';
    const mp = path.join(tmp.dir, 'mnt-chap');
    fs.mkdirSync(mp, { recursive: true });
    await mounts.mount([url(T.chap!), mp]);
    const files = fs.readdirSync(mp);
    expect(files).to.deep.equal(['chap-lun1.raw']);
    expect(await md5File(path.join(mp, files[0]!))).to.equal(want);
    await mounts.unmount(mp);
  });

  it('mutual CHAP: the target proves itself with LIBISCSI_CHAP_TARGET_*; a wrong target secret or a target that cannot is refused in one line', async () => {
    const want = await md5File(path.join(tmp.dir, 'chap.raw'));
    const mutual = { LIBISCSI_CHAP_TARGET_USERNAME: 'hatter', LIBISCSI_CHAP_TARGET_PASSWORD: 'teaparty1234' };
    const node = await IscsiNode.open(url(T.mutual!, 1, 'alice%wonderland12'), { readOnly: true, cache: 'writeback', env: mutual });
    try {
      expect(await nodeMd5(node, MiB)).to.equal(want);
    } finally {
      await node.close();
    }
    const refused = async (target: string, env: NodeJS.ProcessEnv): Promise<string> => {
      const err = await IscsiNode.open(url(target, 1, 'alice%wonderland12'), { readOnly: true, cache: 'writeback', env }).then(() => undefined, (e: unknown) => e);
      expect(err).to.be.instanceOf(TsmountError);
      const msg = (err as Error).message;
      expect(msg.split('\n')).to.have.length(1);
      return msg;
    };
    expect(await refused(T.mutual!, { ...mutual, LIBISCSI_CHAP_TARGET_PASSWORD: 'wrongwrong12' })).to.match(/failed mutual CHAP/);
    expect(await refused(T.mutual!, { ...mutual, LIBISCSI_CHAP_TARGET_USERNAME: 'march-hare' })).to.match(/failed mutual CHAP/);
    // A target with no outgoing account has nothing to prove itself with.
    expect(await refused(T.chap!, mutual)).to.match(/mutual CHAP|did not authenticate|authentication failed/);
    // Without mutual CHAP asked for, the target's outgoing account changes nothing.
    const plain = await IscsiNode.open(url(T.mutual!, 1, 'alice%wonderland12'), { readOnly: true, cache: 'writeback', env: {} });
    await plain.close();
  });

  it('logs in with password-secret= naming a secret object (QEMU --image-opts), data= or file=', async () => {
    const want = await md5File(path.join(tmp.dir, 'chap.raw'));
    const file = path.join(tmp.dir, 'chap-secret');
    fs.writeFileSync(file, 'wonderland12', { mode: 0o600 });
    for (const def of ['secret,id=sec0,data=wonderland12', `secret,id=sec0,file=${file}`]) {
      configureIscsi({});
      const { spec, format } = imageOptsToSpec(`driver=raw,file.driver=iscsi,file.portal=127.0.0.1:${tgtd.port},file.target=${T.chap},file.lun=1,file.user=alice,file.password-secret=sec0`, parseObjects([def]));
      const node = await openImage(spec, testOptions({ format }));
      try {
        expect(await nodeMd5(node, MiB)).to.equal(want);
      } finally {
        await node.close();
      }
    }
  });

  it('takes credentials (password= or password-secret=) and the initiator name from --iscsi and --readconfig', async () => {
    const conf = path.join(tmp.dir, 'qemu.conf');
    fs.writeFileSync(conf, `[iscsi]\n  initiator-name = "iqn.2026-12.org.tsmount.test:me"\n\n[iscsi "${T.chap}"]\n  user = "alice"\n  password = "wonderland12"\n`);
    let r = await tsimg(['info', '--readconfig', conf, url(T.chap!)]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.contain('16 MiB');
    r = await tsimg(['info', '--readconfig', conf, url(T.named!)]);
    expect(r.code, r.stderr).to.equal(0);
    r = await tsimg(['info', '--iscsi', 'user=alice,password=wonderland12', url(T.chap!)]);
    expect(r.code, r.stderr).to.equal(0);
    // password-secret=ID naming an --object secret, in --iscsi and in a [iscsi "IQN"] section.
    r = await tsimg(['info', '--object', 'secret,id=chap0,data=wonderland12', '--iscsi', 'user=alice,password-secret=chap0', url(T.chap!)]);
    expect(r.code, r.stderr).to.equal(0);
    const secretConf = path.join(tmp.dir, 'qemu-secret.conf');
    fs.writeFileSync(secretConf, `[iscsi "${T.chap}"]\n  user = "alice"\n  password-secret = "chap0"\n`);
    r = await tsimg(['info', '--object', 'secret,id=chap0,data=wonderland12', '--readconfig', secretConf, url(T.chap!)]);
    expect(r.code, r.stderr).to.equal(0);
    r = await tsimg(['info', '--readconfig', secretConf, url(T.chap!)]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.match(/no --object with id 'chap0'/);
    // The default name (QEMU's iqn.2008-11.org.linux-kvm) is not the one this target allows.
    r = await tsimg(['info', url(T.named!)]);
    expect(r.code).to.equal(1);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    expect(r.stderr).to.match(/refused/);
    r = await tsimg(['info', '--iscsi', 'initiator-name=iqn.2026-12.org.tsmount.test:me', url(T.named!)]);
    expect(r.code, r.stderr).to.equal(0);
    r = await tsimg(['info', '--iscsi', 'header-digest=SHA1', url(T.disk!)]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.match(/header-digest must be one of/);
  });

  it('refuses a wrong password, a missing one, a wrong target, LUN or host with one line', async () => {
    const cases: [string, RegExp][] = [
      [url(T.chap!, 1, 'alice%nope'), /authentication failed/],
      [url(T.chap!), /requires CHAP/],
      [url(`${IQN}:nosuch`), /target not found/],
      [url(T.disk!, 9), /LUN 9 does not exist/],
      [`iscsi://127.0.0.1:${await freePort()}/${T.disk}/1`, /connection refused/],
      [`iscsi://no-such-host.invalid/${T.disk}/1`, /unknown host/],
      [`iscsi://127.0.0.1/${T.disk}`, /not an iSCSI URL/],
    ];
    for (const [u, why] of cases) {
      const r = await tsimg(['info', u]);
      expect(r.code, u).to.equal(1);
      const lines = r.stderr.trim().split('\n');
      expect(lines, u).to.have.length(1);
      expect(lines[0], u).to.match(why);
      expect(lines[0]).to.not.contain('nope');
    }
  });

  it('negotiates a header digest (CRC32C) where the target requires one', async () => {
    const node = await IscsiNode.open(url(T.digest!), { readOnly: true, cache: 'writeback' });
    try {
      expect(node.session?.headerDigest).to.equal(true);
      expect(await nodeMd5(node, 2 * MiB)).to.equal(await md5File(path.join(tmp.dir, 'digest.raw')));
    } finally {
      await node.close();
    }
    const plain = await IscsiNode.open(url(T.disk!), { readOnly: true, cache: 'writeback' });
    expect(plain.session?.headerDigest).to.equal(false);
    await plain.close();
  });

  it('writes land in the LUN file, raw and qcow2 (qemu-img compare, check)', async () => {
    const ref = path.join(tmp.dir, 'ref.raw');
    fs.copyFileSync(disk, ref);
    const node = await openImage(url(T.disk!), testOptions({ format: 'raw', readOnly: false }));
    try {
      await node.write(512, pattern(MiB, 1));
      await node.write(3 * MiB + 77, pattern(70_000, 2)); // unaligned: AlignFilter does read-modify-write
      await node.zero!(5 * MiB, MiB, true);
      await node.zero!(7 * MiB + 512, 4096, false);
      await node.flush();
    } finally {
      await node.close();
    }
    const fd = fs.openSync(ref, 'r+');
    fs.writeSync(fd, pattern(MiB, 1), 0, MiB, 512);
    fs.writeSync(fd, pattern(70_000, 2), 0, 70_000, 3 * MiB + 77);
    fs.writeSync(fd, Buffer.alloc(MiB), 0, MiB, 5 * MiB);
    fs.writeSync(fd, Buffer.alloc(4096), 0, 4096, 7 * MiB + 512);
    fs.closeSync(fd);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ref, disk]);

    const q = await openImage(url(T.disk!, 2), testOptions({ readOnly: false }));
    try {
      await q.write(9 * MiB + 4096, pattern(2 * MiB, 3));
    } finally {
      await q.close();
    }
    const check = await checkImage(qcow2, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const qref = path.join(tmp.dir, 'qref.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', qref, '32M']);
    await qemuIo(qref, 'qcow2', ['write -P 0x44 0 2M', 'write -P 0x55 17M 1M', 'write -z 30M 1M']);
    fs.writeFileSync(path.join(tmp.dir, 'p3'), pattern(2 * MiB, 3));
    const raw = path.join(tmp.dir, 'qref.raw');
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qref, raw]);
    const rfd = fs.openSync(raw, 'r+');
    fs.writeSync(rfd, pattern(2 * MiB, 3), 0, 2 * MiB, 9 * MiB + 4096);
    fs.closeSync(rfd);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow2]);
  });

  it('zeroes with unmap where the LUN advertises it: the space is freed in the file behind it', async () => {
    const node = await openImage(url(T.thin!), testOptions({ format: 'raw', readOnly: false }));
    const before = fs.statSync(thin).blocks;
    try {
      await node.zero!(MiB, 4 * MiB, true);
      await node.flush();
    } finally {
      await node.close();
    }
    expect(fs.statSync(thin).blocks).to.be.below(before - (3 * MiB) / 512);
    const want = pattern(8 * MiB, 9);
    want.fill(0, MiB, 5 * MiB);
    expect(md5(fs.readFileSync(thin))).to.equal(md5(want));
  });

  it('logs in again after the target restarts mid-read and retries the commands it lost', async () => {
    const logs: string[] = [];
    const node = await IscsiNode.open(url(T.digest!), { readOnly: true, cache: 'writeback', log: (m) => logs.push(m) });
    try {
      const buf = new Uint8Array(node.size);
      let started = 0;
      const reading = (async () => {
        for (let o = 0; o < node.size; o += MiB) {
          started++;
          await node.read(o, buf.subarray(o, o + MiB));
        }
      })();
      while (started < 2) await new Promise((r) => setTimeout(r, 5));
      await tgtd.crash();
      await new Promise((r) => setTimeout(r, 300));
      await tgtd.restart();
      await reading;
      expect(md5(buf)).to.equal(await md5File(path.join(tmp.dir, 'digest.raw')));
      expect(logs.join('\n')).to.match(/logged in again/);
      expect(node.session?.headerDigest).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('reads a CD-ROM LUN (2048-byte blocks) byte-identically and refuses writes with EROFS', async () => {
    const node = await IscsiNode.open(url(T.cd!), { readOnly: false, cache: 'writeback' });
    try {
      expect(node.isCdrom).to.equal(true);
      expect(node.readOnly).to.equal(true);
      expect(node.requestAlignment).to.equal(2048);
      expect(node.size).to.equal(fs.statSync(cdFile).size);
      expect(await nodeMd5(node, 1 << 20)).to.equal(await md5File(cdFile));
      let err: unknown;
      try {
        await node.write(0, new Uint8Array(2048));
      } catch (e) {
        err = e;
      }
      expect(err).to.be.instanceOf(TsmountError);
      expect((err as TsmountError).errno).to.equal(E.EROFS);
    } finally {
      await node.close();
    }
    // Through the graph, unaligned reads go through AlignFilter.
    const g = await openImage(url(T.cd!), testOptions({ format: 'raw' }));
    try {
      const b = new Uint8Array(5000);
      await g.read(1001, b);
      expect(Buffer.from(b).equals(fs.readFileSync(cdFile).subarray(1001, 6001))).to.equal(true);
    } finally {
      await g.close();
    }
  });
});
