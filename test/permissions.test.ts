// Who may read a mount (issue 12): the flat file belongs to the mounting user and takes
// the image file's mode; an encrypted image's plaintext is owner-only; other users get through the
// mount only with -o allow_other, and then the kernel checks the mode; --uid, --gid
// and --umask choose otherwise; chmod and chown work on a --rw mount; truncate grows
// the disk only with --growable. Another user is made by the test and removed after.
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, imageInfo, md5File, qemuIo, run, runOk, runTimingPbkdf, tempDir, type RunResult } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';
import { startServer, type RunningServer } from './helpers/servers.js';
import { makeTestUser, type TestUser } from './helpers/users.js';
import { flatFileMode, intersectGroupOther } from '../fs/access.js';

const MiB = 1 << 20;
const PASS = 'correct horse';

describe('permissions: who may read and change the flat file', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let user: TestUser | undefined;
  let uid = -1;
  let gid = -1;

  before(async function () {
    if (process.getuid?.() !== 0) this.skip();
    tmp = tempDir('perm');
    // Another user must reach the mountpoints: mkdtemp makes the folder 0700.
    fs.chmodSync(tmp.dir, 0o755);
    user = await makeTestUser();
    ({ uid, gid } = user);
  });
  afterEach(() => mounts.cleanup());
  after(async () => {
    await mounts.cleanup();
    user?.remove();
    tmp?.cleanup();
  });

  /** Run a command as the test's user, without root's groups. */
  const asUser = (cmd: string, args: string[]): Promise<RunResult> => user!.run(cmd, args);

  /** The first 16 bytes as the test's user sees them, or the error. */
  const userReads = (file: string): Promise<RunResult> => asUser('head', ['-c', '16', file]);

  const mp = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  async function qcow2(name: string, mode: number, size = 16 * MiB): Promise<string> {
    const img = path.join(tmp.dir, name);
    await createImage(img, 'qcow2', size);
    await qemuIo(img, 'qcow2', ['write -P 0x5a 0 64k']);
    fs.chmodSync(img, mode);
    return img;
  }

  async function luks(name: string, mode: number): Promise<string> {
    const img = path.join(tmp.dir, name);
    const r = await runTimingPbkdf('qemu-img', ['create', '-q', '--object', `secret,id=s0,data=${PASS}`, '-f', 'luks', '-o', 'key-secret=s0,iter-time=10', img, '4M']);
    if (r.code !== 0) throw new Error(`qemu-img create luks: ${r.stderr}`);
    const io = await run('qemu-io', ['--object', `secret,id=s0,data=${PASS}`, '--image-opts', '-c', 'write -P 0x5a 0 64k', `driver=luks,key-secret=s0,file.filename=${img}`]);
    if (io.code !== 0) throw new Error(`qemu-io: ${io.stderr}`);
    fs.chmodSync(img, mode);
    return img;
  }

  const statOf = (f: string): { uid: number; gid: number; mode: number } => {
    const st = fs.statSync(f);
    return { uid: st.uid, gid: st.gid, mode: st.mode & 0o7777 };
  };

  it("belongs to the mounting user and group, with the image file's mode (group bits only what it gives that group, no write bits read-only)", async () => {
    const img = await qcow2('own.qcow2', 0o640);
    fs.chownSync(img, uid, gid);
    const dir = mp('own');
    await mounts.mount([img, dir]);
    // The image's group is not the flat file's: its group bits give root's group nothing.
    expect(statOf(path.join(dir, 'own.raw'))).to.deep.equal({ uid: 0, gid: 0, mode: 0o400 });
    expect(statOf(dir)).to.deep.equal({ uid: 0, gid: 0, mode: 0o555 });
    await mounts.unmount(dir);
    await mounts.mount(['--rw', img, dir]);
    expect(statOf(path.join(dir, 'own.raw'))).to.deep.equal({ uid: 0, gid: 0, mode: 0o600 });
    expect(statOf(dir)).to.deep.equal({ uid: 0, gid: 0, mode: 0o755 });
    await mounts.unmount(dir);
    // The same group: its bits carry over.
    fs.chownSync(img, uid, 0);
    await mounts.mount(['--rw', img, dir]);
    expect(statOf(path.join(dir, 'own.raw'))).to.deep.equal({ uid: 0, gid: 0, mode: 0o640 });
    await mounts.unmount(dir);
    // Execute bits never, and write bits only where the image file has them.
    fs.chmodSync(img, 0o555);
    await mounts.mount(['--rw', img, dir]);
    expect(statOf(path.join(dir, 'own.raw')).mode).to.equal(0o444);
  });

  it('keeps other users out without -o allow_other, whatever the mode', async () => {
    const img = await qcow2('open.qcow2', 0o644);
    const dir = mp('noallow');
    await mounts.mount([img, dir]);
    const r = await userReads(path.join(dir, 'open.raw'));
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/Permission denied/);
    // Root reads it, and so would the mounting user.
    expect(fs.readFileSync(path.join(dir, 'open.raw')).subarray(0, 4)).to.deep.equal(Buffer.alloc(4, 0x5a));
    await mounts.unmount(dir);

    // -o allow_root lets only the mounting user and root in (here both are root).
    await mounts.mount(['-o', 'allow_root', img, dir]);
    const r2 = await userReads(path.join(dir, 'open.raw'));
    expect(r2.code).to.not.equal(0);
    expect(r2.stderr).to.match(/Permission denied/);
    expect((await asUser('ls', [dir])).stderr).to.match(/Permission denied/);
    expect(fs.readFileSync(path.join(dir, 'open.raw')).subarray(0, 4)).to.deep.equal(Buffer.alloc(4, 0x5a));
  });

  it('lets other users read with -o allow_other where the mode allows, and not where it does not', async () => {
    const open = await qcow2('shared.qcow2', 0o644);
    const closed = await qcow2('private.qcow2', 0o600);
    const dir = mp('allow');
    await mounts.mount(['-o', 'allow_other', open, closed, dir]);
    expect(statOf(path.join(dir, 'shared.raw')).mode).to.equal(0o444);
    expect(statOf(path.join(dir, 'private.raw')).mode).to.equal(0o400);
    const ok = await userReads(path.join(dir, 'shared.raw'));
    expect(ok.code, ok.stderr).to.equal(0);
    expect(Buffer.from(ok.stdout, 'latin1')).to.deep.equal(Buffer.alloc(16, 0x5a));
    const ls = await asUser('ls', [dir]);
    expect(ls.code, ls.stderr).to.equal(0);
    const denied = await userReads(path.join(dir, 'private.raw'));
    expect(denied.code).to.not.equal(0);
    expect(denied.stderr).to.match(/Permission denied/);
  });

  it("keeps an encrypted image's plaintext owner-only, even when the image file is 0644 and -o allow_other is given", async () => {
    const img = await luks('enc.luks', 0o644);
    const dir = mp('enc');
    await mounts.mount(['-o', 'allow_other', '--secret', PASS, img, dir]);
    const flat = path.join(dir, 'enc.raw');
    expect(statOf(flat).mode).to.equal(0o400);
    expect(fs.readFileSync(flat).subarray(0, 4)).to.deep.equal(Buffer.alloc(4, 0x5a));
    const r = await userReads(flat);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/Permission denied/);
    await mounts.unmount(dir);

    // An overlay shows its encrypted backing file's plaintext: owner-only too.
    const ov = path.join(tmp.dir, 'over-enc.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', img, '-F', 'luks', '-u', ov, '4M']);
    fs.chmodSync(ov, 0o644);
    await mounts.mount(['-o', 'allow_other', '--secret', PASS, ov, dir]);
    expect(statOf(path.join(dir, 'over-enc.raw')).mode).to.equal(0o400);
    const r2 = await userReads(path.join(dir, 'over-enc.raw'));
    expect(r2.code).to.not.equal(0);
    expect(r2.stderr).to.match(/Permission denied/);
    await mounts.unmount(dir);

    // AES-encrypted qcow2 and qcow (v1) images alike.
    for (const fmt of ['qcow2', 'qcow']) {
      const aes = path.join(tmp.dir, `aes-${fmt}.img`);
      await runOk('qemu-img', ['create', '-q', '--object', `secret,id=s0,data=${PASS}`, '-f', fmt, '-o', 'encrypt.format=aes,encrypt.key-secret=s0', aes, '4M']);
      fs.chmodSync(aes, 0o644);
      await mounts.mount(['-o', 'allow_other', '--secret', PASS, aes, dir]);
      expect(statOf(path.join(dir, `aes-${fmt}.raw`)).mode, fmt).to.equal(0o400);
      expect((await userReads(path.join(dir, `aes-${fmt}.raw`))).stderr, fmt).to.match(/Permission denied/);
      await mounts.unmount(dir);
    }
  });

  it('gives the flat file the owner, group and mode --uid, --gid and --umask (or -o uid=,gid=,umask=) choose', async () => {
    const img = await qcow2('chosen.qcow2', 0o600);
    const dir = mp('chosen');
    await mounts.mount(['-o', 'allow_other', '--uid', String(uid), '--gid', String(gid), '--umask', '077', img, dir]);
    expect(statOf(path.join(dir, 'chosen.raw'))).to.deep.equal({ uid, gid, mode: 0o400 });
    expect(statOf(dir)).to.deep.equal({ uid, gid, mode: 0o500 });
    const r = await userReads(path.join(dir, 'chosen.raw'));
    expect(r.code, r.stderr).to.equal(0);
    await mounts.unmount(dir);

    await mounts.mount(['--rw', '-o', `allow_other,uid=${uid},umask=022`, img, dir]);
    expect(statOf(path.join(dir, 'chosen.raw'))).to.deep.equal({ uid, gid: 0, mode: 0o644 });
    await mounts.unmount(dir);

    for (const bad of [['--uid', 'nobody'], ['-o', 'umask=9'], ['--uid', '5', '-o', 'uid=6']]) {
      const r2 = await tsmount([...bad, img, dir]);
      expect(r2.code, bad.join(' ')).to.equal(1);
      expect(r2.stderr.trim().split('\n')).to.have.length(1);
      expect(r2.stderr).to.match(/^tsmount: .*(uid|umask)/);
    }
  });

  it('chmod and chown work on a --rw mount (EPERM for a user who may not), EROFS only on a read-only one', async () => {
    const img = await qcow2('chattr.qcow2', 0o644);
    const dir = mp('chattr');
    await mounts.mount(['--rw', '-o', 'allow_other', img, dir]);
    const flat = path.join(dir, 'chattr.raw');
    fs.chmodSync(flat, 0o600);
    expect(statOf(flat).mode).to.equal(0o600);
    // Now closed to the other user, as the mode says.
    expect((await userReads(flat)).code).to.not.equal(0);
    fs.chmodSync(flat, 0o644);
    expect((await userReads(flat)).code).to.equal(0);
    // The other user owns neither the file nor CAP_CHOWN: the kernel says EPERM.
    const chmod = await asUser('chmod', ['666', flat]);
    expect(chmod.code).to.not.equal(0);
    expect(chmod.stderr).to.match(/Operation not permitted/);
    const chown = await asUser('chown', [String(uid), flat]);
    expect(chown.stderr).to.match(/Operation not permitted/);
    fs.chownSync(flat, uid, gid);
    expect(statOf(flat)).to.deep.equal({ uid, gid, mode: 0o644 });
    // The owner may now chmod it.
    const own = await asUser('chmod', ['600', flat]);
    expect(own.code, own.stderr).to.equal(0);
    expect(statOf(flat).mode).to.equal(0o600);
    await mounts.unmount(dir);
    // The image file keeps its own.
    expect(statOf(img)).to.deep.equal({ uid: 0, gid: 0, mode: 0o644 });

    await mounts.mount([img, dir]);
    expect(() => fs.chmodSync(flat, 0o600)).to.throw(/EROFS/);
  });

  it('grows the disk through truncate only with --growable; without it EPERM and a logged reason', async () => {
    const img = await qcow2('grow.qcow2', 0o644);
    const dir = mp('grow');
    const log = path.join(tmp.dir, 'grow.log');
    await mounts.mount(['--rw', '--log', log, img, dir]);
    const flat = path.join(dir, 'grow.raw');
    expect(() => fs.truncateSync(flat, 32 * MiB)).to.throw(/EPERM/);
    expect(() => fs.truncateSync(flat, 8 * MiB)).to.throw(/EPERM/);
    expect(fs.statSync(flat).size).to.equal(16 * MiB);
    await mounts.unmount(dir);
    expect(fs.readFileSync(log, 'utf8')).to.match(/grow\.qcow2: growing the disk from 16777216 to 33554432 bytes refused: mount with --growable/);
    expect((await imageInfo(img))['virtual-size']).to.equal(16 * MiB);

    for (const [flag, size] of [[['--growable'], 32 * MiB], [['-o', 'growable'], 48 * MiB], [['-o', 'resize'], 64 * MiB]] as const) {
      await mounts.mount(['--rw', ...flag, img, dir]);
      fs.truncateSync(flat, size);
      expect(fs.statSync(flat).size).to.equal(size);
      expect(() => fs.truncateSync(flat, MiB)).to.throw(/EPERM/);
      await mounts.unmount(dir);
      expect((await imageInfo(img))['virtual-size'], flag.join(' ')).to.equal(size);
    }
  });

  describe('a remote image', function () {
    let server: RunningServer | undefined;
    after(async () => server?.stop());

    it('belongs to the mounting user, mode 0400 read-only', async () => {
      const raw = path.join(tmp.dir, 'remote.raw');
      fs.writeFileSync(raw, Buffer.alloc(MiB, 0x5a));
      fs.chmodSync(raw, 0o644);
      const sock = path.join(tmp.dir, 'nbd.sock');
      server = await startServer('qemu-nbd', ['-t', '-r', '-f', 'raw', '-k', sock, raw], { path: sock });
      const dir = mp('remote');
      await mounts.mount(['-o', 'allow_other', `nbd+unix:///?socket=${sock}`, dir]);
      const [name] = fs.readdirSync(dir);
      const flat = path.join(dir, name!);
      expect(statOf(flat)).to.deep.equal({ uid: 0, gid: 0, mode: 0o400 });
      expect(await md5File(flat)).to.equal(await md5File(raw));
      expect((await userReads(flat)).code).to.not.equal(0);
    });
  });
});

