// The mount's own life (issue 12): what names it, where the server's errors go, what
// --foreground and DEBUG say, the passphrase file as QEMU reads it, the mountpoints it
// refuses, tsmount -u on a busy or missing mountpoint, an interrupted start, and a
// mountpoint reached through a symlink.
import { expect } from 'chai';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, md5File, qemuIo, rawMd5, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { isAlive, mountedPid, MountTracker, TSMOUNT, tsmount, tsmountProcesses, waitFor } from './helpers/mount.js';
import { firstL2Offset, patch, u64be } from './helpers/images.js';
import { findMount, mountSource, runtimeDir, shownImage } from '../fs/mounts.js';
import { nameOnce } from '../fs/log.js';

const MiB = 1 << 20;

/** tsmount with extra environment variables. */
function tsmountEnv(args: string[], env: NodeJS.ProcessEnv): ReturnType<typeof run> {
  return run(process.execPath, [TSMOUNT, ...args], { env: { ...process.env, ...env }, timeoutMs: 60_000 });
}


function mountSourceOf(mp: string): string {
  return String(execFileSync('findmnt', ['-n', '-o', 'SOURCE', '--mountpoint', mp])).trim();
}

/** A qcow2 whose first L2 entry points 1 GiB past its end: reads of cluster 0 fail. */
async function corruptQcow2(file: string): Promise<void> {
  await createImage(file, 'qcow2', 16 * MiB);
  await qemuIo(file, 'qcow2', ['write -P 0x11 0 64k']);
  patch(file, firstL2Offset(file), u64be(0x8000000000000000n | 0x40000000n));
}

/** A child's stderr, collected. */
function collect(child: ChildProcess): { text: () => string } {
  let text = '';
  child.stderr?.on('data', (d: Buffer) => (text += d.toString()));
  return { text: () => text };
}

function exitOf(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((r) => child.once('exit', (c) => r(c)));
}

