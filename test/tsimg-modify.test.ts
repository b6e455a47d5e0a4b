// tsimg snapshot, resize, commit, rebase, amend and measure against qemu-img, the
// oracle: each change is made by tsimg on one copy and by qemu-img on another, and
// judged by qemu-img check (clean), qemu-img compare and qemu-img's own listings.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { md5File, run, runOk, tempDir } from './helpers/qemu.js';
import { expectClean, patch, readBytes, TSIMG, tsimg } from './helpers/images.js';

const MiB = 1024 * 1024;

async function ok(args: string[], cwd: string): Promise<string> {
  const r = await tsimg(args, cwd);
  expect(r.code, `tsimg ${args.join(' ')}: ${r.stderr}`).to.equal(0);
  return r.stdout;
}

const qemuIo = (cwd: string, file: string, ...cmds: string[]): Promise<string> => runOk('qemu-io', [...cmds.flatMap((c) => ['-c', c]), file], { cwd });

async function expectSame(cwd: string, a: string, b: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-U', a, b], { cwd });
  expect(r.code, `${a} vs ${b}: ${r.stdout}${r.stderr}`).to.equal(0);
}

/** qemu-img snapshot -l without the date column (the snapshots' times differ by when each tool ran). */
async function snapshotNames(cwd: string, file: string): Promise<string[]> {
  const out = await runOk('qemu-img', ['snapshot', '-U', '-l', file], { cwd });
  return out
    .split('\n')
    .slice(2)
    .filter((l) => l.trim())
    .map((l) => l.split(/\s+/).slice(0, 2).join(' '));
}

