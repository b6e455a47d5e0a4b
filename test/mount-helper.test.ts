// fstab lines and `mount -t fuse.tsmount` through a real mount(8): in a private mount
// namespace (unshare) our helper is bound over mount.fuse, which mount(8) runs for type
// fuse.tsmount when it finds no mount.fuse.tsmount, so /etc/fstab and /sbin are never
// touched and the mounts vanish with the namespace. Also the helper called directly as
// mount(8) calls it.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkImage, md5File, rawMd5, run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, forceUnmount, tsmountProcesses, waitFor, mountpointIn } from './helpers/mount.js';
import { pattern } from './helpers/images.js';

const HELPER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../mount-helpers/mount-fuse.js');
const MiB = 1 << 20;

describe('mount.fuse.tsmount: fstab and mount -t fuse.tsmount', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let image: string;

  before(async () => {
    tmp = tempDir('mount-helper');
    const raw = path.join(tmp.dir, 'src.raw');
    const b = Buffer.alloc(8 * MiB);
    pattern(MiB, 3).copy(b, 2 * MiB);
    fs.writeFileSync(raw, b);
    image = path.join(tmp.dir, 'disk.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
  });
  afterEach(async () => {
    await mounts.cleanup();
    // Servers left in the namespace by a failed test: their mounts die with them.
    for (const pid of tsmountProcesses(tmp.dir)) process.kill(pid, 'SIGKILL');
  });
  after(() => tmp.cleanup());

  const mp = (name: string): string => mountpointIn(tmp.dir, name);

  /** Run `script` in a private mount namespace where mount(8) finds our helper as mount.fuse. */
  async function inNamespace(script: string): Promise<string> {
    const wrapper = path.join(tmp.dir, 'mount.fuse');
    fs.writeFileSync(wrapper, `#!/bin/sh\nexec ${process.execPath} ${HELPER} "$@"\n`, { mode: 0o755 });
    // An installed mount.fuse.tsmount (scripts/setup.sh links one) would win over mount.fuse: ours replaces it
    // too, unless it is ours already (CI's clone links its own build; a bind over it would hide the helper itself).
    const helper = fs.realpathSync(HELPER);
    const bind = `mount --bind ${wrapper} "$(readlink -f /sbin/mount.fuse)"\nif [ -e /sbin/mount.fuse.tsmount ] && [ "$(readlink -f /sbin/mount.fuse.tsmount)" != "${helper}" ]; then mount --bind ${wrapper} "$(readlink -f /sbin/mount.fuse.tsmount)"; fi`;
    const r = await run('unshare', ['--mount', '--propagation', 'private', 'sh', '-e', '-c', `${bind}\n${script}`]);
    if (r.code !== 0) throw new Error(`namespace script failed (${r.code}): ${r.stderr.trim()} ${r.stdout.trim()}`);
    return r.stdout;
  }

  it('mounts fstab lines (ro with generic options; defaults, which mount(8) passes as rw) and umount loses nothing', async function () {
    const ro = mp('ro');
    const rw = mp('rw');
    const fstab = path.join(tmp.dir, 'fstab');
    fs.writeFileSync(
      fstab,
      `${image} ${ro} fuse.tsmount ro,nofail,noauto,user,_netdev,nodev,nosuid,x-systemd.automount,cache=none,cache-size=4M,locking=auto 0 0\n` +
        `${image} ${rw} fuse.tsmount defaults,cache=writethrough 0 0\n`,
    );
    const want = await rawMd5(image, 'qcow2');
    const out = await inNamespace(`
      trap 'st=$?; umount -l ${ro} 2>/dev/null || true; umount -l ${rw} 2>/dev/null || true; exit $st' EXIT
      mount -T ${fstab} ${ro}
      grep " ${ro} fuse.tsmount ro," /proc/mounts >/dev/null
      md5sum < ${ro}/disk.raw
      if dd if=/dev/zero of=${ro}/disk.raw bs=512 count=1 conv=notrunc 2>/dev/null; then echo WROTE; fi
      umount ${ro}
      mount -T ${fstab} ${rw}
      grep " ${rw} fuse.tsmount rw," /proc/mounts >/dev/null
      printf 'through fstab' | dd of=${rw}/disk.raw bs=1 seek=4096 conv=notrunc,fsync status=none
      umount ${rw}
    `);
    expect(out.split(/\s/)[0]).to.equal(want);
    expect(out).to.not.include('WROTE');
    // umount returned; the server writes out and exits on its own.
    await waitFor(() => tsmountProcesses(tmp.dir).length === 0, 30_000, 'the servers to exit');
    expect((await checkImage(image, 'qcow2')).code, 'qemu-img check').to.equal(0);
    const io = await runOk('qemu-io', ['-f', 'qcow2', '-c', 'read -v 4096 13', image]);
    expect(io).to.include('through fstab'.slice(0, 4).split('').map((c) => c.charCodeAt(0).toString(16)).join(' '));
  });

  it('mount -t fuse.tsmount -o rw,partitions,secret-file=... with a tsmount# source', async function () {
    const dir = mp('t');
    const secret = path.join(tmp.dir, 'secret');
    fs.writeFileSync(secret, 'unused for a plain image');
    const out = await inNamespace(`
      trap 'st=$?; umount -l ${dir} 2>/dev/null || true; exit $st' EXIT
      mount -t fuse.tsmount -o rw,partitions,secret-file=${secret},cache-size=8M tsmount#${image} ${dir}
      grep " ${dir} fuse.tsmount rw," /proc/mounts >/dev/null
      ls ${dir}
      umount ${dir}
    `);
    expect(out.trim()).to.equal('disk.raw');
    await waitFor(() => tsmountProcesses(tmp.dir).length === 0, 30_000, 'the server to exit');
  });

  it("through Debian's own mount.fuse3 (mount -t fuse tsmount#IMAGE), which runs tsmount with -o dev,suid", async function () {
    // A private /usr/sbin holding the real mount.fuse3 and `tsmount`, the one place its PATH and mount(8) both look.
    const sbin = path.join(tmp.dir, 'sbin');
    fs.mkdirSync(sbin);
    fs.copyFileSync(fs.realpathSync('/sbin/mount.fuse'), path.join(sbin, 'mount.fuse3'));
    fs.chmodSync(path.join(sbin, 'mount.fuse3'), 0o755);
    fs.symlinkSync('mount.fuse3', path.join(sbin, 'mount.fuse'));
    const tsmountJs = path.join(path.dirname(HELPER), 'tsmount.js');
    fs.writeFileSync(path.join(sbin, 'tsmount'), `#!/bin/sh\nexec ${process.execPath} ${tsmountJs} "$@"\n`, { mode: 0o755 });
    const dir = mp('fuse3');
    const r = await run('unshare', ['--mount', '--propagation', 'private', 'sh', '-e', '-c', `
      trap 'st=$?; umount -l ${dir} 2>/dev/null || true; exit $st' EXIT
      mount --bind ${sbin} /usr/sbin
      mount -t fuse -o ro,nofail,cache=none tsmount#${image} ${dir}
      grep " ${dir} fuse.tsmount ro," /proc/mounts >/dev/null
      md5sum < ${dir}/disk.raw
      umount ${dir}
    `]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout.split(/\s/)[0]).to.equal(await rawMd5(image, 'qcow2'));
    await waitFor(() => tsmountProcesses(tmp.dir).length === 0, 30_000, 'the server to exit');
  });

  it('runs as mount(8) runs it: SOURCE MOUNTPOINT -o OPTIONS -t fuse.tsmount, and says one line on a bad option', async function () {
    const dir = mp('direct');
    mounts.track(dir);
    const r = await run(process.execPath, [HELPER, image, dir, '-n', '-o', 'ro,nofail,dev,suid,cache=unsafe', '-t', 'fuse.tsmount']);
    expect(r.code, r.stderr).to.equal(0);
    expect(await md5File(path.join(dir, 'disk.raw'))).to.equal(await rawMd5(image, 'qcow2'));
    await mounts.unmount(dir);
    const bad = await run(process.execPath, [HELPER, image, dir, '-o', 'ro,cache=sometimes']);
    expect(bad.code).to.not.equal(0);
    expect(bad.stderr.trim().split('\n')).to.have.length(1);
    expect(bad.stderr).to.match(/sometimes/);
    forceUnmount(dir);
  });

  it("systemd: the unit systemd-fstab-generator makes from an fstab line, started and stopped with the commands systemd runs", async function () {
    const generator = '/lib/systemd/system-generators/systemd-fstab-generator';
    if (!fs.existsSync(generator)) {
      console.log('      (skipped: no systemd-fstab-generator; the systemd package has it)');
      this.skip();
    }
    const pid1 = fs.readFileSync('/proc/1/comm', 'utf8').trim();
    // Never start units on the machine running the tests: mount(8) runs as the unit would run it.
    if (pid1 !== 'systemd') console.log(`      (systemd is not PID 1 here (${pid1}): the generated unit's What/Where/Type/Options are checked and its mount/umount commands run by hand)`);
    const where = mp('unit');
    const options = 'ro,allow_other,nofail,cache=none';
    const fstab = path.join(tmp.dir, 'fstab-systemd');
    fs.writeFileSync(fstab, `${image} ${where} fuse.tsmount ${options} 0 0\n`);
    const out = path.join(tmp.dir, 'generated');
    const dirs = ['normal', 'early', 'late'].map((d) => path.join(out, d));
    for (const d of dirs) fs.mkdirSync(d, { recursive: true });
    // SYSTEMD_FSTAB and SYSTEMD_PROC_CMDLINE: the generator's own test hooks (no /etc/fstab, no kernel command line).
    const g = await run(generator, dirs, { env: { ...process.env, SYSTEMD_FSTAB: fstab, SYSTEMD_PROC_CMDLINE: '' } });
    expect(g.code, g.stderr).to.equal(0);
    const unitName = (await runOk('systemd-escape', ['--path', '--suffix=mount', where])).trim();
    const unit = fs.readFileSync(path.join(dirs[0]!, unitName), 'utf8');
    const mount = Object.fromEntries(
      unit
        .slice(unit.indexOf('[Mount]'))
        .split('\n')
        .map((l) => /^(\w+)=(.*)$/.exec(l))
        .filter((m): m is RegExpExecArray => m !== null)
        .map((m) => [m[1]!, m[2]!]),
    );
    expect(mount).to.deep.equal({ What: image, Where: where, Type: 'fuse.tsmount', Options: options });
    // nofail: local-fs.target wants the mount and does not fail without it.
    expect(fs.existsSync(path.join(dirs[0]!, 'local-fs.target.wants', unitName))).to.equal(true);
    const want = await rawMd5(image, 'qcow2');
    // src/core/mount.c: ExecMount is `mount WHAT WHERE -t TYPE -o OPTIONS`, ExecUnmount `umount WHERE -c`.
    const got = await inNamespace(`
      trap 'st=$?; umount -l ${where} 2>/dev/null || true; exit $st' EXIT
      mount ${mount.What} ${mount.Where} -t ${mount.Type} -o ${mount.Options}
      grep " ${where} fuse.tsmount ro," /proc/mounts >/dev/null
      md5sum < ${where}/disk.raw
      umount ${mount.Where} -c
      if grep " ${where} " /proc/mounts; then echo STILL-MOUNTED; fi
    `);
    expect(got.split(/\s/)[0]).to.equal(want);
    expect(got).to.not.include('STILL-MOUNTED');
    await waitFor(() => tsmountProcesses(tmp.dir).length === 0, 30_000, 'the server to exit');
    expect((await checkImage(image, 'qcow2')).code, 'qemu-img check').to.equal(0);
  });
});
