// What QEMU's file protocol sets on a file it creates (file-posix raw_co_create), set
// by tsimg create and convert as by qemu-img, for every format and every file an image
// is made of: the btrfs NOCOW attribute (-o nocow=on) and the XFS extent size hint
// (-o extent_size_hint, 1 MiB when not given), judged on a loop-mounted btrfs and xfs
// (both built into this kernel; mkfs from btrfs-progs and xfsprogs).
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { run, runOk, tempDir } from './helpers/qemu.js';
import { tsimg } from './helpers/images.js';

/** Whether lsattr shows the NOCOW flag (C) on `file`. */
async function nocow(file: string): Promise<boolean> {
  const out = await runOk('lsattr', [file]);
  return out.split(/\s+/)[0]!.includes('C');
}

/** The extent size hint xfs_io reports for `file` ("[1048576] file"). */
async function extsize(file: string): Promise<string> {
  return (await runOk('xfs_io', ['-c', 'extsize', file])).split(' ')[0]!;
}

describe('create: nocow and extent_size_hint on the new files, as qemu-img sets them', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  const mounted: string[] = [];

  before(async function () {
    if (process.getuid?.() !== 0) this.skip();
    for (const tool of ['mkfs.btrfs', 'mkfs.xfs', 'lsattr', 'xfs_io']) {
      if ((await run('sh', ['-c', `command -v ${tool}`])).code !== 0) {
        console.log(`      (skipped: ${tool} is missing; scripts/setup.sh installs btrfs-progs, xfsprogs and e2fsprogs)`);
        this.skip();
      }
    }
    t = tempDir('file-attrs');
    for (const [fsType, mkfs] of [['btrfs', ['mkfs.btrfs', '-q']], ['xfs', ['mkfs.xfs', '-q']]] as const) {
      const img = path.join(t.dir, `${fsType}.img`);
      fs.writeFileSync(img, '');
      fs.truncateSync(img, 300 << 20);
      await runOk(mkfs[0], [...mkfs.slice(1), img]);
      const dir = path.join(t.dir, fsType);
      fs.mkdirSync(dir);
      await runOk('mount', ['-o', 'loop', img, dir]);
      mounted.push(dir);
    }
  });

  after(async () => {
    for (const dir of mounted.splice(0)) await run('umount', [dir]);
    t?.cleanup();
  });

  const cases: { args: string[]; files: string[] }[] = [
    { args: ['-f', 'qcow2', '-o', 'nocow=on'], files: ['IMG'] },
    { args: ['-f', 'qcow2'], files: ['IMG'] },
    { args: ['-f', 'raw', '-o', 'nocow=on'], files: ['IMG'] },
    { args: ['-f', 'qed', '-o', 'nocow=on'], files: ['IMG'] },
    { args: ['-f', 'vdi', '-o', 'nocow=on,extent_size_hint=2M'], files: ['IMG'] },
    { args: ['-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse,nocow=on'], files: ['IMG', 'IMG-s001', 'IMG-s002'] },
    { args: ['-f', 'qcow2', '-o', 'nocow=on,data_file=DATA'], files: ['IMG', 'DATA'] },
    { args: ['-f', 'qcow2', '-o', 'extent_size_hint=4M'], files: ['IMG'] },
    { args: ['-f', 'qcow2', '-o', 'extent_size_hint=0'], files: ['IMG'] },
  ];

  for (const fsType of ['btrfs', 'xfs']) {
    it(`on ${fsType}: the same attributes on every file, the same warnings`, async () => {
      const dir = path.join(t.dir, fsType);
      for (const c of cases) {
        const what = `${fsType}: create ${c.args.join(' ')}`;
        const names = (tool: string): string[] => c.files.map((f) => path.join(dir, `${f.replace('IMG', tool)}${f === 'DATA' ? '.data' : '.vmdk'}`));
        for (const f of fs.readdirSync(dir)) fs.rmSync(path.join(dir, f), { force: true });
        const args = (tool: string): string[] => ['create', '-q', ...c.args.map((a) => a.replace('DATA', path.join(dir, `DATA-${tool}.data`))), path.join(dir, `${tool}.vmdk`), '3G'];
        const q = await run('qemu-img', args('q'));
        const r = await tsimg(args('t'));
        expect(r.code, `${what}: ${r.stderr}`).to.equal(q.code).and.to.equal(0);
        // A hint given that the file system refuses is a warning from both, and only then.
        expect(/extent size hint/.test(r.stderr), `${what}: ${r.stderr}`).to.equal(/extent size hint/.test(q.stderr));
        const ours = names('t').map((n) => n.replace(/DATA\.data$/, 'DATA-t.data'));
        const theirs = names('q').map((n) => n.replace(/DATA\.data$/, 'DATA-q.data'));
        for (let i = 0; i < ours.length; i++) {
          expect(await nocow(ours[i]!), `${what}: ${path.basename(ours[i]!)} NOCOW`).to.equal(await nocow(theirs[i]!));
          if (fsType === 'xfs') expect(await extsize(ours[i]!), `${what}: ${path.basename(ours[i]!)} extsize`).to.equal(await extsize(theirs[i]!));
        }
      }
      // tsimg convert makes its target the same way.
      const src = path.join(dir, 'src.raw');
      await runOk('qemu-img', ['create', '-q', '-f', 'raw', src, '8M']);
      await runOk('qemu-img', ['convert', '-O', 'qcow2', '-o', 'nocow=on,extent_size_hint=8M', src, path.join(dir, 'cq.qcow2')]);
      const r = await tsimg(['convert', '-O', 'qcow2', '-o', 'nocow=on,extent_size_hint=8M', src, path.join(dir, 'ct.qcow2')]);
      expect(r.code, r.stderr).to.equal(0);
      expect(await nocow(path.join(dir, 'ct.qcow2'))).to.equal(await nocow(path.join(dir, 'cq.qcow2')));
      if (fsType === 'btrfs') expect(await nocow(path.join(dir, 'ct.qcow2'))).to.equal(true);
      if (fsType === 'xfs') expect(await extsize(path.join(dir, 'ct.qcow2'))).to.equal('[8388608]');
    });
  }

  it('preallocation for a format without its own goes to the file as in qemu-img: metadata refused, the rest accepted', async () => {
    const dir = path.join(t.dir, 'xfs');
    for (const format of ['qed', 'vdi', 'vpc', 'vhdx']) {
      for (const p of ['off', 'falloc', 'full', 'metadata']) {
        for (const f of fs.readdirSync(dir)) fs.rmSync(path.join(dir, f), { force: true });
        const q = await run('qemu-img', ['create', '-q', '-f', format, '-o', `preallocation=${p}`, path.join(dir, `q.${format}`), '64M']);
        const r = await tsimg(['create', '-q', '-f', format, '-o', `preallocation=${p}`, path.join(dir, `t.${format}`), '64M']);
        expect(r.code, `${format} preallocation=${p}: ${r.stderr}`).to.equal(q.code);
        if (r.code === 0) expect(fs.existsSync(path.join(dir, `t.${format}`))).to.equal(true);
        else expect(fs.existsSync(path.join(dir, `t.${format}`)), `${format} ${p}: nothing left`).to.equal(false);
      }
    }
  });
});