describe('tsimg snapshot, resize, commit, rebase, amend, measure against qemu-img', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-modify')));
  after(() => t.cleanup());

  const variants: { name: string; make: (dir: string) => Promise<void> }[] = [
    {
      name: 'qcow2 v3',
      make: async (dir) => {
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M'], { cwd: dir });
        await qemuIo(dir, 'a.qcow2', 'write -P 1 0 4M', 'write -P 2 10M 1M', 'write -z 12M 1M');
      },
    },
    {
      name: 'qcow2 v2 with compressed clusters',
      make: async (dir) => {
        await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'src.raw', '64M'], { cwd: dir });
        await qemuIo(dir, 'src.raw', 'write -P 1 0 4M', 'write -P 2 10M 1M');
        await runOk('qemu-img', ['convert', '-q', '-c', '-O', 'qcow2', '-o', 'compat=0.10', 'src.raw', 'a.qcow2'], { cwd: dir });
      },
    },
    {
      name: 'qcow2 extended L2, 32 KiB clusters',
      make: async (dir) => {
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=32k', 'a.qcow2', '64M'], { cwd: dir });
        await qemuIo(dir, 'a.qcow2', 'write -P 1 0 4M', 'write -P 2 10M 5k', 'write -z 12M 1M');
      },
    },
  ];

  for (const v of variants) {
    it(`snapshot -c, -l, -a, -d (${v.name}): qemu-img check clean, same content as qemu-img's`, async () => {
      const dir = fs.mkdtempSync(path.join(t.dir, 'snap-'));
      await v.make(dir);
      await ok(['snapshot', '-c', 's1', 'a.qcow2'], dir);
      await qemuIo(dir, 'a.qcow2', 'write -P 3 0 1M', 'write -P 4 20M 1M');
      await runOk('qemu-img', ['snapshot', '-c', 'q2', 'a.qcow2'], { cwd: dir });
      await ok(['snapshot', '-c', 's3', 'a.qcow2'], dir);
      await expectClean(path.join(dir, 'a.qcow2'));
      expect(await snapshotNames(dir, 'a.qcow2')).to.deep.equal(['1 s1', '2 q2', '3 s3']);
      // -l prints qemu-img's listing.
      expect(await ok(['snapshot', '-l', 'a.qcow2'], dir)).to.equal(await runOk('qemu-img', ['snapshot', '-l', 'a.qcow2'], { cwd: dir }));
      // Each snapshot reads as qemu-img reads it.
      for (const s of ['s1', 's3']) {
        await runOk('qemu-img', ['convert', '-l', `snapshot.name=${s}`, '-O', 'raw', 'a.qcow2', `${s}.raw`], { cwd: dir });
      }
      await qemuIo(dir, 'a.qcow2', 'write -P 5 2M 2M');
      fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, 'b.qcow2'));
      await ok(['snapshot', '-a', 's1', 'a.qcow2'], dir);
      await runOk('qemu-img', ['snapshot', '-a', 's1', 'b.qcow2'], { cwd: dir });
      await expectClean(path.join(dir, 'a.qcow2'));
      await expectSame(dir, 'a.qcow2', 's1.raw');
      await expectSame(dir, 'a.qcow2', 'b.qcow2');
      // A write after the revert leaves the snapshot as it was.
      await qemuIo(dir, 'a.qcow2', 'write -P 6 0 64k');
      await expectClean(path.join(dir, 'a.qcow2'));
      // Delete by name and by ID, ours and qemu-img's.
      await ok(['snapshot', '-d', 's1', 'a.qcow2'], dir);
      await ok(['snapshot', '-d', '2', 'a.qcow2'], dir);
      await expectClean(path.join(dir, 'a.qcow2'));
      expect(await snapshotNames(dir, 'a.qcow2')).to.deep.equal(['3 s3']);
      await runOk('qemu-img', ['convert', '-l', 'snapshot.name=s3', '-O', 'raw', 'a.qcow2', 's3-after.raw'], { cwd: dir });
      await expectSame(dir, 's3-after.raw', 's3.raw');
      // An unknown snapshot: exit 1, one line, the image unchanged.
      const before = await md5File(path.join(dir, 'a.qcow2'));
      const bad = await tsimg(['snapshot', '-a', 'nope', 'a.qcow2'], dir);
      expect(bad.code).to.equal(1);
      expect(bad.stderr.trim().split('\n')).to.have.length(1);
      expect(await md5File(path.join(dir, 'a.qcow2'))).to.equal(before);
      await ok(['snapshot', '-d', 's3', 'a.qcow2'], dir);
      await expectClean(path.join(dir, 'a.qcow2'));
      expect(await ok(['snapshot', '-l', 'a.qcow2'], dir)).to.equal('');
    });
  }

  it('snapshot refuses a format without internal snapshots', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'snapref-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'r.raw', '1M'], { cwd: dir });
    const r = await tsimg(['snapshot', '-c', 'x', 'r.raw'], dir);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.match(/does not support internal snapshots/);
  });

  it('resize: grow, shrink only with --shrink, as qemu-img resize (qcow2 and raw)', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'resize-'));
    for (const fmt of ['qcow2', 'raw']) {
      const a = `a.${fmt}`;
      const b = `b.${fmt}`;
      await runOk('qemu-img', ['create', '-q', '-f', fmt, a, '64M'], { cwd: dir });
      await qemuIo(dir, a, 'write -P 5 0 1M', 'write -P 6 60M 4M');
      fs.copyFileSync(path.join(dir, a), path.join(dir, b));
      const before = await md5File(path.join(dir, a));
      const refused = await tsimg(['resize', a, '--', '-8M'], dir);
      expect(refused.code).to.equal(1);
      expect(refused.stderr).to.contain('--shrink');
      expect(await md5File(path.join(dir, a))).to.equal(before);
      expect(await ok(['resize', '--shrink', a, '--', '-8M'], dir)).to.equal('Image resized.\n');
      await runOk('qemu-img', ['resize', '-q', '-f', fmt, '--shrink', b, '--', '-8M'], { cwd: dir });
      await expectSame(dir, a, b);
      await ok(['resize', a, '+1G'], dir);
      await runOk('qemu-img', ['resize', '-q', '-f', fmt, b, '+1G'], { cwd: dir });
      await expectSame(dir, a, b);
      await ok(['resize', a, '2G'], dir);
      const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', a], { cwd: dir })) as { 'virtual-size': number };
      expect(info['virtual-size']).to.equal(2 * 1024 * MiB);
      if (fmt === 'qcow2') await expectClean(path.join(dir, a));
    }
  });

  it('commit writes the overlay into its backing file and empties it, as qemu-img commit', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'commit-'));
    for (const name of ['ours', 'theirs']) {
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', `${name}-base.qcow2`, '64M'], { cwd: dir });
      await qemuIo(dir, `${name}-base.qcow2`, 'write -P 7 0 8M');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `${name}-base.qcow2`, '-F', 'qcow2', `${name}.qcow2`], { cwd: dir });
      await qemuIo(dir, `${name}.qcow2`, 'write -P 8 1M 1M', 'write -z 4M 1M', 'write -P 9 30M 64k');
    }
    await runOk('qemu-img', ['convert', '-O', 'raw', 'ours.qcow2', 'expect.raw'], { cwd: dir });
    const out = await ok(['commit', '-p', 'ours.qcow2'], dir);
    expect(out).to.contain('(100.00/100%)');
    expect(out).to.contain('Image committed.');
    await runOk('qemu-img', ['commit', '-q', 'theirs.qcow2'], { cwd: dir });
    for (const f of ['ours.qcow2', 'ours-base.qcow2']) await expectClean(path.join(dir, f));
    await expectSame(dir, 'ours-base.qcow2', 'expect.raw');
    await expectSame(dir, 'ours-base.qcow2', 'theirs-base.qcow2');
    // The same layout: the zeros over base data free its clusters, as QEMU's commit (a
    // mirror job with unmap) does. Where a later allocation lands may differ (tsmount reuses
    // a freed cluster only after the flush that frees it), so offsets are compared by presence only.
    const layout = async (f: string): Promise<string> => (await runOk('qemu-img', ['map', '--output=json', f], { cwd: dir })).replace(/"offset": [0-9]+/g, '"offset": N');
    expect(await layout('ours-base.qcow2')).to.equal(await layout('theirs-base.qcow2'));
    await expectSame(dir, 'ours.qcow2', 'expect.raw');
    // The overlay holds nothing any more.
    const map = JSON.parse(await runOk('qemu-img', ['map', '--output=json', 'ours.qcow2'], { cwd: dir })) as { depth: number; present: boolean }[];
    expect(map.filter((e) => e.depth === 0 && e.present)).to.deep.equal([]);
    // Progress on a terminal without -p (script(1)'s pseudo-terminal); nothing but the result line otherwise.
    await qemuIo(dir, 'ours.qcow2', 'write -P 3 0 64k');
    const pty = await run('script', ['-qec', `${process.execPath} ${TSIMG} commit ours.qcow2`, '/dev/null'], { cwd: dir });
    expect(pty.code, pty.stderr).to.equal(0);
    expect(pty.stdout).to.contain('(100.00/100%)');
    await qemuIo(dir, 'ours.qcow2', 'write -P 4 0 64k');
    expect(await ok(['commit', 'ours.qcow2'], dir)).to.equal('Image committed.\n');
    const none = await tsimg(['commit', 'expect.raw'], dir);
    expect(none.code).to.equal(1);
    expect(none.stderr).to.contain('does not have a backing file');
  });

  it('commit empties the image as qemu-img commit does: qcow2 cut down to its tables (v3) or discarded in place (v2), qcow to its L1 table, qed kept', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'commit-empty-'));
    const layouts: { format: string; opts: string[] }[] = [
      { format: 'qcow2', opts: [] },
      { format: 'qcow2', opts: ['-o', 'compat=0.10'] },
      { format: 'qcow2', opts: ['-o', 'extended_l2=on'] },
      { format: 'qcow2', opts: ['-o', 'cluster_size=4k'] },
      { format: 'qcow', opts: [] },
      { format: 'qed', opts: [] },
    ];
    for (const l of layouts) {
      const what = `${l.format} ${l.opts.join(' ')}`;
      for (const x of ['q', 't']) {
        for (const f of [`base${x}.raw`, `o${x}.${l.format}`]) fs.rmSync(path.join(dir, f), { force: true });
        await runOk('qemu-img', ['create', '-q', '-f', 'raw', `base${x}.raw`, '64M'], { cwd: dir });
        await runOk('qemu-img', ['create', '-q', '-f', l.format, ...l.opts, '-b', `base${x}.raw`, '-F', 'raw', `o${x}.${l.format}`, '64M'], { cwd: dir });
        await runOk('qemu-io', ['-f', l.format, '-c', 'write -P 3 10M 1M', '-c', 'write -P 4 30M 5M', `o${x}.${l.format}`], { cwd: dir });
      }
      await runOk('qemu-img', ['commit', '-f', l.format, `oq.${l.format}`], { cwd: dir });
      await ok(['commit', '-f', l.format, `ot.${l.format}`], dir);
      expect(fs.readFileSync(path.join(dir, 'baset.raw')).equals(fs.readFileSync(path.join(dir, 'baseq.raw'))), what).to.equal(true);
      expect(fs.statSync(path.join(dir, `ot.${l.format}`)).size, `${what}: file size`).to.equal(fs.statSync(path.join(dir, `oq.${l.format}`)).size);
      const map = async (x: string): Promise<string> => (await runOk('qemu-img', ['map', '--output=json', '-f', l.format, `o${x}.${l.format}`], { cwd: dir })).replace(/base[qt]/g, 'base');
      expect(await map('t'), what).to.equal(await map('q'));
      if (l.format !== 'qcow') {
        const check = async (x: string): Promise<string> => (await runOk('qemu-img', ['check', '--output=json', '-f', l.format, `o${x}.${l.format}`], { cwd: dir })).replace(/"filename": "[^"]*"/, '');
        expect(await check('t'), what).to.equal(await check('q'));
      }
    }
  });

  it('rebase (safe, -u, and onto nothing) as qemu-img rebase', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'rebase-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'b1.qcow2', '64M'], { cwd: dir });
    await qemuIo(dir, 'b1.qcow2', 'write -P 1 0 8M');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'b2.qcow2', '64M'], { cwd: dir });
    await qemuIo(dir, 'b2.qcow2', 'write -P 1 0 4M', 'write -P 2 20M 1M');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'b1.qcow2', '-F', 'qcow2', 't.qcow2'], { cwd: dir });
    await qemuIo(dir, 't.qcow2', 'write -P 9 2M 1M');
    await runOk('qemu-img', ['convert', '-O', 'raw', 't.qcow2', 'expect.raw'], { cwd: dir });
    for (const f of ['t2.qcow2', 't3.qcow2', 't4.qcow2']) fs.copyFileSync(path.join(dir, 't.qcow2'), path.join(dir, f));
    await ok(['rebase', '-b', 'b2.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
    await runOk('qemu-img', ['rebase', '-b', 'b2.qcow2', '-F', 'qcow2', 't2.qcow2'], { cwd: dir });
    await expectClean(path.join(dir, 't.qcow2'));
    await expectSame(dir, 't.qcow2', 'expect.raw');
    const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', 't.qcow2'], { cwd: dir })) as Record<string, unknown>;
    expect(info['backing-filename']).to.equal('b2.qcow2');
    expect(info['backing-filename-format']).to.equal('qcow2');
    // The same clusters copied as qemu-img's.
    expect(await runOk('qemu-img', ['map', '--output=json', 't.qcow2'], { cwd: dir })).to.equal(await runOk('qemu-img', ['map', '--output=json', 't2.qcow2'], { cwd: dir }));
    // -u: the header only, as qemu-img rebase -u writes it.
    await ok(['rebase', '-u', '-b', 'b2.qcow2', '-F', 'qcow2', 't3.qcow2'], dir);
    await runOk('qemu-img', ['rebase', '-u', '-b', 'b2.qcow2', '-F', 'qcow2', 't4.qcow2'], { cwd: dir });
    expect(readBytes(path.join(dir, 't3.qcow2'), 0, 65536).equals(readBytes(path.join(dir, 't4.qcow2'), 0, 65536))).to.equal(true);
    await expectClean(path.join(dir, 't3.qcow2'));
    // Onto nothing: everything the old chain showed is copied in.
    await ok(['rebase', '-b', '', 't.qcow2'], dir);
    const none = JSON.parse(await runOk('qemu-img', ['info', '--output=json', 't.qcow2'], { cwd: dir })) as Record<string, unknown>;
    expect(none['backing-filename']).to.equal(undefined);
    await expectClean(path.join(dir, 't.qcow2'));
    await expectSame(dir, 't.qcow2', 'expect.raw');
  });

  it('rebase onto a longer backing file: past the old one\'s end, zero clusters where qemu-img writes them (v3), zeros written (v2), from no backing file too: same map and file size', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'rebase-longer-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'b1.qcow2', '4M'], { cwd: dir });
    await qemuIo(dir, 'b1.qcow2', 'write -P 1 0 4M');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'b2.qcow2', '16M'], { cwd: dir });
    await qemuIo(dir, 'b2.qcow2', 'write -P 2 0 16M');
    for (const compat of ['1.1', '0.10']) {
      for (const from of [['-b', 'b1.qcow2', '-F', 'qcow2'], []]) {
        const what = `compat ${compat}, ${from.length ? 'from a shorter backing file' : 'from none'}`;
        for (const who of ['q', 't']) {
          await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, ...from, `${who}.qcow2`, '16M'], { cwd: dir });
          await qemuIo(dir, `${who}.qcow2`, 'write -P 9 6M 64k');
        }
        await runOk('qemu-img', ['convert', '-O', 'raw', 'q.qcow2', 'expect.raw'], { cwd: dir });
        await runOk('qemu-img', ['rebase', '-b', 'b2.qcow2', '-F', 'qcow2', 'q.qcow2'], { cwd: dir });
        await ok(['rebase', '-b', 'b2.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
        await expectSame(dir, 't.qcow2', 'expect.raw');
        await expectClean(path.join(dir, 't.qcow2'));
        if (compat === '0.10' && from.length === 0) {
          // qemu-img 7.2 loses the zeros here: its write of zeros into a v2 image without a
          // backing file does nothing (they read as zeros already), so the new backing file
          // shows through. Ours keeps the disk as it was (above).
          expect((await run('qemu-img', ['compare', 'q.qcow2', 'expect.raw'], { cwd: dir })).code, 'qemu-img 7.2 changed the disk').to.equal(1);
          continue;
        }
        const map = async (x: string): Promise<string> => (await runOk('qemu-img', ['map', '--output=json', `${x}.qcow2`], { cwd: dir })).replace(/, "offset": \d+/g, '');
        expect(await map('t'), what).to.equal(await map('q'));
        expect(fs.statSync(path.join(dir, 't.qcow2')).size, what).to.equal(fs.statSync(path.join(dir, 'q.qcow2')).size);
      }
    }
  });

  it('rebase of qed as of qcow2 (safe, -u, onto nothing), -F required as qemu-img 7.2 requires it, amend never changes the backing file', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'rebase-qed-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'old.raw', '64M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 64M', 'old.raw'], { cwd: dir });
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'short.raw', '32M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 16M', 'short.raw'], { cwd: dir });
    const cases: string[][] = [['-b', 'short.raw', '-F', 'raw'], ['-u', '-b', 'other.qcow2', '-F', 'qcow2'], ['-b', ''], ['-b', 'short.raw'], ['-u', '-b', 'short.raw']];
    for (const format of ['qed', 'qcow2']) {
      for (const c of cases) {
        for (const f of [`q.${format}`, `t.${format}`]) {
          fs.rmSync(path.join(dir, f), { force: true });
          await runOk('qemu-img', ['create', '-q', '-f', format, '-b', 'old.raw', '-F', 'raw', f, '100M'], { cwd: dir });
          await runOk('qemu-io', ['-f', format, '-c', 'write -P 3 10M 1M', f], { cwd: dir });
        }
        const what = `${format} rebase ${c.join(' ')}`;
        const before = fs.readFileSync(path.join(dir, `t.${format}`));
        const q = await run('qemu-img', ['rebase', '-f', format, ...c, `q.${format}`], { cwd: dir });
        const r = await tsimg(['rebase', '-f', format, ...c, `t.${format}`], dir);
        expect(r.code, `${what}: ${r.stderr}`).to.equal(q.code);
        if (r.code !== 0) {
          // Without -F: refused before anything is copied (qemu-img copies first, then refuses).
          expect(r.stderr).to.contain('backing format must be specified');
          expect(fs.readFileSync(path.join(dir, `t.${format}`)).equals(before), what).to.equal(true);
          continue;
        }
        // The same header, the same clusters copied: the same file, byte for byte.
        expect(fs.readFileSync(path.join(dir, `t.${format}`)).equals(fs.readFileSync(path.join(dir, `q.${format}`))), what).to.equal(true);
      }
    }
    // amend: backing_file and backing_fmt only as they are (qcow2_amend_options); a change is a rebase.
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'old.raw', '-F', 'raw', 'a.qcow2', '100M'], { cwd: dir });
    for (const opts of ['backing_file=old.raw,backing_fmt=raw', 'backing_file=old.raw', 'backing_fmt=raw', 'backing_file=short.raw,backing_fmt=raw']) {
      const before = fs.readFileSync(path.join(dir, 'a.qcow2'));
      const q = await run('qemu-img', ['amend', '-o', opts, 'a.qcow2'], { cwd: dir });
      fs.writeFileSync(path.join(dir, 'a.qcow2'), before);
      const r = await tsimg(['amend', '-o', opts, 'a.qcow2'], dir);
      expect(r.code, `amend ${opts}: ${r.stderr}`).to.equal(q.code);
      if (r.code !== 0) expect(r.stderr).to.contain('Cannot amend the backing file');
      expect(fs.readFileSync(path.join(dir, 'a.qcow2')).equals(before), opts).to.equal(true);
    }
  });

  it('rebase of a sparse 16 GiB chain onto a shorter one: the disk unchanged, the same clusters copied as qemu-img\'s, holes of both chains skipped', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'rebase-sparse-'));
    const GiB = 1024 * MiB;
    const mk = async (name: string, size: string, backing?: string): Promise<void> => {
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), name, size], { cwd: dir });
    };
    // The old chain is two deep; the new backing file is half as long as the image.
    await mk('b0.qcow2', '16G');
    await qemuIo(dir, 'b0.qcow2', `write -P 5 ${9 * GiB} 1M`, `write -P 6 ${15 * GiB} 64k`);
    await mk('b1.qcow2', '16G', 'b0.qcow2');
    await qemuIo(dir, 'b1.qcow2', `write -P 1 ${GiB} 1M`, `write -P 3 ${5 * GiB + 4096} 4k`);
    await mk('b2.qcow2', '8G');
    await qemuIo(dir, 'b2.qcow2', `write -P 1 ${GiB} 1M`, `write -P 2 ${3 * GiB} 1M`, `write -P 7 ${8 * GiB - 64 * 1024} 64k`);
    await mk('t.qcow2', '16G', 'b1.qcow2');
    await qemuIo(dir, 't.qcow2', `write -P 9 ${2 * GiB} 1M`, `write -P 8 ${3 * GiB} 64k`);
    await runOk('qemu-img', ['convert', '-O', 'qcow2', 't.qcow2', 'expect.qcow2'], { cwd: dir });
    fs.copyFileSync(path.join(dir, 't.qcow2'), path.join(dir, 't2.qcow2'));
    await ok(['rebase', '-b', 'b2.qcow2', '-F', 'qcow2', 't.qcow2'], dir);
    await runOk('qemu-img', ['rebase', '-b', 'b2.qcow2', '-F', 'qcow2', 't2.qcow2'], { cwd: dir });
    await expectClean(path.join(dir, 't.qcow2'));
    await expectSame(dir, 't.qcow2', 'expect.qcow2');
    const own = async (f: string): Promise<unknown[]> =>
      (JSON.parse(await runOk('qemu-img', ['map', '--output=json', f], { cwd: dir })) as { start: number; length: number; depth: number; data: boolean }[])
        .filter((e) => e.depth === 0 && e.data)
        .map((e) => [e.start, e.length]);
    expect(await own('t.qcow2')).to.deep.equal(await own('t2.qcow2'));
  });

  it('amend -o compat=1.1,lazy_refcounts=on writes the header qemu-img amend writes', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'amend-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'a.qcow2', '64M'], { cwd: dir });
    await qemuIo(dir, 'a.qcow2', 'write -P 1 0 1M');
    fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, 'b.qcow2'));
    await ok(['amend', '-o', 'compat=1.1,lazy_refcounts=on', 'a.qcow2'], dir);
    await runOk('qemu-img', ['amend', '-o', 'compat=1.1,lazy_refcounts=on', 'b.qcow2'], { cwd: dir });
    expect(readBytes(path.join(dir, 'a.qcow2'), 0, 65536).equals(readBytes(path.join(dir, 'b.qcow2'), 0, 65536))).to.equal(true);
    await expectClean(path.join(dir, 'a.qcow2'));
    await ok(['amend', '-o', 'lazy_refcounts=off', 'a.qcow2'], dir);
    await runOk('qemu-img', ['amend', '-o', 'lazy_refcounts=off', 'b.qcow2'], { cwd: dir });
    expect(readBytes(path.join(dir, 'a.qcow2'), 0, 65536).equals(readBytes(path.join(dir, 'b.qcow2'), 0, 65536))).to.equal(true);
    const bad = await tsimg(['amend', '-o', 'cluster_size=4k', 'a.qcow2'], dir);
    expect(bad.code).to.equal(1);
    expect(bad.stderr.trim().split('\n')).to.have.length(1);
  });

  it('measure gives qemu-img measure numbers', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'measure-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'm.raw', '100M'], { cwd: dir });
    await qemuIo(dir, 'm.raw', 'write -P 1 0 3M', 'write -P 1 50M 100k');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'q.qcow2', '64M'], { cwd: dir });
    await qemuIo(dir, 'q.qcow2', 'write -P 1 0 4M', 'write -P 2 20M 1M', 'write -z 30M 1M');
    // Layouts whose data QEMU asks the file beneath for holes (BDRV_BLOCK_RECURSE): the holes are not counted.
    const holey: [string, string, string][] = [
      ['vmdk', 'subformat=monolithicFlat', 'f.vmdk'],
      ['vpc', 'subformat=fixed', 'f.vpc'],
      ['vdi', 'static=on', 's.vdi'],
      ['qcow2', 'preallocation=metadata', 'p.qcow2'],
    ];
    for (const [format, opts, name] of holey) {
      await runOk('qemu-img', ['create', '-q', '-f', format, '-o', opts, name, '64M'], { cwd: dir });
      await qemuIo(dir, name, 'write -P 1 64k 64k', 'write -P 2 1M 512k');
    }
    const cases = [
      ...holey.map(([format, , name]) => ['-f', format, '-O', 'qcow2', name]),
      ['-O', 'qcow2', 'm.raw'],
      ['-O', 'raw', 'm.raw'],
      ['-O', 'qcow2', '--size', '10G'],
      ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', '--size', '1T'],
      ['-O', 'qcow2', '-o', 'refcount_bits=1', 'q.qcow2'],
      ['-O', 'qcow2', '-o', 'preallocation=full', 'q.qcow2'],
    ];
    for (const c of cases) {
      for (const output of c.includes('preallocation=full') ? ['json', 'human'] : ['json']) {
        const theirs = await runOk('qemu-img', ['measure', '--output', output, ...c], { cwd: dir });
        expect(await ok(['measure', '--output', output, ...c], dir), c.join(' ')).to.equal(theirs);
      }
    }
  });

  it('check -r leaks|all leaves a qcow2 image qemu-img check calls clean; check finds VDI corruptions as qemu-img does', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'repair-'));
    const refcountAt = (cluster: number): number => 2 * 65536 + cluster * 2;
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'c.qcow2', '16M'], { cwd: dir });
    await qemuIo(dir, 'c.qcow2', 'write -P 1 0 1M');
    // A leak: a cluster past the data counted once (the file grown to hold it).
    fs.truncateSync(path.join(dir, 'c.qcow2'), 2 * MiB);
    const leak = path.join(dir, 'c.qcow2');
    const bad = path.join(dir, 'd.qcow2');
    fs.copyFileSync(leak, bad);
    patch(leak, refcountAt(25), Buffer.from([0, 1]));
    // A corruption: a data cluster (6: header, reftable, block, L1, L2, data from 5) counted zero times.
    patch(bad, refcountAt(6), Buffer.from([0, 0]));
    expect((await tsimg(['check', 'c.qcow2'], dir)).code).to.equal(3);
    expect((await run('qemu-img', ['check', 'c.qcow2'], { cwd: dir })).code).to.equal(3);
    const fixed = await tsimg(['check', '-r', 'leaks', 'c.qcow2'], dir);
    expect(fixed.code, fixed.stderr).to.equal(0);
    expect(fixed.stdout).to.contain('    1 leaked clusters\n    0 corruptions');
    await expectClean(leak);
    expect((await tsimg(['check', 'd.qcow2'], dir)).code).to.equal(2);
    // -r leaks leaves a corruption as it is.
    expect((await tsimg(['check', '-r', 'leaks', 'd.qcow2'], dir)).code).to.equal(2);
    expect((await run('qemu-img', ['check', 'd.qcow2'], { cwd: dir })).code).to.equal(2);
    const all = await tsimg(['check', '-r', 'all', '--output', 'json', 'd.qcow2'], dir);
    expect(all.code, all.stderr).to.equal(0);
    expect(JSON.parse(all.stdout)).to.have.property('corruptions-fixed');
    await expectClean(bad);
    await expectSame(dir, 'c.qcow2', 'd.qcow2');
    // VDI: the header's count of allocated blocks, and a block map entry out of range.
    await runOk('qemu-img', ['create', '-q', '-f', 'vdi', 'v.vdi', '16M'], { cwd: dir });
    await qemuIo(dir, 'v.vdi', 'write -P 1 0 3M');
    expect((await tsimg(['check', 'v.vdi'], dir)).code).to.equal(0);
    patch(path.join(dir, 'v.vdi'), 0x184, Buffer.from([7]));
    patch(path.join(dir, 'v.vdi'), 0x200 + 4, Buffer.from([0x40, 0, 0, 0]));
    const ours = await tsimg(['check', '--output', 'json', 'v.vdi'], dir);
    const theirs = await run('qemu-img', ['check', '--output', 'json', 'v.vdi'], { cwd: dir });
    expect(ours.code).to.equal(theirs.code);
    expect(ours.code).to.equal(2);
    expect(JSON.parse(ours.stdout)).to.deep.equal(JSON.parse(theirs.stdout));
    expect(ours.stderr).to.equal(theirs.stderr);
  });

  it('convert -B (only the differences), -n (into an existing image), -W (out of order)', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'convert-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], { cwd: dir });
    await qemuIo(dir, 'base.qcow2', 'write -P 1 0 8M');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], { cwd: dir });
    await qemuIo(dir, 'top.qcow2', 'write -P 2 1M 1M', 'write -z 5M 1M', 'write -P 3 20M 1M');
    await ok(['convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'out.qcow2'], dir);
    await runOk('qemu-img', ['convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'q.qcow2'], { cwd: dir });
    await expectClean(path.join(dir, 'out.qcow2'));
    await expectSame(dir, 'out.qcow2', 'top.qcow2');
    // The overlay holds what qemu-img's holds: the differences only.
    const own = async (f: string): Promise<unknown[]> =>
      (JSON.parse(await runOk('qemu-img', ['map', '--output=json', f], { cwd: dir })) as { depth: number; start: number; length: number; zero: boolean }[])
        .filter((e) => e.depth === 0)
        .map((e) => [e.start, e.length, e.zero]);
    expect(await own('out.qcow2')).to.deep.equal(await own('q.qcow2'));
    await ok(['convert', '-W', '-O', 'qcow2', 'top.qcow2', 'w.qcow2'], dir);
    await expectSame(dir, 'w.qcow2', 'top.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'n.raw', '64M'], { cwd: dir });
    await qemuIo(dir, 'n.raw', 'write -P 9 0 64M');
    await ok(['convert', '-n', '-O', 'raw', 'top.qcow2', 'n.raw'], dir);
    await expectSame(dir, 'n.raw', 'top.qcow2');
  });

  it('the man pages name every subcommand and render', async () => {
    const manDir = path.resolve(path.dirname(TSIMG), '../../mount-helpers/man');
    const page = fs.readFileSync(path.join(manDir, 'tsimg.1'), 'utf8');
    const help = await ok(['--help'], t.dir);
    const subcommands = [...help.matchAll(/^  ([a-z]+) /gm)].map((m) => m[1]!).filter((c) => c !== 'help');
    expect(subcommands.length).to.be.greaterThan(8);
    for (const c of subcommands) expect(page, c).to.contain(`.B ${c}`);
    for (const f of ['tsimg.1', 'tsmount.1']) {
      const r = await run('man', ['-l', path.join(manDir, f)], { env: { ...process.env, MANPAGER: 'cat', MANWIDTH: '80' } });
      if (r.code === 127 || /ENOENT/.test(r.stderr)) return; // man-db missing: setup.sh installs it
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stdout).to.contain('SYNOPSIS');
    }
  });

  it('create -o help lists the options qemu-img lists, with defaults, and creates nothing', async () => {
    const ours = await ok(['create', '-f', 'qcow2', '-o', 'help'], t.dir);
    const theirs = await runOk('qemu-img', ['create', '-f', 'qcow2', '-o', 'help'], { cwd: t.dir });
    const names = [...ours.matchAll(/^  (\S+)/gm)].map((m) => m[1]!);
    expect(names).to.include('cluster_size');
    // nocow is the file protocol's, which qemu-img lists only with a file name.
    for (const n of names.filter((x) => x !== 'nocow')) expect(theirs, n).to.match(new RegExp(`^\\s*${n.replace('.', '\\.')}=`, 'm'));
    expect(ours).to.contain('cluster_size (default: 65536)');
  });

  it('map --output svg draws one shape per run qemu-img map lists as present, one row per layer', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'svg-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'b.qcow2', '64M'], { cwd: dir });
    await qemuIo(dir, 'b.qcow2', 'write -P 1 0 8M');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 't.qcow2'], { cwd: dir });
    await qemuIo(dir, 't.qcow2', 'write -P 2 1M 1M', 'write -z 20M 4M');
    const svg = await ok(['map', '--output', 'svg', 't.qcow2'], dir);
    expect(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"')).to.equal(true);
    expect(svg.trimEnd().endsWith('</svg>')).to.equal(true);
    const theirs = JSON.parse(await runOk('qemu-img', ['map', '--output=json', 't.qcow2'], { cwd: dir })) as { present: boolean; start: number; length: number; data: boolean }[];
    const shapes = [...svg.matchAll(/<title>(\w+) (\d+)\+(\d+)<\/title>/g)].map((m) => [m[2], m[3], m[1] === 'data'].join(' '));
    expect(shapes).to.deep.equal(theirs.filter((e) => e.present).map((e) => [e.start, e.length, e.data].join(' ')));
    expect(svg).to.contain('0: t.qcow2').and.to.contain('1: b.qcow2');
    // compare -p: the progress line, then the verdict.
    const cmp = await ok(['compare', '-p', 't.qcow2', 't.qcow2'], dir);
    expect(cmp).to.contain('(100.00/100%)').and.to.contain('Images are identical.');
    expect(await ok(['compare', 't.qcow2', 't.qcow2'], dir)).to.equal('Images are identical.\n');
  });

  it('--version', async () => {
    const pkg = JSON.parse(fs.readFileSync(path.resolve(path.dirname(TSIMG), '../../package.json'), 'utf8')) as { version: string };
    expect((await ok(['--version'], t.dir)).trim()).to.equal(pkg.version);
  });
});