describe('the mount\'s own life', function () {
  this.timeout(180_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let dir: string;
  let good: string;
  const at = (name: string): string => path.join(dir, name);
  const newMp = (name: string): string => {
    const mp = at(name);
    fs.mkdirSync(mp, { recursive: true });
    mounts.track(mp);
    return mp;
  };

  before(async () => {
    tmp = tempDir('life');
    dir = tmp.dir;
    good = at('good.qcow2');
    await createImage(good, 'qcow2', 16 * MiB);
    await qemuIo(good, 'qcow2', ['write -P 0x5a 0 1M']);
  });
  afterEach(async () => {
    await mounts.cleanup();
    for (const pid of tsmountProcesses(dir)) process.kill(pid, 'SIGKILL');
  });
  after(() => tmp.cleanup());

  describe('the mount source names the image', () => {
    for (const backend of ['', 'fusermount', 'libfuse']) {
      it(`tsmount#/abs/path in /proc/mounts and findmnt${backend ? ` (TSMOUNT_FUSE=${backend})` : ''}; -u finds the server through the registry`, async () => {
        // A comma and a space: libfuse and fusermount3 take `\,` in fsname.
        const img = at(`odd, name ${backend || 'dev'}.qcow2`);
        fs.copyFileSync(good, img);
        const mp = newMp(`src-${backend || 'dev'}`);
        const r = await tsmountEnv([path.relative(process.cwd(), img), mp], { TSMOUNT_FUSE: backend });
        expect(r.code, r.stderr).to.equal(0);
        expect(mountSourceOf(mp)).to.equal(`tsmount#${img}`);
        const m = findMount(mp);
        expect(m?.source).to.equal(`tsmount#${img}`);
        expect(m?.pid).to.be.greaterThan(0);
        expect(isAlive(m!.pid)).to.equal(true);
        expect(m?.state?.images).to.deep.equal([img]);
        expect(m?.state?.rw).to.equal(false);
        const stateFile = path.join(runtimeDir(false)!, `${m!.dev.replace(':', '_')}.json`);
        expect(fs.existsSync(stateFile)).to.equal(true);
        expect(fs.statSync(runtimeDir(false)!).mode & 0o777).to.equal(0o700);
        await mounts.unmount(mp);
        expect(isAlive(m!.pid), 'tsmount -u waits for the server').to.equal(false);
        expect(fs.existsSync(stateFile), 'the state file is removed at exit').to.equal(false);
      });
    }

    it('a stale state file never names a live mount; without one, -u still unmounts', async () => {
      const mp = newMp('stale');
      await mounts.mount([good, mp]);
      const m = findMount(mp)!;
      const stateFile = path.join(runtimeDir(false)!, `${m.dev.replace(':', '_')}.json`);
      const saved = fs.readFileSync(stateFile, 'utf8');
      // Another mountpoint, or a dead pid: not this mount's server. The server rewrites
      // its file (the counters, once a second, off its JS thread): a pid counts only if
      // the file still held the forged state after findMount asked.
      const pidWith = (forged: string): number | undefined => {
        for (let i = 0; i < 50; i++) {
          fs.writeFileSync(stateFile, forged);
          const pid = findMount(mp)?.pid;
          if (fs.readFileSync(stateFile, 'utf8') === forged) return pid;
        }
        throw new Error('the server kept replacing its state file');
      };
      expect(pidWith(JSON.stringify({ ...JSON.parse(saved), mountpoint: '/elsewhere' }))).to.equal(0);
      expect(pidWith(JSON.stringify({ ...JSON.parse(saved), pid: 2 ** 22 + 1 }))).to.equal(0);
      fs.rmSync(stateFile);
      const r = await tsmount(['-u', mp]);
      expect(r.code, r.stderr).to.equal(0);
      expect(findMount(mp)).to.equal(undefined);
      await waitFor(() => !isAlive(m.pid), 10_000, 'the server to exit');
    });

    it('remote specs are shown without their password', () => {
      expect(shownImage('ssh://alice:s3cret@host/disk.qcow2')).to.equal('ssh://alice@host/disk.qcow2');
      expect(shownImage('nbd://host:10809/exp?password=x&tls=on')).to.equal('nbd://host:10809/exp?password=&tls=on');
      expect(mountSource(['file:rel.qcow2', 'b.qcow2'])).to.equal(`tsmount#${path.resolve('rel.qcow2')}`);
    });
  });

  describe("where the server's errors go", () => {
    it('--log FILE: a corrupt read is EIO and its reason is in the log, naming the image once', async () => {
      const img = at('corrupt-log.qcow2');
      await corruptQcow2(img);
      const mp = newMp('log');
      const logFile = at('server.log');
      await mounts.mount(['--log', logFile, img, mp]);
      const r = await run('dd', [`if=${path.join(mp, 'corrupt-log.raw')}`, 'of=/dev/null', 'bs=4k', 'count=1']);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.match(/Input\/output error/);
      await mounts.unmount(mp);
      const log = fs.readFileSync(logFile, 'utf8');
      const line = log.split('\n').find((l) => /points past the end of the file/.test(l));
      expect(line, log).to.be.a('string');
      expect(line!.split(img).length - 1, line).to.equal(1);
      expect(log).to.match(/corrupt-log\.raw ready: 16 MiB, qcow2, read-only/);
    });

    it('without --log: the reason goes to syslog (TSMOUNT_SYSLOG_SOCKET), RFC 3164, facility daemon, tag tsmount[PID]', async () => {
      const img = at('corrupt-syslog.qcow2');
      await corruptQcow2(img);
      const mp = newMp('syslog');
      const sock = at('log.sock');
      const out = at('syslog.out');
      const receiver = spawn('socat', ['-u', `UNIX-RECV:${sock}`, `OPEN:${out},creat,append`], { stdio: 'ignore' });
      mounts.trackChild(receiver);
      try {
        await waitFor(() => fs.existsSync(sock), 10_000, 'socat to bind the socket');
        const r = await tsmountEnv([img, mp], { TSMOUNT_SYSLOG_SOCKET: sock });
        expect(r.code, r.stderr).to.equal(0);
        const pid = mountedPid(mp)!;
        const dd = await run('dd', [`if=${path.join(mp, 'corrupt-syslog.raw')}`, 'of=/dev/null', 'bs=4k', 'count=1']);
        expect(dd.stderr).to.match(/Input\/output error/);
        await mounts.unmount(mp);
        await waitFor(() => fs.existsSync(out) && /unmounted/.test(fs.readFileSync(out, 'utf8')), 10_000, 'the last message');
        const got = fs.readFileSync(out, 'utf8');
        // <27> is daemon.err, <30> daemon.info; "Mmm dd hh:mm:ss tsmount[PID]: ".
        expect(got).to.match(new RegExp(`<27>[A-Z][a-z]{2} [ \\d]\\d \\d\\d:\\d\\d:\\d\\d tsmount\\[${pid}\\]: ${img.replace(/[.]/g, '\\.')}: read at 0\\+\\d+: qcow2 L2 entry for guest offset 0x0 points past the end of the file`));
        expect(got).to.match(new RegExp(`<30>[^<]*tsmount\\[${pid}\\]: ${mp}/corrupt-syslog\\.raw ready: 16 MiB, qcow2, read-only`));
      } finally {
        receiver.kill();
      }
    });

    it('without a syslog socket the server runs on, silently', async () => {
      const mp = newMp('nosyslog');
      const r = await tsmountEnv([good, mp], { TSMOUNT_SYSLOG_SOCKET: at('no-such.sock') });
      expect(r.code, r.stderr).to.equal(0);
      expect(await md5File(path.join(mp, 'good.raw'))).to.equal(await rawMd5(good, 'qcow2'));
      await mounts.unmount(mp);
    });

    it('names the image once when the reason names it again', () => {
      expect(nameOnce('/a/b.qcow2: read at 0+4096: /a/b.qcow2: bad L2')).to.equal('/a/b.qcow2: read at 0+4096: bad L2');
      expect(nameOnce('/a/b.qcow2: read at 0+4096: bad L2')).to.equal('/a/b.qcow2: read at 0+4096: bad L2');
    });
  });

  describe('--foreground', () => {
    it('says where the disk is, that it unmounted on SIGINT, and exits 0', async () => {
      const mp = newMp('fg');
      const child = spawn(process.execPath, [TSMOUNT, '--foreground', good, mp], { stdio: ['ignore', 'ignore', 'pipe'] });
      mounts.trackChild(child);
      const err = collect(child);
      await waitFor(() => /ready/.test(err.text()) || child.exitCode !== null, 30_000, 'the ready line');
      expect(err.text()).to.equal(`tsmount: ${mp}/good.raw ready: 16 MiB, qcow2, read-only\n`);
      child.kill('SIGINT');
      expect(await exitOf(child)).to.equal(0);
      expect(err.text()).to.match(new RegExp(`tsmount: ${mp} unmounted\\n$`));
      expect(mountedPid(mp)).to.equal(undefined);
    });

    it('exits non-zero when the unmount was not clean (busy: detached)', async () => {
      const mp = newMp('fg-busy');
      const child = spawn(process.execPath, [TSMOUNT, '--foreground', '--rw', good, mp], { stdio: ['ignore', 'ignore', 'pipe'] });
      mounts.trackChild(child);
      const err = collect(child);
      await waitFor(() => /ready/.test(err.text()) || child.exitCode !== null, 30_000, 'the ready line');
      expect(err.text()).to.match(/good\.raw ready: 16 MiB, qcow2, read-write/);
      const fd = fs.openSync(path.join(mp, 'good.raw'), 'r');
      try {
        child.kill('SIGTERM');
        expect(await exitOf(child)).to.equal(1);
        expect(err.text()).to.match(/busy; detached/);
      } finally {
        try {
          fs.closeSync(fd);
        } catch {
          /* ENOTCONN: the detached mount's server is gone, as it should be */
        }
      }
    });
  });

  it('DEBUG=tsmount:* shows each request and what each layer did', async () => {
    const img = at('debug.qcow2');
    await corruptQcow2(img);
    const mp = newMp('debug');
    const child = spawn(process.execPath, [TSMOUNT, '--foreground', img, mp], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, DEBUG: 'tsmount:*' } });
    mounts.trackChild(child);
    const err = collect(child);
    await waitFor(() => /ready/.test(err.text()) || child.exitCode !== null, 30_000, 'the ready line');
    const flat = path.join(mp, 'debug.raw');
    // A good read far from cluster 0, then the bad one.
    await run('dd', [`if=${flat}`, 'of=/dev/null', 'bs=4k', 'skip=100', 'count=1']);
    await run('dd', [`if=${flat}`, 'of=/dev/null', 'bs=4k', 'count=1']);
    child.kill('SIGTERM');
    await exitOf(child);
    const text = err.text();
    expect(text).to.match(/tsmount:open \S*debug\.qcow2: qcow2, 16777216 bytes, read-only/);
    expect(text).to.match(/tsmount:fuse request \d+: open node \d+/);
    expect(text).to.match(/tsmount:fuse request \d+: read node \d+ at 409600\+4096/);
    expect(text).to.match(/tsmount:qcow2 \S*debug\.qcow2: read 409600\+4096 maps to unallocated 409600\+4096/);
    expect(text).to.match(/tsmount:fuse request \d+: flush node \d+/);
    expect(text).to.match(/tsmount:fuse request \d+ failed: .*points past the end of the file/);
  });

  it("--secret-file reads the file as QEMU's secret object does: `echo pass > f` keeps the newline", async () => {
    const pf = at('pass');
    await runOk('sh', ['-c', `echo pass > '${pf}'`]);
    const img = at('secret.luks');
    const r = await runTimingPbkdf('qemu-img', ['create', '-q', '--object', `secret,id=s0,file=${pf}`, '-f', 'luks', '-o', 'key-secret=s0,iter-time=10', img, '4M']);
    expect(r.code, r.stderr).to.equal(0);
    await run('qemu-io', ['--object', `secret,id=s0,file=${pf}`, '--image-opts', `driver=luks,key-secret=s0,file.filename=${img}`, '-c', 'write -P 0x3c 0 1M']);
    const mp = newMp('secret');
    await mounts.mount(['--secret-file', pf, img, mp]);
    const got = await md5File(path.join(mp, 'secret.raw'));
    await mounts.unmount(mp);
    const ref = at('secret.ref');
    await runOk('qemu-img', ['convert', '--object', `secret,id=s0,file=${pf}`, '--image-opts', `driver=luks,key-secret=s0,file.filename=${img}`, '-O', 'raw', ref]);
    expect(got).to.equal(await md5File(ref));
    // Without the newline it is another key.
    const trimmed = at('pass-trimmed');
    fs.writeFileSync(trimmed, 'pass');
    const wrong = await tsmount(['--secret-file', trimmed, img, newMp('secret2')]);
    expect(wrong.code).to.equal(1);
    // tsimg reads it the same way (one function).
    const info = await run(process.execPath, [path.resolve(path.dirname(TSMOUNT), 'tsimg.js'), 'info', '--secret-file', pf, img]);
    expect(info.code, info.stderr).to.equal(0);
  });

  it("the detached server's command line shows the image and the mountpoint, never --secret's passphrase, started early or (with --log) late", async () => {
    const img = at('shown.luks');
    const pass = 'Sw0rdf1sh-shown';
    const r = await runTimingPbkdf('qemu-img', ['create', '-q', '--object', `secret,id=s0,data=${pass}`, '-f', 'luks', '-o', 'key-secret=s0,iter-time=10', img, '4M']);
    expect(r.code, r.stderr).to.equal(0);
    for (const extra of [[], ['--log', at('shown.log')], [`--secret=${pass}`]]) {
      const mp = newMp(`shown${extra.length}`);
      const secretArgs = extra[0]?.startsWith('--secret=') ? extra : ['--secret', pass, ...extra];
      await mounts.mount([...secretArgs, img, mp]);
      const pid = findMount(mp)!.pid;
      const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      expect(argv, `${extra.join(' ')}`).to.include(img).and.to.include(mp);
      expect(argv.join(' '), `${extra.join(' ')}`).to.not.include(pass);
      expect(tsmountProcesses(mp), 'one server, no spare').to.deep.equal([pid]);
      await mounts.unmount(mp);
    }
  });

  it('a command that starts no server leaves no server process: errors found before and after a server was started, --help, -u', async () => {
    const mp = newMp('none');
    // Refused by the command itself (the early server is killed unused), by the server
    // (a mountpoint that is a file), and commands that never serve.
    const file = at('none.txt');
    fs.writeFileSync(file, 'x');
    for (const args of [['--cache-size', '1K', good, mp], [good, at('missing-dir')], ['--locking', 'sometimes', good, mp], [good, good, file], ['--help', good, mp], ['-u', mp]]) {
      const res = await tsmount(args);
      if (!args.includes('--help')) expect(res.code, args.join(' ')).to.not.equal(0);
      await waitFor(() => tsmountProcesses(dir).length === 0, 5000, `${args.join(' ')}: no server left`);
      expect(findMount(mp)).to.equal(undefined);
    }
  });

  it('refuses a non-empty mountpoint unless -o nonempty', async () => {
    const mp = newMp('nonempty');
    fs.writeFileSync(path.join(mp, 'precious'), 'x');
    const r = await tsmount([good, mp]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.equal(`tsmount: ${mp}: mountpoint is not empty (its files would be hidden until unmount); add -o nonempty to mount over them\n`);
    expect(mountedPid(mp)).to.equal(undefined);
    await mounts.mount(['-o', 'nonempty', good, mp]);
    expect(fs.readdirSync(mp)).to.deep.equal(['good.raw']);
    await mounts.unmount(mp);
    expect(fs.readdirSync(mp)).to.deep.equal(['precious']);
  });

  describe('tsmount -u', () => {
    it('on a busy mount names the loop device and the process; --lazy detaches and the server exits after the last user', async () => {
      const mp = newMp('busy');
      await mounts.mount([good, mp]);
      const pid = mountedPid(mp)!;
      const flat = path.join(mp, 'good.raw');
      const loop = (await runOk('losetup', ['-r', '-f', '--show', flat])).trim();
      const fd = fs.openSync(flat, 'r');
      const holder = spawn('sleep', ['60'], { stdio: [fd, 'ignore', 'ignore'] });
      mounts.trackChild(holder);
      fs.closeSync(fd);
      let loopGone = false;
      try {
        const r = await tsmount(['-u', mp]);
        expect(r.code).to.equal(1);
        expect(r.stderr).to.contain(`${loop} uses ${flat}`);
        expect(r.stderr).to.contain(`process ${holder.pid} (sleep) has ${flat} open`);
        expect(r.stderr).to.match(/--lazy/);
        expect(mountedPid(mp)).to.equal(pid);

        const lazy = await tsmount(['-u', '--lazy', mp]);
        expect(lazy.code, lazy.stderr).to.equal(0);
        expect(lazy.stderr).to.match(/detached; the server \(pid \d+\) exits once the last file on it is closed/);
        expect(mountedPid(mp)).to.equal(undefined);
        // The users go on reading through the detached mount.
        expect(isAlive(pid)).to.equal(true);
        expect(await md5File(loop)).to.equal(await rawMd5(good, 'qcow2'));
        await runOk('losetup', ['-d', loop]);
        loopGone = true;
        holder.kill('SIGKILL');
        await waitFor(() => !isAlive(pid), 20_000, 'the server to exit after the last user');
      } finally {
        if (!loopGone) await run('losetup', ['-d', loop]);
        holder.kill('SIGKILL');
      }
    });

    it('unmounts a dead mount (its server killed), and the next server sweeps the stale state file', async () => {
      const mp = newMp('dead');
      await mounts.mount([good, mp]);
      const m = findMount(mp)!;
      const stateFile = path.join(runtimeDir(false)!, `${m.dev.replace(':', '_')}.json`);
      process.kill(m.pid, 'SIGKILL');
      await waitFor(() => !isAlive(m.pid), 10_000, 'the server to die');
      expect(() => fs.readdirSync(mp)).to.throw(/ENOTCONN|ECONNABORTED/);
      expect(findMount(mp)?.pid).to.equal(0);
      const r = await tsmount(['-u', mp]);
      expect(r.code, r.stderr).to.equal(0);
      expect(findMount(mp)).to.equal(undefined);
      expect(fs.existsSync(stateFile)).to.equal(true);
      await mounts.mount([good, mp]);
      expect(fs.existsSync(stateFile) && JSON.parse(fs.readFileSync(stateFile, 'utf8')).pid === m.pid).to.equal(false);
      await mounts.unmount(mp);
    });

    it('says so when PATH does not exist, and when it is not a tsmount mount', async () => {
      const missing = at('no-such-dir');
      const r = await tsmount(['-u', missing]);
      expect(r.code).to.equal(1);
      expect(r.stderr).to.equal(`tsmount: ${missing}: no such file or directory\n`);
      const plain = newMp('plain');
      const r2 = await tsmount(['-u', plain]);
      expect(r2.code).to.equal(1);
      expect(r2.stderr).to.equal(`tsmount: ${plain}: not a tsmount mount\n`);
    });
  });

  it('an interrupted start leaves no mount and no server behind', async function () {
    this.timeout(600_000);
    const mp = newMp('interrupted');
    // How long a start takes on this machine now, so the later delays hit the mount itself.
    const t0 = Date.now();
    await mounts.mount([good, mp]);
    const full = Date.now() - t0;
    await mounts.unmount(mp);
    const delays = [50, 100, 150, 220, 300, 400, 500, ...[0.6, 0.75, 0.85, 0.92, 0.97].map((f) => Math.round(full * f))];
    for (const delay of delays) {
      const starter = spawn(process.execPath, [TSMOUNT, good, mp], { stdio: ['ignore', 'ignore', 'pipe'] });
      mounts.trackChild(starter);
      const err = collect(starter);
      await new Promise((r) => setTimeout(r, delay));
      starter.kill('SIGINT');
      const code = await exitOf(starter);
      // It either finished first (0, and the mount is there) or was interrupted.
      if (code === 0) {
        await mounts.unmount(mp);
        continue;
      }
      expect([130, null], `${delay} ms: ${err.text()}`).to.include(code);
      await waitFor(() => tsmountProcesses(mp).length === 0, 15_000, `no server left (${delay} ms)`);
      expect(findMount(mp), `${delay} ms`).to.equal(undefined);
      expect(fs.readdirSync(mp), `${delay} ms`).to.deep.equal([]);
    }
    // Interrupted just as the mount appears: the server has mounted, not yet said OK.
    for (let round = 0; round < 3; round++) {
      const starter = spawn(process.execPath, [TSMOUNT, '--log', at('interrupted.log'), good, mp], { stdio: 'ignore' });
      mounts.trackChild(starter);
      await waitFor(() => findMount(mp) !== undefined || starter.exitCode !== null, 30_000, 'the mount to appear');
      starter.kill('SIGINT');
      const code = await exitOf(starter);
      if (code === 0) {
        await mounts.unmount(mp);
        continue;
      }
      await waitFor(() => tsmountProcesses(mp).length === 0, 15_000, 'no server left');
      expect(findMount(mp)).to.equal(undefined);
      expect(fs.readdirSync(mp)).to.deep.equal([]);
    }
  });

  it('a server whose starter is killed outright (SIGKILL) before it is ready stops and unmounts', async function () {
    this.timeout(300_000);
    const mp = newMp('killed');
    const t0 = Date.now();
    await mounts.mount([good, mp]);
    const full = Date.now() - t0;
    await mounts.unmount(mp);
    // The mount is the user's once the starter has acknowledged the server's OK; the
    // server logs "ready" then. A kill that lands between that ACK and the starter's
    // exit (a few ms) leaves a working mount, as a killed mount(8) would.
    const logFile = at('killed.log');
    for (const f of [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0]) {
      fs.writeFileSync(logFile, '');
      const starter = spawn(process.execPath, [TSMOUNT, '--log', logFile, good, mp], { stdio: 'ignore' });
      mounts.trackChild(starter);
      await new Promise((r) => setTimeout(r, Math.round(full * f)));
      starter.kill('SIGKILL');
      const code = await exitOf(starter);
      const acknowledged = (): boolean => fs.readFileSync(logFile, 'utf8').includes(' ready: ');
      await waitFor(() => tsmountProcesses(mp).length === 0 || acknowledged(), 15_000, `no server left (${f})`);
      if (code === 0 || acknowledged()) {
        expect(fs.readdirSync(mp), `${f}`).to.deep.equal(['good.raw']);
        await mounts.unmount(mp);
        continue;
      }
      await waitFor(() => tsmountProcesses(mp).length === 0, 15_000, `no server left (${f})`);
      expect(findMount(mp), `${f}: ${fs.readFileSync(logFile, 'utf8')}`).to.equal(undefined);
    }
  });

  it('a slow open (LUKS key derivation) stops at once when the starter is interrupted or killed', async function () {
    this.timeout(300_000);
    const pf = at('slow-pass');
    fs.writeFileSync(pf, 'pass');
    const img = at('slow.luks');
    // qemu-img spends iter-time on its PBKDF benchmark; the open costs at least as long.
    const r = await runTimingPbkdf('qemu-img', ['create', '-q', '--object', `secret,id=s0,file=${pf}`, '-f', 'luks', '-o', 'key-secret=s0,iter-time=3000', img, '4M']);
    expect(r.code, r.stderr).to.equal(0);
    const mp = newMp('slow');
    for (const sig of ['SIGINT', 'SIGKILL'] as const) {
      const starter = spawn(process.execPath, [TSMOUNT, '--secret-file', pf, img, mp], { stdio: 'ignore' });
      mounts.trackChild(starter);
      await waitFor(() => tsmountProcesses(mp).length === 2, 20_000, 'the server to start');
      await new Promise((res) => setTimeout(res, 800));
      starter.kill(sig);
      const t0 = Date.now();
      await exitOf(starter);
      await waitFor(() => tsmountProcesses(mp).length === 0, 5_000, `the server to stop after ${sig}`);
      expect(Date.now() - t0, sig).to.be.lessThan(5_000);
      expect(findMount(mp)).to.equal(undefined);
    }
  });

  it('a mountpoint reached through a symlink: mounted at its real path, stays, and -u works through the link', async () => {
    const real = newMp('real-dir');
    const link = at('link');
    fs.symlinkSync(real, link);
    const r = await tsmount([good, link]);
    expect(r.code, r.stderr).to.equal(0);
    await new Promise((res) => setTimeout(res, 1500));
    const pid = mountedPid(real);
    expect(pid, 'still mounted a second later').to.be.greaterThan(0);
    expect(isAlive(pid!)).to.equal(true);
    expect(fs.readdirSync(link)).to.deep.equal(['good.raw']);
    expect(findMount(link)).to.equal(undefined); // the registry speaks real paths only
    const u = await tsmount(['-u', link]);
    expect(u.code, u.stderr).to.equal(0);
    expect(mountedPid(real)).to.equal(undefined);
    expect(isAlive(pid!)).to.equal(false);
  });
});