describe('permissions: the mode policy (fs/access.ts)', function () {
  const img = { uid: 1000, gid: 100, mode: 0o100664 };

  it("takes the image file's bits without execute, and without write read-only", () => {
    expect(flatFileMode({ ...img, mode: 0o775 }, [], { writable: true, encrypted: false })).to.equal(0o664);
    expect(flatFileMode(img, [], { writable: false, encrypted: false })).to.equal(0o444);
    expect(flatFileMode(undefined, [], { writable: true, encrypted: false })).to.equal(0o600);
    expect(flatFileMode(undefined, [], { writable: false, encrypted: false })).to.equal(0o400);
  });

  it('is owner-only for an encrypted image; --umask may widen it only up to the image file', () => {
    expect(flatFileMode(img, [], { writable: true, encrypted: true })).to.equal(0o600);
    expect(flatFileMode(img, [], { writable: true, encrypted: true, umask: 0o002 })).to.equal(0o664);
    expect(flatFileMode({ ...img, mode: 0o600 }, [], { writable: true, encrypted: true, umask: 0 })).to.equal(0o600);
    expect(flatFileMode({ ...img, mode: 0o600 }, [], { writable: true, encrypted: false, umask: 0o022 })).to.equal(0o644);
  });

  it("gives the flat file's group only what the image file gives it: its other bits when the groups differ", () => {
    expect(flatFileMode({ ...img, mode: 0o640 }, [], { writable: true, encrypted: false, gid: 100 })).to.equal(0o640);
    expect(flatFileMode({ ...img, mode: 0o640 }, [], { writable: true, encrypted: false, gid: 7 })).to.equal(0o600);
    expect(flatFileMode({ ...img, mode: 0o664 }, [], { writable: false, encrypted: false, gid: 7 })).to.equal(0o444);
  });

  it('gives group and other no more than every file the image reads gives them', () => {
    // Same group: each class keeps what the file gives that class; a file only read limits reading.
    expect(flatFileMode(img, [{ uid: 0, gid: 100, mode: 0o640 }], { writable: true, encrypted: false })).to.equal(0o660);
    expect(flatFileMode(img, [{ uid: 0, gid: 100, mode: 0o640, written: true }], { writable: true, encrypted: false })).to.equal(0o640);
    expect(flatFileMode(img, [{ uid: 0, gid: 100, mode: 0o600 }], { writable: true, encrypted: false })).to.equal(0o620);
    // Another group: a user may fall under either of the file's classes.
    expect(flatFileMode(img, [{ uid: 0, gid: 5, mode: 0o604 }], { writable: false, encrypted: false })).to.equal(0o400);
    expect(flatFileMode(img, [{ uid: 0, gid: 5, mode: 0o644, written: true }, { uid: 0, gid: 100, mode: 0o666, written: true }], { writable: true, encrypted: false })).to.equal(0o644);
    expect(intersectGroupOther(0o666, 100, [{ uid: 0, gid: 100, mode: 0o600, written: true }])).to.equal(0o600);
  });
});
