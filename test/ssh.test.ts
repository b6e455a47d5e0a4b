// SSH/SFTP against OpenSSH's sshd started here on loopback: a throwaway host key, a
// user key in a private ssh-agent, internal-sftp, and a private HOME for known_hosts.
// Needs openssh-server and openssh-client.
import { expect } from 'chai';
import crypto from 'node:crypto';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { BlockNode } from '../drivers/types.js';
import { openImage, type ImageOptions } from '../drivers/open.js';
import { TsmountError } from '../drivers/errors.js';
import { imageOptsToSpec } from '../drivers/protocol/remote.js';
import { parseSshSpec, resolveSshRelative } from '../drivers/protocol/ssh/uri.js';
import { parseHostKeyCheck } from '../drivers/protocol/ssh/hostkey.js';
import { checkImage, createImage, md5File, qemuIo, rawMd5, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { nodeMd5, pattern, testOptions } from './helpers/images.js';
import { freePort, startServer, type RunningServer } from './helpers/servers.js';

const MiB = 1 << 20;
const ro: ImageOptions = testOptions({ metadataCacheBytes: 4 * MiB });
const rw: ImageOptions = { ...ro, readOnly: false };

describe('SSH: images on an SFTP server', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  let sshd: RunningServer | undefined;
  let agent: RunningServer | undefined;
  let emptyAgent: RunningServer | undefined;
  let port: number;
  let hostKeyBlob: Buffer;
  let knownHosts: string;
  const saved = { HOME: process.env.HOME, SSH_AUTH_SOCK: process.env.SSH_AUTH_SOCK };
  const mounts = new MountTracker();
  let raw: string;
  let top: string;
  const user = os.userInfo().username;

  const url = (p: string, hkc?: string): string => `ssh://${user}@127.0.0.1:${port}${p}${hkc ? `?host_key_check=${hkc}` : ''}`;
  const writeKnownHosts = (lines: string[]): void => fs.writeFileSync(knownHosts, lines.map((l) => `${l}\n`).join(''));
  const hostKeyLine = (hosts: string): string => `${hosts} ssh-ed25519 ${hostKeyBlob.toString('base64')}`;

  before(async function () {
    if (!fs.existsSync('/usr/sbin/sshd')) this.skip();
    tmp = tempDir('ssh');
    const d = tmp.dir;
    fs.mkdirSync('/run/sshd', { recursive: true });
    await runOk('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(d, 'host_key')]);
    await runOk('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(d, 'user_key')]);
    fs.copyFileSync(path.join(d, 'user_key.pub'), path.join(d, 'authorized_keys'));
    hostKeyBlob = Buffer.from(fs.readFileSync(path.join(d, 'host_key.pub'), 'utf8').split(' ')[1]!, 'base64');
    port = await freePort();
    const config = path.join(d, 'sshd_config');
    fs.writeFileSync(
      config,
      [
        `Port ${port}`,
        'ListenAddress 127.0.0.1',
        `HostKey ${path.join(d, 'host_key')}`,
        `PidFile ${path.join(d, 'sshd.pid')}`,
        `AuthorizedKeysFile ${path.join(d, 'authorized_keys')}`,
        'UsePAM no',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'PubkeyAuthentication yes',
        'PermitRootLogin prohibit-password',
        'StrictModes no',
        'Subsystem sftp internal-sftp',
        '',
      ].join('\n'),
    );
    sshd = await startServer('/usr/sbin/sshd', ['-D', '-e', '-f', config], { port });
    const sock = path.join(d, 'agent.sock');
    agent = await startServer('ssh-agent', ['-D', '-a', sock], { path: sock });
    await runOk('env', [`SSH_AUTH_SOCK=${sock}`, 'ssh-add', '-q', path.join(d, 'user_key')]);
    const empty = path.join(d, 'empty-agent.sock');
    emptyAgent = await startServer('ssh-agent', ['-D', '-a', empty], { path: empty });
    // A private HOME: known_hosts is ours to write.
    const home = path.join(d, 'home');
    fs.mkdirSync(path.join(home, '.ssh'), { recursive: true });
    knownHosts = path.join(home, '.ssh', 'known_hosts');
    process.env.HOME = home;
    process.env.SSH_AUTH_SOCK = sock;
    writeKnownHosts([hostKeyLine(`[127.0.0.1]:${port}`)]);

    raw = path.join(d, 'disk.img');
    fs.writeFileSync(raw, Buffer.concat([pattern(3 * MiB, 1), Buffer.alloc(2 * MiB), pattern(3 * MiB + 4096, 2)]));
    const chain = path.join(d, 'chain');
    fs.mkdirSync(chain);
    await createImage(path.join(chain, 'base.qcow2'), 'qcow2', '24M');
    await qemuIo(path.join(chain, 'base.qcow2'), 'qcow2', ['write -P 0x61 0 5M', 'write -P 0x62 20M 1M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2', '24M'], { cwd: chain });
    await qemuIo(path.join(chain, 'mid.qcow2'), 'qcow2', ['write -P 0x63 1M 2M']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '24M'], { cwd: chain });
    await qemuIo(path.join(chain, 'top.qcow2'), 'qcow2', ['write -P 0x64 2M 64k', 'write -z 20M 64k']);
    top = path.join(chain, 'top.qcow2');
  });
  afterEach(async () => {
    await mounts.cleanup();
    if (knownHosts) writeKnownHosts([hostKeyLine(`[127.0.0.1]:${port}`)]);
  });
  after(async () => {
    process.env.HOME = saved.HOME;
    if (saved.SSH_AUTH_SOCK === undefined) delete process.env.SSH_AUTH_SOCK;
    else process.env.SSH_AUTH_SOCK = saved.SSH_AUTH_SOCK;
    await Promise.allSettled([sshd, agent, emptyAgent].map((s) => s?.stop()));
    tmp?.cleanup();
  });

  it('reads a raw image byte-identically to the file on the server', async () => {
    const node = await openImage(url(raw), { ...ro, format: 'raw' });
    try {
      expect(node.size).to.equal(Math.ceil(fs.statSync(raw).size / 512) * 512);
      expect(await nodeMd5(node, 4 * MiB)).to.equal(await rawMd5(raw, 'raw'));
    } finally {
      await node.close();
    }
  });

  it('reads a qcow2 whose backing chain lives on the server, keeping host_key_check=no for the whole chain', async () => {
    // No known_hosts entry: only host_key_check=no lets any file of the chain open.
    writeKnownHosts([]);
    const node = await openImage(url(top, 'no'), ro);
    try {
      expect(await nodeMd5(node, 4 * MiB)).to.equal(await rawMd5(top));
      const mid = (node as unknown as { backing?: BlockNode }).backing;
      expect(mid?.name).to.match(/mid\.qcow2\?host_key_check=no$/);
    } finally {
      await node.close();
    }
  });

  it('writes a qcow2 on the server: qemu-img check passes and qemu-img reads what was written', async () => {
    const img = path.join(tmp.dir, 'rw.qcow2');
    await createImage(img, 'qcow2', '16M');
    const node = await openImage(url(img), rw);
    try {
      await node.write(3 * MiB + 512, pattern(2 * MiB, 7));
      await node.flush();
    } finally {
      await node.close();
    }
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const out = path.join(tmp.dir, 'rw.raw');
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, out]);
    expect(fs.readFileSync(out).subarray(3 * MiB + 512, 5 * MiB + 512).equals(pattern(2 * MiB, 7))).to.equal(true);
  });

  describe('host_key_check', () => {
    const md5 = (): string => crypto.createHash('md5').update(hostKeyBlob).digest('hex');
    const sha1 = (): string => crypto.createHash('sha1').update(hostKeyBlob).digest('hex');
    const sha256 = (): Buffer => crypto.createHash('sha256').update(hostKeyBlob).digest();
    const colons = (hex: string): string => hex.match(/../g)!.join(':');
    const hashed = (name: string): string => {
      const salt = crypto.randomBytes(20);
      return `|1|${salt.toString('base64')}|${crypto.createHmac('sha1', salt).update(name).digest('base64')}`;
    };

    const accepted: [string, () => string | undefined, () => string[]][] = [
      ['yes with a [host]:port entry', () => undefined, () => [hostKeyLine(`[127.0.0.1]:${port}`)]],
      ['yes with a hashed entry', () => 'yes', () => [hostKeyLine(hashed(`[127.0.0.1]:${port}`))]],
      ['yes with a wildcard entry among others', () => 'yes', () => [hostKeyLine('otherhost'), hostKeyLine(`[127.0.0.*]:${port},!nothere`)]],
      ['no without any entry', () => 'no', () => []],
      ['md5 hex', () => `md5:${md5()}`, () => []],
      ['md5 hex in upper case with colons', () => `md5:${colons(md5()).toUpperCase()}`, () => []],
      ['sha1 hex', () => `sha1:${sha1()}`, () => []],
      ['sha256 hex with colons', () => `sha256:${colons(sha256().toString('hex'))}`, () => []],
      ['sha256 base64 as ssh-keygen -l prints it', () => `sha256:${sha256().toString('base64').replace(/=+$/, '')}`, () => []],
    ];
    for (const [what, hkc, lines] of accepted) {
      it(`accepts the server with ${what}`, async () => {
        writeKnownHosts(lines());
        const v = hkc();
        const node = await openImage(url(raw, v === undefined ? undefined : encodeURIComponent(v).replace(/%3A/g, ':')), { ...ro, format: 'raw' });
        await node.close();
      });
    }

    const refused: [string, () => string | undefined, () => string[], RegExp][] = [
      ['an unknown host', () => undefined, () => [hostKeyLine('somewhere.else')], /no host key for \[127\.0\.0\.1\]:\d+ in known_hosts/],
      ['a known host with another key', () => 'yes', () => [`[127.0.0.1]:${port} ssh-ed25519 ${Buffer.concat([hostKeyBlob.subarray(0, -1), Buffer.from([hostKeyBlob[hostKeyBlob.length - 1]! ^ 1])]).toString('base64')}`], /does not match known_hosts/],
      ['a port-22 entry only', () => 'yes', () => [hostKeyLine('127.0.0.1')], /no host key/],
      ['a revoked key', () => 'yes', () => [`@revoked ${hostKeyLine('*')}`, hostKeyLine(`[127.0.0.1]:${port}`)], /revoked/],
      ['a wrong md5', () => `md5:${'0'.repeat(32)}`, () => [], /does not match host_key_check=md5:/],
      ['a wrong sha1', () => `sha1:${'ab'.repeat(20)}`, () => [], /does not match host_key_check=sha1:/],
      ['a wrong sha256', () => `sha256:${'1'.repeat(64)}`, () => [], /does not match host_key_check=sha256:/],
    ];
    for (const [what, hkc, lines, msg] of refused) {
      it(`refuses ${what} with one line, within seconds`, async () => {
        writeKnownHosts(lines());
        const t = Date.now();
        let err: unknown;
        try {
          const node = await openImage(url(raw, hkc()), { ...ro, format: 'raw' });
          await node.close();
        } catch (e) {
          err = e;
        }
        expect(err).to.be.instanceOf(TsmountError);
        expect((err as Error).message).to.match(msg);
        expect((err as Error).message).to.not.include('\n');
        expect(Date.now() - t).to.be.lessThan(5000);
      });
    }

    it('refuses a malformed host_key_check', () => {
      for (const bad of ['maybe', 'md5:abc', 'sha1:' + '0'.repeat(41), 'sha512:00']) expect(() => parseHostKeyCheck(bad, 'x')).to.throw(/host_key_check/);
    });
  });

  it('refuses wrong ports, users, keys and paths with one line, within seconds', async () => {
    const closed = await freePort();
    const cases: [string, () => Promise<unknown>, RegExp][] = [
      ['a closed port', () => openImage(`ssh://127.0.0.1:${closed}${raw}`, ro), /connection refused/],
      ['an unknown host', () => openImage(`ssh://no-such-host.invalid${raw}`, ro), /unknown host|no answer/],
      ['a missing file', () => openImage(url(`${raw}.absent`), ro), /no such file on the server/],
      ['a user the server does not know', () => openImage(`ssh://nosuchuser@127.0.0.1:${port}${raw}`, ro), /authentication failed/],
      [
        'an agent without the key',
        async () => {
          const sock = process.env.SSH_AUTH_SOCK;
          process.env.SSH_AUTH_SOCK = path.join(tmp.dir, 'empty-agent.sock');
          try {
            return await openImage(url(raw), ro);
          } finally {
            process.env.SSH_AUTH_SOCK = sock;
          }
        },
        /authentication failed/,
      ],
    ];
    for (const [what, fn, msg] of cases) {
      const t = Date.now();
      let err: unknown;
      try {
        await ((await fn()) as BlockNode).close();
      } catch (e) {
        err = e;
      }
      expect(err, what).to.be.instanceOf(TsmountError);
      expect((err as Error).message, what).to.match(msg);
      expect((err as Error).message, what).to.not.include('\n');
      expect(Date.now() - t, what).to.be.lessThan(9000);
    }
  });

  /** Signal sshd's per-connection processes (its children), not the listening sshd. */
  const signalSessions = (sig: NodeJS.Signals): number => {
    const pids = spawnSync('pgrep', ['-P', String(sshd!.child.pid)], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean).map(Number);
    for (const pid of pids) process.kill(pid, sig);
    return pids.length;
  };
  const readAllMd5 = async (node: BlockNode, during: (off: number) => void): Promise<string> => {
    const h = crypto.createHash('md5');
    const buf = Buffer.alloc(MiB);
    for (let off = 0; off < node.size; off += MiB) {
      const n = Math.min(MiB, node.size - off);
      const p = node.read(off, buf.subarray(0, n));
      during(off);
      await p;
      h.update(buf.subarray(0, n));
    }
    return h.digest('hex');
  };

  it('reconnects and re-opens the file when the connection drops mid-read; the reader sees no error', async () => {
    const node = await openImage(url(raw), { ...ro, format: 'raw' });
    try {
      let killed = 0;
      const md5 = await readAllMd5(node, (off) => {
        if (off === 2 * MiB || off === 5 * MiB) killed += signalSessions('SIGKILL');
      });
      expect(killed).to.be.at.least(2);
      expect(md5).to.equal(await rawMd5(raw, 'raw'));
    } finally {
      await node.close();
    }
  });

  it('a server that stays connected but never answers: the request is abandoned after TSMOUNT_REMOTE_TIMEOUT and retried on a new connection', async () => {
    const saved = process.env.TSMOUNT_REMOTE_TIMEOUT;
    process.env.TSMOUNT_REMOTE_TIMEOUT = '2';
    const node = await openImage(url(raw), { ...ro, format: 'raw' });
    let stopped = 0;
    try {
      const md5 = await readAllMd5(node, (off) => {
        if (off === 3 * MiB) stopped = signalSessions('SIGSTOP');
      });
      expect(stopped).to.be.at.least(1);
      expect(md5).to.equal(await rawMd5(raw, 'raw'));
    } finally {
      if (saved === undefined) delete process.env.TSMOUNT_REMOTE_TIMEOUT;
      else process.env.TSMOUNT_REMOTE_TIMEOUT = saved;
      await node.close();
      // The stopped sessions: SIGKILL ends even a stopped process.
      signalSessions('SIGKILL');
    }
  });

  it('parses ssh URIs and --image-opts, and resolves backing files with the same options', () => {
    const t = parseSshSpec('ssh://bob@example.org:2222/srv/disk.qcow2?host_key_check=sha256:ab+c/');
    expect(t).to.deep.equal({ user: 'bob', host: 'example.org', port: 2222, path: '/srv/disk.qcow2', hostKeyCheck: 'sha256:ab+c/' });
    expect(parseSshSpec('ssh://example.org/x.img').user).to.equal(user);
    expect(parseSshSpec('ssh://example.org/x.img').port).to.equal(22);
    expect(resolveSshRelative('ssh://bob@h:2222/srv/a/top.qcow2?host_key_check=no', 'base.qcow2')).to.equal('ssh://bob@h:2222/srv/a/base.qcow2?host_key_check=no');
    expect(resolveSshRelative('ssh://bob@h:2222/srv/a/top.qcow2?host_key_check=no', '/other/base.qcow2')).to.equal('ssh://bob@h:2222/other/base.qcow2?host_key_check=no');
    expect(imageOptsToSpec('driver=qcow2,file.driver=ssh,file.user=bob,file.host=h,file.port=2222,file.path=/a/b.qcow2,file.host_key_check=no')).to.deep.equal({
      spec: 'ssh://bob@h:2222/a/b.qcow2?host_key_check=no',
      format: 'qcow2',
    });
    expect(imageOptsToSpec('driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=/s,file.export=e')).to.deep.equal({ spec: 'nbd+unix:///e?socket=/s', format: 'raw' });
    expect(() => parseSshSpec('ssh://h/x?user=bob')).to.throw(/unknown ssh URI parameter/);
    expect(() => imageOptsToSpec('driver=raw,file.driver=ssh,file.host=h,file.path=/x,file.bogus=1')).to.throw(/unsupported option 'file.bogus'/);
  });

  it('mounts with tsmount --image-opts --rw: reads match qemu-img, writes land on the server, unmount flushes', async () => {
    const img = path.join(tmp.dir, 'mounted.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', top, img]);
    const want = await rawMd5(img);
    const mp = path.join(tmp.dir, 'mnt');
    fs.mkdirSync(mp);
    const sha = crypto.createHash('sha256').update(hostKeyBlob).digest('base64').replace(/=+$/, '');
    await mounts.mount(['--image-opts', '--rw', `driver=qcow2,file.driver=ssh,file.user=${user},file.host=127.0.0.1,file.port=${port},file.path=${img},file.host_key_check=sha256:${sha}`, mp]);
    const flat = path.join(mp, 'mounted.raw');
    expect(await md5File(flat)).to.equal(want);
    const fd = fs.openSync(flat, 'r+');
    try {
      fs.writeSync(fd, pattern(MiB + 1000, 4), 0, MiB + 1000, 9 * MiB + 100);
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(mp);
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const out = path.join(tmp.dir, 'mounted.raw');
    await runOk('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, out]);
    expect(fs.readFileSync(out).subarray(9 * MiB + 100, 10 * MiB + 1100).equals(pattern(MiB + 1000, 4))).to.equal(true);
  });
});
