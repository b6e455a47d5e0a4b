// Ordinary users mount too (issue 19), as on any Debian system where /dev/fuse is mode
// 0666 and fusermount3 is setuid root: a user made for the test mounts a qcow2 it owns
// read-write, writes, fsyncs and unmounts with tsmount -u, and uses tsimg; the image is
// then clean for qemu-img check and holds what was written. CI runs as root, so the test
// gives /dev/fuse Debian's mode for its duration and restores the previous mode after.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, convertToRaw, tempDir } from './helpers/qemu.js';
import { fuseMountsUnder, tsmountProcesses, TSMOUNT } from './helpers/mount.js';
import { readBytes, TSIMG } from './helpers/images.js';
import { makeTestUser, type TestUser } from './helpers/users.js';

const MiB = 1 << 20;
const FUSE = '/dev/fuse';
const FUSERMOUNT = '/usr/bin/fusermount3';

describe('an ordinary user mounts, writes and unmounts (/dev/fuse 0666, setuid fusermount3)', function () {
  this.timeout(300_000);
  /**
   * The user's mounts are out of root's reach through the mount (no allow_other), so
   * they are found in /proc/mounts: unmounted as the user, else lazily by root, and
   * the user's servers ended.
   */
  async function cleanupMounts(): Promise<void> {
    if (!tmp) return;
    for (const mp of fuseMountsUnder(tmp.dir)) {
      await user?.run(process.execPath, [TSMOUNT, '-u', mp], { timeoutMs: 30_000 });
      if (fuseMountsUnder(mp).length) spawnSync('umount', ['-l', mp]);
    }
    for (const pid of tsmountProcesses(tmp.dir)) process.kill(pid, 'SIGKILL');
  }
  let tmp: { dir: string; cleanup: () => void } | undefined;
  let user: TestUser | undefined;
  let fuseMode: number | undefined;

  const restoreFuse = (): void => {
    if (fuseMode === undefined) return;
    fs.chmodSync(FUSE, fuseMode);
    fuseMode = undefined;
  };

  before(async function () {
    if (process.getuid?.() !== 0) {
      console.log('      (skipped: needs root to make a user and set /dev/fuse to 0666)');
      this.skip();
    }
    if (!fs.existsSync(FUSERMOUNT)) {
      console.log(`      (skipped: no ${FUSERMOUNT}; the fuse3 package installs it setuid root)`);
      this.skip();
    }
    // Debian's fuse3 package installs fusermount3 setuid root: without it no ordinary user mounts.
    const fm = fs.statSync(FUSERMOUNT);
    expect(fm.uid, `${FUSERMOUNT} owner`).to.equal(0);
    expect(fm.mode & 0o4000, `${FUSERMOUNT} is setuid`).to.equal(0o4000);
    fuseMode = fs.statSync(FUSE).mode & 0o7777;
    process.once('exit', restoreFuse);
    fs.chmodSync(FUSE, 0o666);
    user = await makeTestUser();
    tmp = tempDir('user-mount');
    fs.chmodSync(tmp.dir, 0o755);
  });
  afterEach(() => cleanupMounts());
  after(async () => {
    // Each step runs even when one before it fails.
    try {
      await cleanupMounts();
    } finally {
      try {
        restoreFuse();
      } finally {
        user?.remove();
        tmp?.cleanup();
      }
    }
  });

  it('tsimg create, tsmount --rw, write + fsync, tsmount -u as the user; qemu-img check is clean and the data is there', async () => {
    const u = user!;
    const home = path.join(tmp!.dir, 'home');
    fs.mkdirSync(home);
    fs.chownSync(home, u.uid, u.gid);
    const img = path.join(home, 'disk.qcow2');
    const mp = path.join(home, 'mnt');
    const as = (cmd: string, args: string[]) => u.run(cmd, args, { home });

    const made = await as(process.execPath, [TSIMG, 'create', '-f', 'qcow2', img, '16M']);
    expect(made.code, made.stderr).to.equal(0);
    expect(fs.statSync(img).uid).to.equal(u.uid);
    const mk = await as('mkdir', [mp]);
    expect(mk.code, mk.stderr).to.equal(0);

    const m = await as(process.execPath, [TSMOUNT, '--rw', img, mp]);
    expect(m.code, m.stderr).to.equal(0);
    expect(fuseMountsUnder(mp), 'mounted').to.deep.equal([mp]);
    const flat = path.join(mp, 'disk.raw');
    // The flat file is the user's, group included.
    const st = await as('stat', ['-c', '%u %g %a %s', flat]);
    expect(st.code, st.stderr).to.equal(0);
    expect(st.stdout.trim()).to.equal(`${u.uid} ${u.gid} 644 ${16 * MiB}`);

    const data = crypto.randomBytes(192 * 1024);
    const src = path.join(tmp!.dir, 'data.bin');
    fs.writeFileSync(src, data);
    fs.chmodSync(src, 0o644);
    const offset = 3 * MiB + 4096;
    const dd = await as('dd', [`if=${src}`, `of=${flat}`, 'bs=4096', `seek=${offset / 4096}`, 'conv=notrunc,fsync', 'status=none']);
    expect(dd.code, dd.stderr).to.equal(0);
    const back = await as('cmp', ['-n', String(data.length), src, flat, '0', String(offset)]);
    expect(back.code, back.stdout + back.stderr).to.equal(0);

    const info = await as(process.execPath, [TSIMG, 'info', '-U', img]);
    expect(info.code, info.stderr).to.equal(0);
    expect(info.stdout).to.match(/file format: qcow2/);

    const un = await as(process.execPath, [TSMOUNT, '-u', mp]);
    expect(un.code, un.stderr).to.equal(0);
    expect(fuseMountsUnder(mp), 'unmounted').to.deep.equal([]);
    expect(tsmountProcesses(tmp!.dir), 'the server is gone').to.deep.equal([]);

    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const userCheck = await as(process.execPath, [TSIMG, 'check', img]);
    expect(userCheck.code, userCheck.stdout + userCheck.stderr).to.equal(0);
    const raw = path.join(tmp!.dir, 'disk.raw');
    await convertToRaw(img, raw, 'qcow2');
    const got = readBytes(raw, offset, data.length);
    expect(got.equals(data), 'the image holds what the user wrote').to.equal(true);
  });
});
