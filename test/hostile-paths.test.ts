// Files an image names (issue 12, "What the server trusts"): a backing file, a VMDK
// extent or a qcow2 data file may name any path. When root mounts a user's image, what
// it pulls in must never give more than the image's owner has: a file that owner cannot
// read is not opened, one they cannot write is not opened for writing (drivers/trust.ts).
// --confine keeps every named file under the image's own folder.
import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, md5File, qemuIo, rawMd5, tempDir } from './helpers/qemu.js';
import { mountedPid, MountTracker, tsmount } from './helpers/mount.js';
import { pattern, testOptions, tsimg } from './helpers/images.js';
import { openImage } from '../drivers/open.js';
import { namedFilesOf } from '../drivers/trust.js';
import { intersectGroupOther } from '../fs/access.js';

const MiB = 1 << 20;
const isRoot = process.getuid?.() === 0;

/** A monolithicFlat descriptor naming one FLAT extent, as an attacker writes it by hand. */
function flatVmdk(extent: string, sectors: number): string {
  return `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW ${sectors} FLAT "${extent}" 0\n`;
}

function md5Sync(file: string): string {
  return execFileSync('md5sum', [file], { encoding: 'utf8' }).split(' ')[0]!;
}

describe('files an image names: never more than the image’s owner may read or write', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  const user = `tsm12-${process.pid}`.slice(0, 31);
  /** A supplementary group of the user's. */
  const group = `tsm12g-${process.pid}`.slice(0, 31);
  let groupGid = -1;
  let uid = -1;
  let gid = -1;
  let tmp: { dir: string; cleanup: () => void };
  let dir: string;
  let mp: string;
  /** Root-owned, mode 0600, 1 MiB: what an attacker wants to read or overwrite. */
  let secret: string;
  let secretMd5: string;

  const at = (...names: string[]): string => path.join(dir, ...names);
  const give = (file: string): void => fs.chownSync(file, uid, gid);
  /** The refusal: exactly one line, no mount, no server left. */
  const expectRefused = async (args: string[], line: RegExp): Promise<void> => {
    const r = await tsmount([...args, mp]);
    expect(r.code, r.stderr).to.not.equal(0);
    const lines = r.stderr.trim().split('\n');
    expect(lines, r.stderr).to.have.length(1);
    expect(lines[0]).to.match(line);
    expect(mountedPid(mp)).to.equal(undefined);
  };
  const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

  before(async function () {
    if (!isRoot) this.skip();
    execFileSync('groupadd', [group]);
    groupGid = Number(execFileSync('getent', ['group', group], { encoding: 'utf8' }).split(':')[2]);
    execFileSync('useradd', ['-M', '-N', '-G', group, '-s', '/usr/sbin/nologin', user]);
    uid = Number(execFileSync('id', ['-u', user], { encoding: 'utf8' }).trim());
    gid = Number(execFileSync('id', ['-g', user], { encoding: 'utf8' }).trim());
    tmp = tempDir('hostile');
    dir = tmp.dir;
    // The user must be able to reach their own files, as in any home or shared folder.
    fs.chmodSync(dir, 0o755);
    mp = at('mnt');
    fs.mkdirSync(mp);
    mounts.track(mp);
    secret = at('secret.bin');
    fs.writeFileSync(secret, pattern(MiB, 12), { mode: 0o600 });
    fs.chmodSync(secret, 0o600);
    secretMd5 = md5Sync(secret);
  });
  afterEach(async () => {
    await mounts.cleanup();
    if (secret && fs.existsSync(secret)) expect(md5Sync(secret), 'the root-only file changed').to.equal(secretMd5);
  });
  after(() => {
    tmp?.cleanup();
    if (uid >= 0) execFileSync('userdel', [user]);
    if (groupGid >= 0) execFileSync('groupdel', [group]);
  });

  describe('a user’s hostile image, mounted by root', () => {
    it('refuses a vmdk whose extent is a root-only file, read-only', async () => {
      const evil = at('evil.vmdk');
      fs.writeFileSync(evil, flatVmdk(secret, MiB / 512));
      give(evil);
      await expectRefused([evil], new RegExp(`^tsmount: ${esc(evil)}: extent "${esc(secret)}" is not readable by the image's owner \\(uid ${uid}\\); refusing to open it$`));
    });

    it('refuses the same vmdk with --rw, and the root file is unchanged', async () => {
      const evil = at('evil-rw.vmdk');
      fs.writeFileSync(evil, flatVmdk(secret, MiB / 512));
      give(evil);
      const before = fs.statSync(secret).mtimeMs;
      await expectRefused(['--rw', evil], new RegExp(`^tsmount: ${esc(evil)}: extent "${esc(secret)}" is not readable by the image's owner \\(uid ${uid}\\); refusing to open it for writing$`));
      expect(fs.statSync(secret).mtimeMs).to.equal(before);
    });

    it('refuses the 118-byte vmdk naming /etc/shadow (tsmount and tsimg info)', async () => {
      const evil = at('shadow.vmdk');
      fs.writeFileSync(evil, flatVmdk('/etc/shadow', 1));
      give(evil);
      await expectRefused([evil], /^tsmount: .*shadow\.vmdk: extent "\/etc\/shadow" is not readable by the image's owner \(uid \d+\); refusing to open it$/);
      const r = await tsimg(['info', evil]);
      expect(r.code).to.not.equal(0);
      expect(r.stderr.trim()).to.match(/^tsimg: .*extent "\/etc\/shadow" is not readable by the image's owner/);
    });

    it('judges a symlink to the image by the image it leads to', async () => {
      const evil = at('linked-evil.vmdk');
      fs.writeFileSync(evil, flatVmdk(secret, MiB / 512));
      give(evil);
      const link = at('root-link.vmdk');
      fs.symlinkSync(evil, link);
      await expectRefused([link], new RegExp(`: extent "${esc(secret)}" is not readable by the image's owner \\(uid ${uid}\\); refusing to open it$`));
    });

    it('refuses a file in a folder the owner cannot enter, even when the file itself is 0644', async () => {
      const locked = at('locked');
      fs.mkdirSync(locked, { mode: 0o700 });
      const inside = path.join(locked, 'open.bin');
      fs.writeFileSync(inside, Buffer.alloc(MiB, 1), { mode: 0o644 });
      const evil = at('dir.vmdk');
      fs.writeFileSync(evil, flatVmdk(inside, MiB / 512));
      give(evil);
      await expectRefused([evil], /extent ".*open\.bin" lies in a folder the image's owner \(uid \d+\) cannot enter \(.*locked\); refusing to open it$/);
    });

    it('refuses a qcow2 whose data_file is a root-only file, read-only and --rw', async () => {
      const img = at('data.qcow2');
      const data = at('data-target.bin');
      // qemu-img makes the data file; the attacker's image then names a root file there.
      await createImage(img, 'qcow2', MiB, { data_file: data, data_file_raw: 'on' });
      fs.rmSync(data);
      fs.writeFileSync(data, pattern(MiB, 7), { mode: 0o600 });
      fs.chmodSync(data, 0o600);
      const dataMd5 = md5Sync(data);
      give(img);
      await expectRefused([img], new RegExp(`: data file "${esc(data)}" is not readable by the image's owner \\(uid ${uid}\\); refusing to open it$`));
      await expectRefused(['--rw', img], new RegExp(`: data file "${esc(data)}" is not readable by the image's owner \\(uid ${uid}\\); refusing to open it for writing$`));
      expect(md5Sync(data)).to.equal(dataMd5);
    });

    it('refuses with --rw a data file the owner may read but not write, and opens it read-only', async () => {
      const img = at('data-ro.qcow2');
      const data = at('data-ro.bin');
      await createImage(img, 'qcow2', MiB, { data_file: data, data_file_raw: 'on' });
      fs.writeFileSync(data, pattern(MiB, 8));
      fs.chmodSync(data, 0o644);
      give(img);
      const dataMd5 = md5Sync(data);
      await expectRefused(['--rw', img], new RegExp(`: data file "${esc(data)}" is not writable by the image's owner \\(uid ${uid}\\); refusing to open it for writing$`));
      await mounts.mount([img, mp]);
      expect(await md5File(path.join(mp, 'data-ro.raw'))).to.equal(dataMd5);
      await mounts.unmount(mp);
      expect(md5Sync(data)).to.equal(dataMd5);
    });

    it('refuses a qcow2 whose backing file is a root-only image', async () => {
      const base = at('root-base.qcow2');
      await createImage(base, 'qcow2', MiB);
      await qemuIo(base, 'qcow2', ['write -P 0x5e 0 64k']);
      fs.chmodSync(base, 0o600);
      const top = at('user-top.qcow2');
      await createImage(top, 'qcow2', MiB, {}, { file: base, format: 'qcow2' });
      give(top);
      await expectRefused([top], new RegExp(`: backing file "${esc(base)}" is not readable by the image's owner \\(uid ${uid}\\); refusing to open it$`));
    });

    it('refuses a root-only file deep in the chain (the owner is the top image’s)', async () => {
      const base = at('deep-base.qcow2');
      await createImage(base, 'qcow2', MiB);
      fs.chmodSync(base, 0o600);
      const mid = at('deep-mid.qcow2');
      await createImage(mid, 'qcow2', MiB, {}, { file: base, format: 'qcow2' });
      const top = at('deep-top.qcow2');
      await createImage(top, 'qcow2', MiB, {}, { file: mid, format: 'qcow2' });
      give(mid);
      give(top);
      await expectRefused([top], new RegExp(`^tsmount: ${esc(mid)}: backing file "${esc(base)}" is not readable by the image's owner \\(uid ${uid}\\)`));
    });
  });

  describe('ordinary chains still open', () => {
    it('opens a user’s chain of user-owned 0600 files, mounted by root', async () => {
      const sub = at('pool');
      fs.mkdirSync(sub, { mode: 0o755 });
      const base = path.join(sub, 'base.qcow2');
      await createImage(base, 'qcow2', MiB);
      await qemuIo(base, 'qcow2', ['write -P 0x21 0 128k']);
      const top = at('user-chain.qcow2');
      await createImage(top, 'qcow2', MiB, {}, { file: 'pool/base.qcow2', format: 'qcow2' });
      await qemuIo(top, 'qcow2', ['write -P 0x22 64k 64k']);
      for (const f of [base, top]) {
        fs.chmodSync(f, 0o600);
        give(f);
      }
      await mounts.mount([top, mp]);
      expect(await md5File(path.join(mp, 'user-chain.raw'))).to.equal(await rawMd5(top));
      await mounts.unmount(mp);
    });

    it('opens a user’s vmdk whose extent the user owns', async () => {
      const ext = at('user-flat.bin');
      fs.writeFileSync(ext, pattern(MiB, 3), { mode: 0o600 });
      const vmdk = at('user-flat.vmdk');
      fs.writeFileSync(vmdk, flatVmdk('user-flat.bin', MiB / 512));
      give(ext);
      give(vmdk);
      await mounts.mount([vmdk, mp]);
      expect(await md5File(path.join(mp, 'user-flat.raw'))).to.equal(await rawMd5(vmdk));
      expect(await md5File(path.join(mp, 'user-flat.raw'), MiB)).to.equal(md5Sync(ext));
      await mounts.unmount(mp);
    });

    it('opens with --rw a user’s qcow2 whose data file the user owns', async () => {
      const img = at('user-data.qcow2');
      const data = at('user-data.bin');
      await createImage(img, 'qcow2', MiB, { data_file: data, data_file_raw: 'on' });
      await qemuIo(img, 'qcow2', ['write -P 0x44 0 64k']);
      for (const f of [img, data]) {
        fs.chmodSync(f, 0o600);
        give(f);
      }
      await mounts.mount(['--rw', img, mp]);
      expect(await md5File(path.join(mp, 'user-data.raw'))).to.equal(md5Sync(data));
      await mounts.unmount(mp);
    });

    it('opens a root file the user may read through a supplementary group', async () => {
      const shared = at('group-shared.bin');
      fs.writeFileSync(shared, pattern(MiB, 5));
      fs.chownSync(shared, 0, groupGid);
      fs.chmodSync(shared, 0o640);
      const vmdk = at('group.vmdk');
      fs.writeFileSync(vmdk, flatVmdk(shared, MiB / 512));
      give(vmdk);
      await mounts.mount([vmdk, mp]);
      expect(await md5File(path.join(mp, 'group.raw'), MiB)).to.equal(md5Sync(shared));
      await mounts.unmount(mp);
      // Not writable by the group: --rw is refused.
      await expectRefused(['--rw', vmdk], /is not writable by the image's owner/);
    });

    it('opens a root-owned vmdk naming a root-only file', async () => {
      const vmdk = at('root.vmdk');
      fs.writeFileSync(vmdk, flatVmdk(secret, MiB / 512));
      await mounts.mount([vmdk, mp]);
      expect(await md5File(path.join(mp, 'root.raw'), MiB)).to.equal(secretMd5);
      await mounts.unmount(mp);
    });

    it('refuses a root-owned image anyone may write (0666) that names a root-only file', async () => {
      const vmdk = at('open-to-all.vmdk');
      fs.writeFileSync(vmdk, flatVmdk(secret, MiB / 512));
      fs.chmodSync(vmdk, 0o666);
      await expectRefused([vmdk], new RegExp(`^tsmount: ${esc(vmdk)}: extent "${esc(secret)}" is not readable by everyone, who may write the image; refusing to open it$`));
      // A file everyone may read is fine.
      const open = at('open-to-all.bin');
      fs.writeFileSync(open, pattern(MiB, 6), { mode: 0o644 });
      fs.chmodSync(open, 0o644);
      fs.writeFileSync(vmdk, flatVmdk(open, MiB / 512));
      await mounts.mount([vmdk, mp]);
      expect(await md5File(path.join(mp, 'open-to-all.raw'), MiB)).to.equal(md5Sync(open));
      await mounts.unmount(mp);
    });

    it('judges a group-writable image by what its group may read', async () => {
      const vmdk = at('group-writable.vmdk');
      fs.writeFileSync(vmdk, flatVmdk(secret, MiB / 512));
      fs.chownSync(vmdk, 0, groupGid);
      fs.chmodSync(vmdk, 0o664);
      await expectRefused([vmdk], new RegExp(`is not readable by group ${groupGid}, who may write the image; refusing to open it$`));
      const shared = at('group-readable.bin');
      fs.writeFileSync(shared, pattern(MiB, 7));
      fs.chownSync(shared, 0, groupGid);
      fs.chmodSync(shared, 0o640);
      fs.writeFileSync(vmdk, flatVmdk(shared, MiB / 512));
      await mounts.mount([vmdk, mp]);
      expect(await md5File(path.join(mp, 'group-writable.raw'), MiB)).to.equal(md5Sync(shared));
      await mounts.unmount(mp);
    });

    it('opens a hostile image with --trust-image-paths, as QEMU would', async () => {
      const evil = at('trusted.vmdk');
      fs.writeFileSync(evil, flatVmdk(secret, MiB / 512));
      give(evil);
      await mounts.mount(['--trust-image-paths', evil, mp]);
      expect(await md5File(path.join(mp, 'trusted.raw'), MiB)).to.equal(secretMd5);
      await mounts.unmount(mp);
    });
  });

  describe('--confine', () => {
    let base: string;
    before(async () => {
      fs.mkdirSync(at('other'));
      fs.mkdirSync(at('vm'));
      base = at('other', 'base.qcow2');
      await createImage(base, 'qcow2', MiB);
      await qemuIo(base, 'qcow2', ['write -P 0x33 0 64k']);
      fs.copyFileSync(base, at('vm', 'base.qcow2'));
      fs.symlinkSync('../other/base.qcow2', at('vm', 'link.qcow2'));
    });

    it('refuses a backing file in ../other/ (which the default policy opens)', async () => {
      const top = at('vm', 'up.qcow2');
      await createImage(top, 'qcow2', MiB, {}, { file: '../other/base.qcow2', format: 'qcow2' });
      await expectRefused(['--confine', top], new RegExp(`^tsmount: ${esc(top)}: backing file "../other/base.qcow2" is outside the image's folder ${esc(fs.realpathSync(at('vm')))} \\(--confine\\); refusing to open it$`));
      // tsimg info opens the backing chain only with --backing-chain (alone it shows the name, as qemu-img info).
      const r = await tsimg(['info', '--backing-chain', '--confine', top]);
      expect(r.code).to.not.equal(0);
      expect(r.stderr).to.match(/is outside the image's folder/);
      await mounts.mount([top, mp]);
      await mounts.unmount(mp);
    });

    it('accepts a backing file in the same folder', async () => {
      const top = at('vm', 'same.qcow2');
      await createImage(top, 'qcow2', MiB, {}, { file: 'base.qcow2', format: 'qcow2' });
      await mounts.mount(['--confine', top, mp]);
      expect(await md5File(path.join(mp, 'same.raw'))).to.equal(await rawMd5(top));
      await mounts.unmount(mp);
    });

    it('refuses a symlink in the folder that leads out of it', async () => {
      const top = at('vm', 'via-link.qcow2');
      await createImage(top, 'qcow2', MiB, {}, { file: 'link.qcow2', format: 'qcow2' });
      await expectRefused(['--confine', top], /: backing file "link\.qcow2" is outside the image's folder .* \(--confine\); refusing to open it$/);
    });
  });

  describe('what the flat file may give away', () => {
    it('lists the named files and narrows the mode to what every one of them allows', async () => {
      const base = at('narrow-base.qcow2');
      await createImage(base, 'qcow2', MiB);
      fs.chmodSync(base, 0o600);
      const top = at('narrow-top.qcow2');
      await createImage(top, 'qcow2', MiB, {}, { file: base, format: 'qcow2' });
      fs.chmodSync(top, 0o644);
      const node = await openImage(top, testOptions());
      try {
        const files = namedFilesOf(node);
        expect(files.map((f) => f.path)).to.deep.equal([base]);
        expect(files[0]!.write).to.equal(false);
        const pulled = (f: { stat: fs.Stats; write: boolean }) => ({ uid: f.stat.uid, gid: f.stat.gid, mode: f.stat.mode, written: f.write });
        expect(intersectGroupOther(0o644, fs.statSync(top).gid, files.map(pulled)).toString(8)).to.equal('600');
        expect(intersectGroupOther(0o664, fs.statSync(top).gid, [pulled({ stat: fs.statSync(top), write: true })]).toString(8)).to.equal('644');
      } finally {
        await node.close();
      }
    });
  });
});
