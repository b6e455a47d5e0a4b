// tsimg with QEMU's ways of naming an image (--image-opts, json:, --object secret),
// over a local file, an NBD server (qemu-nbd on a unix socket) and an encrypted image;
// judged by qemu-img on the same images.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, qemuIo, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { TSIMG, tsimg } from './helpers/images.js';
import { startServer, type RunningServer } from './helpers/servers.js';

const PASS = 'correct horse';

const json = (text: string): Record<string, unknown> => JSON.parse(text) as Record<string, unknown>;

describe('tsimg --image-opts, json: and --object', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  let qcow2: string;
  let sock: string;
  let server: RunningServer | undefined;

  before(async () => {
    tmp = tempDir('tsimg-opts');
    qcow2 = path.join(tmp.dir, 'disk.qcow2');
    await createImage(qcow2, 'qcow2', '16M');
    await qemuIo(qcow2, 'qcow2', ['write -P 0x11 0 1M', 'write -z 4M 1M', 'write -P 0x22 9M 512k']);
    sock = path.join(tmp.dir, 'nbd.sock');
    // The qcow2 file's bytes served as they are: the qcow2 driver runs on our side.
    server = await startServer('qemu-nbd', ['-t', '-r', '-f', 'raw', '-x', 'vm', '-k', sock, qcow2], { path: sock });
  });
  after(async () => {
    await server?.stop();
    tmp.cleanup();
  });

  it('info --image-opts over a local file says what qemu-img info says', async () => {
    const opts = `driver=qcow2,file.driver=file,file.filename=${qcow2}`;
    const ours = await tsimg(['info', '--output', 'json', '--image-opts', opts]);
    expect(ours.stderr).to.equal('');
    const theirs = json(await runOk('qemu-img', ['info', '--output', 'json', '--image-opts', opts]));
    const o = json(ours.stdout);
    for (const k of ['virtual-size', 'format', 'cluster-size', 'dirty-flag']) expect(o[k], k).to.deep.equal(theirs[k]);
    expect(o['format-specific']).to.deep.equal(theirs['format-specific']);
    // The json: spelling of the same options, without --image-opts.
    const j = await tsimg(['info', '--output', 'json', `json:{"driver":"qcow2","file":{"driver":"file","filename":"${qcow2}"}}`]);
    expect(json(j.stdout)['virtual-size']).to.equal(theirs['virtual-size']);
    // -f must agree with the driver, as qemu-img requires; one line.
    const bad = await tsimg(['info', '-f', 'raw', '--image-opts', opts]);
    expect(bad.code).to.equal(1);
    expect(bad.stderr.trim().split('\n')).to.have.length(1);
    expect(bad.stderr).to.match(/-f raw does not match driver=qcow2/);
  });

  it('info, compare and convert of a qcow2 on an NBD server, named by --image-opts', async () => {
    const opts = `driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=${sock},file.export=vm`;
    const info = await tsimg(['info', '--output', 'json', '--image-opts', opts]);
    expect(info.stderr).to.equal('');
    const theirs = json(await runOk('qemu-img', ['info', '--output', 'json', '--image-opts', opts]));
    expect(json(info.stdout)['virtual-size']).to.equal(theirs['virtual-size']);
    expect(json(info.stdout).format).to.equal('qcow2');
    // compare: both arguments are option lists, the remote against the local file.
    const cmp = await tsimg(['compare', '--image-opts', opts, `driver=qcow2,file.filename=${qcow2}`]);
    expect(cmp.stderr).to.equal('');
    expect(cmp.code).to.equal(0);
    // convert: the source is an option list, the target a plain name.
    const out = path.join(tmp.dir, 'copy.qcow2');
    const conv = await tsimg(['convert', '-O', 'qcow2', '--image-opts', opts, out]);
    expect(conv.stderr).to.equal('');
    expect(conv.code).to.equal(0);
    expect((await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', qcow2, out])).code).to.equal(0);
  });

  it('opens encrypted images through --object secret and key-secret (luks, qcow2 with LUKS)', async () => {
    const passFile = path.join(tmp.dir, 'pass');
    fs.writeFileSync(passFile, PASS);
    const luks = path.join(tmp.dir, 'enc.luks');
    const encQcow2 = path.join(tmp.dir, 'enc.qcow2');
    const obj = ['--object', `secret,id=s0,file=${passFile}`];
    let r = await runTimingPbkdf('qemu-img', ['create', '-q', ...obj, '-f', 'luks', '-o', 'key-secret=s0,iter-time=10', luks, '4M']);
    expect(r.code, r.stderr).to.equal(0);
    r = await runTimingPbkdf('qemu-img', ['create', '-q', ...obj, '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', encQcow2, '4M']);
    expect(r.code, r.stderr).to.equal(0);
    const luksOpts = `driver=luks,key-secret=s0,file.filename=${luks}`;
    const qcowOpts = `driver=qcow2,encrypt.key-secret=s0,file.filename=${encQcow2}`;
    await runOk('qemu-io', [...obj, '--image-opts', '-c', 'write -P 0x5a 0 64k', luksOpts]);
    await runOk('qemu-io', [...obj, '--image-opts', '-c', 'write -P 0x5a 0 64k', qcowOpts]);
    for (const opts of [luksOpts, qcowOpts]) {
      const info = await tsimg(['info', '--output', 'json', ...obj, '--image-opts', opts]);
      expect(info.stderr, opts).to.equal('');
      const theirs = json(await runOk('qemu-img', ['info', '--output', 'json', ...obj, '--image-opts', opts]));
      expect(json(info.stdout)['virtual-size']).to.equal(theirs['virtual-size']);
      expect(json(info.stdout)['format-specific']).to.deep.equal(theirs['format-specific']);
      // Reading the plaintext needs the key: a convert to raw equal to qemu-img's.
      const ours = path.join(tmp.dir, 'plain-ours.raw');
      const conv = await tsimg(['convert', '-O', 'raw', ...obj, '--image-opts', opts, ours]);
      expect(conv.stderr, opts).to.equal('');
      const cmp = await run('qemu-img', ['compare', ...obj, '--image-opts', opts, `driver=raw,file.filename=${ours}`]);
      expect(cmp.code, cmp.stdout + cmp.stderr).to.equal(0);
    }
    // A wrong key is refused in one line; an unknown id too.
    const bad = await tsimg(['info', '--object', 'secret,id=s0,data=wrong', '--image-opts', luksOpts]);
    expect(bad.code).to.equal(1);
    expect(bad.stderr.trim().split('\n')).to.have.length(1);
    const none = await tsimg(['info', '--image-opts', luksOpts]);
    expect(none.stderr).to.match(/no --object secret with id 's0'/);
    // The key by key-secret and by --secret at once is refused.
    const both = await tsimg(['info', ...obj, '--secret', PASS, '--image-opts', luksOpts]);
    expect(both.stderr).to.match(/not both/);
  });

  it('creates encrypted images with the key a --object secret holds, named by key-secret, as qemu-img create and convert do; convert -n --target-image-opts', async () => {
    const dir = fs.mkdtempSync(path.join(tmp.dir, 'create-obj-'));
    const obj = ['--object', `secret,id=sec0,data=${PASS}`];
    const made: [string, string, string][] = [
      ['luks', 'key-secret=sec0,iter-time=10', 'driver=luks,key-secret=sec0,file.filename='],
      ['qcow2', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', 'driver=qcow2,encrypt.key-secret=sec0,file.filename='],
      ['qcow2', 'encrypt.format=aes,encrypt.key-secret=sec0', 'driver=qcow2,encrypt.key-secret=sec0,file.filename='],
      ['qcow', 'encrypt.format=aes,encrypt.key-secret=sec0', 'driver=qcow,encrypt.key-secret=sec0,file.filename='],
    ];
    const src = path.join(dir, 'src.raw');
    fs.writeFileSync(src, Buffer.alloc(1 << 20, 0x3e));
    for (const [i, [format, opts, imageOpts]] of made.entries()) {
      // create: qemu-io writes with the same object and reads it back.
      const img = path.join(dir, `c${i}.${format}`);
      const r = await runTimingPbkdf(process.execPath, [TSIMG, 'create', '-q', ...obj, '-f', format, '-o', opts, img, '1M']);
      expect(r.code, r.stderr).to.equal(0);
      await runOk('qemu-io', [...obj, '--image-opts', '-c', 'write -P 0x5c 0 64k', '-c', 'read -P 0x5c 0 64k', imageOpts + img]);
      // convert: the new image's key is the object's, not its id.
      const out = path.join(dir, `v${i}.${format}`);
      const c = await runTimingPbkdf(process.execPath, [TSIMG, 'convert', ...obj, '-O', format, '-o', opts, src, out]);
      expect(c.code, c.stderr).to.equal(0);
      const cmp = await run('qemu-img', ['compare', ...obj, '--image-opts', `driver=raw,file.filename=${src}`, imageOpts + out]);
      expect(cmp.code, `${format} ${opts}: ${cmp.stdout}${cmp.stderr}`).to.equal(0);
    }
    // An id no --object gives: qemu-img's words, and nothing left behind; a key given twice: refused.
    for (const args of [
      ['create', '--object', 'secret,id=other,data=x', '-f', 'luks', '-o', 'key-secret=sec0', 'bad.luks', '1M'],
      ['convert', '--object', 'secret,id=other,data=x', '-O', 'luks', '-o', 'key-secret=sec0', src, 'bad.luks'],
      ['create', ...obj, '--secret', PASS, '-f', 'qcow2', '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', 'bad.qcow2', '1M'],
    ]) {
      const r = await tsimg(args, dir);
      expect(r.code, args.join(' ')).to.equal(1);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.match(args.includes('--secret') ? /not both/ : /No secret with id 'sec0'/);
      expect(fs.existsSync(path.join(dir, 'bad.luks')) || fs.existsSync(path.join(dir, 'bad.qcow2'))).to.equal(false);
    }
    // convert -n --target-image-opts: an existing encrypted target named by its options.
    const target = path.join(dir, 'target.luks');
    const mk = await runTimingPbkdf('qemu-img', ['create', '-q', ...obj, '-f', 'luks', '-o', 'key-secret=sec0,iter-time=10', target, '1M']);
    expect(mk.code, mk.stderr).to.equal(0);
    const targetOpts = `driver=luks,key-secret=sec0,file.filename=${target}`;
    const n = await tsimg(['convert', '-n', '--target-image-opts', ...obj, src, targetOpts]);
    expect(n.code, n.stderr).to.equal(0);
    const same = await run('qemu-img', ['compare', ...obj, '--image-opts', `driver=raw,file.filename=${src}`, targetOpts]);
    expect(same.code, same.stdout + same.stderr).to.equal(0);
    // qemu-img's refusals, in its words: without -n, with -O.
    for (const args of [
      ['--target-image-opts', src, targetOpts],
      ['-n', '-O', 'luks', '--target-image-opts', src, targetOpts],
    ]) {
      const q = await run('qemu-img', ['convert', ...obj, ...args]);
      const t = await tsimg(['convert', ...obj, ...args]);
      expect([q.code, t.code], args.join(' ')).to.deep.equal([1, 1]);
      expect(t.stderr.replace(/^tsimg:/, 'qemu-img:'), args.join(' ')).to.equal(q.stderr);
    }
    // Without any --object, key-secret is the passphrase itself (tsimg's shorthand), for qcow2 too.
    const short = path.join(dir, 'short.qcow2');
    const s = await tsimg(['create', '-f', 'qcow2', '-o', `encrypt.format=luks,encrypt.key-secret=${PASS},encrypt.iter-time=10`, short, '1M']);
    expect(s.code, s.stderr).to.equal(0);
    // The passphrase itself is not printed (an id given with --object is, as qemu-img prints it).
    expect(s.stdout).to.not.contain(PASS);
    expect(s.stdout).to.contain('encrypt.key-secret=***');
    await runOk('qemu-io', [...obj, '--image-opts', '-c', 'read -P 0 0 64k', `driver=qcow2,encrypt.key-secret=sec0,file.filename=${short}`]);
  });
});

describe('tsimg measure: the bitmaps field', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('tsimg-measure')));
  after(() => tmp.cleanup());

  it('says what qemu-img measure says of qcow2 sources with and without persistent bitmaps, for each target', async () => {
    const withBitmaps = path.join(tmp.dir, 'bm.qcow2');
    await createImage(withBitmaps, 'qcow2', '1000M');
    await qemuIo(withBitmaps, 'qcow2', ['write -P 1 0 1M', 'write -P 2 700M 64k']);
    // Granularities and names that change the size: 512 bytes (many clusters), a long UTF-8 name, a disabled bitmap.
    await runOk('qemu-img', ['bitmap', '--add', '-g', '512', withBitmaps, 'fine']);
    await runOk('qemu-img', ['bitmap', '--add', withBitmaps, 'n\u00e4me-with-a-much-longer-name-than-usual-0123456789']);
    await runOk('qemu-img', ['bitmap', '--add', '--disable', '-g', '2M', withBitmaps, 'off']);
    const plain = path.join(tmp.dir, 'plain.qcow2');
    await createImage(plain, 'qcow2', '64M');
    const v2 = path.join(tmp.dir, 'v2.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '64M']);
    const raw = path.join(tmp.dir, 'r.raw');
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', raw, '64M']);
    for (const img of [withBitmaps, plain, v2, raw]) {
      for (const o of [[], ['-o', 'cluster_size=4k'], ['-o', 'cluster_size=2M'], ['-o', 'compat=0.10']]) {
        const args = ['measure', '--output', 'json', '-O', 'qcow2', ...o, img];
        const theirs = json(await runOk('qemu-img', args));
        const ours = await tsimg(args);
        expect(ours.stderr).to.equal('');
        // Key order too: scripts may print the JSON as it is.
        expect(ours.stdout, args.join(' ')).to.equal(`${JSON.stringify(theirs, null, 4)}\n`);
      }
    }
    // info lists the same bitmaps (names, granularities, flags) in format-specific.
    const info = json((await tsimg(['info', '--output', 'json', withBitmaps])).stdout);
    expect(info['format-specific']).to.deep.equal(json(await runOk('qemu-img', ['info', '--output', 'json', withBitmaps]))['format-specific']);
    // The human form's line, as qemu-img prints it.
    const human = await tsimg(['measure', '-O', 'qcow2', withBitmaps]);
    expect(human.stdout).to.equal(await runOk('qemu-img', ['measure', '-O', 'qcow2', withBitmaps]));
  });
});

describe('tsimg amend -o compat=0.10: the downgrade', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('tsimg-downgrade')));
  after(() => tmp.cleanup());

  const info = async (file: string): Promise<Record<string, unknown>> => json(await runOk('qemu-img', ['info', '--output', 'json', file]));
  const compat = async (file: string): Promise<unknown> => ((await info(file))['format-specific'] as { data: { compat: string } }).data.compat;
  const clean = async (file: string): Promise<void> => {
    const r = await run('qemu-img', ['check', file]);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    expect(r.stdout).to.match(/No errors were found/);
  };
  // Data, plain zero clusters, a preallocated zero cluster, zeros over data, unmapped zeros.
  const fill = (file: string): Promise<void> => qemuIo(file, 'qcow2', ['write -P 1 0 1M', 'write -z 2M 1M', 'write -P 2 4M 64k', 'write -z 4M 64k', 'write -P 3 6M 128k', 'write -z -u 6M 64k']);

  it('downgrades a v3 image with zero clusters: compat 0.10, clean, the same disk; the same header and map as qemu-img amend; and back to 1.1', async () => {
    const ours = path.join(tmp.dir, 'ours.qcow2');
    const theirs = path.join(tmp.dir, 'theirs.qcow2');
    await createImage(ours, 'qcow2', '20M');
    await fill(ours);
    fs.copyFileSync(ours, theirs);
    const before = path.join(tmp.dir, 'before.raw');
    await runOk('qemu-img', ['convert', '-O', 'raw', ours, before]);
    const r = await tsimg(['amend', '-o', 'compat=0.10', ours]);
    expect(r.stderr).to.equal('');
    expect(r.code).to.equal(0);
    expect(await compat(ours)).to.equal('0.10');
    await clean(ours);
    expect((await run('qemu-img', ['compare', before, ours])).code).to.equal(0);
    await runOk('qemu-img', ['amend', '-o', 'compat=0.10', theirs]);
    expect(fs.readFileSync(ours).subarray(0, 65536).equals(fs.readFileSync(theirs).subarray(0, 65536))).to.equal(true);
    expect(await runOk('qemu-img', ['map', '--output', 'json', ours])).to.equal(await runOk('qemu-img', ['map', '--output', 'json', theirs]));
    // And up again.
    const up = await tsimg(['amend', '-o', 'compat=1.1', ours]);
    expect(up.stderr).to.equal('');
    expect(await compat(ours)).to.equal('1.1');
    await clean(ours);
    expect((await run('qemu-img', ['compare', before, ours])).code).to.equal(0);
  });

  it('over a backing file, with a snapshot sharing tables: zero clusters become written zeros in every table, COPIED right', async () => {
    const base = path.join(tmp.dir, 'base.qcow2');
    await createImage(base, 'qcow2', '20M');
    await qemuIo(base, 'qcow2', ['write -P 9 0 20M']);
    const top = path.join(tmp.dir, 'top.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '20M']);
    await fill(top);
    await runOk('qemu-img', ['snapshot', '-c', 's1', top]);
    await qemuIo(top, 'qcow2', ['write -z 8M 64k']);
    const before = path.join(tmp.dir, 'top-before.raw');
    const beforeSnap = path.join(tmp.dir, 'snap-before.raw');
    await runOk('qemu-img', ['convert', '-O', 'raw', top, before]);
    await runOk('qemu-img', ['convert', '-O', 'raw', '-l', 'snapshot.name=s1', top, beforeSnap]);
    const r = await tsimg(['amend', '-o', 'compat=0.10', top]);
    expect(r.stderr).to.equal('');
    expect(await compat(top)).to.equal('0.10');
    // qemu-img 7.2 leaves OFLAG_COPIED errors here (a preallocated zero cluster the snapshot shares); ours is clean.
    await clean(top);
    expect((await run('qemu-img', ['compare', before, top])).code).to.equal(0);
    const snapAfter = path.join(tmp.dir, 'snap-after.raw');
    await runOk('qemu-img', ['convert', '-O', 'raw', '-l', 'snapshot.name=s1', top, snapAfter]);
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', beforeSnap, snapAfter])).code).to.equal(0);
    expect((await tsimg(['amend', '-o', 'compat=1.1', top])).code).to.equal(0);
    await clean(top);
  });

  it('refuses what v2 cannot hold, in one line, leaving the image as it was', async () => {
    const cases: [string, string[], string[], RegExp][] = [
      ['rc8', ['-o', 'refcount_bits=8'], [], /compat=0.10 requires refcount_bits=16/],
      ['zstd', ['-o', 'compression_type=zstd'], ['write -c -P 1 0 64k'], /zstd compression type and existing compressed clusters/],
      ['extl2', ['-o', 'extended_l2=on'], ['write -z 0 64k'], /incompatible features 0x10 set/],
      ['datafile', ['-o', 'data_file=datafile.raw'], [], /with a data file/],
      ['lazy', [], [], /Lazy refcounts only supported/],
    ];
    for (const [name, opts, io, msg] of cases) {
      const file = path.join(tmp.dir, `${name}.qcow2`);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, file, '4M'], { cwd: tmp.dir });
      if (io.length) await qemuIo(file, 'qcow2', io);
      const bytes = fs.readFileSync(file);
      const r = await tsimg(['amend', '-o', name === 'lazy' ? 'compat=0.10,lazy_refcounts=on' : 'compat=0.10', file]);
      expect(r.code, name).to.equal(1);
      expect(r.stderr.trim().split('\n'), name).to.have.length(1);
      expect(r.stderr, name).to.match(msg);
      expect(fs.readFileSync(file).equals(bytes), name).to.equal(true);
    }
    // A snapshot taken at another size, and persistent bitmaps (qemu-img 7.2 downgrades those and leaks their clusters).
    const snap = path.join(tmp.dir, 'snap.qcow2');
    await createImage(snap, 'qcow2', '4M');
    await runOk('qemu-img', ['snapshot', '-c', 's', snap]);
    await runOk('qemu-img', ['resize', '-q', snap, '8M']);
    expect((await tsimg(['amend', '-o', 'compat=0.10', snap])).stderr).to.match(/Internal snapshots prevent downgrade/);
    const bm = path.join(tmp.dir, 'bm.qcow2');
    await createImage(bm, 'qcow2', '4M');
    await runOk('qemu-img', ['bitmap', '--add', bm, 'b0']);
    const bytes = fs.readFileSync(bm);
    expect((await tsimg(['amend', '-o', 'compat=0.10', bm])).stderr).to.match(/persistent bitmaps/);
    expect(fs.readFileSync(bm).equals(bytes)).to.equal(true);
  });
});

describe('tsimg map: past the end and zeros, field by field against qemu-img map', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('tsimg-map')));
  after(() => tmp.cleanup());

  const same = async (args: string[]): Promise<void> => {
    const theirs = await runOk('qemu-img', ['map', '--output', 'json', ...args]);
    const ours = await tsimg(['map', '--output', 'json', ...args]);
    expect(ours.stderr, args.join(' ')).to.equal('');
    // The same text: every entry, every field, in qemu-img's order and layout.
    expect(ours.stdout, args.join(' ')).to.equal(theirs);
    // And the human form (data runs with their file and offset).
    const human = await run('qemu-img', ['map', ...args]);
    const oursHuman = await tsimg(['map', ...args]);
    if (human.code === 0) expect(oursHuman.stdout, args.join(' ')).to.equal(human.stdout);
    else expect(oursHuman.code).to.equal(1);
  };

  it('a qcow2 over shorter backing files (raw of an odd size, qcow2), a raw file, a sparse raw file of an odd size', async () => {
    const d = tmp.dir;
    // A raw backing file of 3000000 bytes (not a cluster multiple) with data inside and at its last bytes.
    const rawBase = path.join(d, 'base.raw');
    fs.writeFileSync(rawBase, Buffer.alloc(0));
    fs.truncateSync(rawBase, 3_000_000);
    const fd = fs.openSync(rawBase, 'r+');
    fs.writeSync(fd, Buffer.alloc(80 * 1024, 0x5a), 0, 80 * 1024, 40 * 1024);
    fs.writeSync(fd, Buffer.from('end'), 0, 3, 2_999_990);
    fs.closeSync(fd);
    const overRaw = path.join(d, 'over-raw.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', rawBase, '-F', 'raw', overRaw, '10000000']);
    await qemuIo(overRaw, 'qcow2', ['write -P 2 1M 64k', 'write -z 5M 64k']);
    await same([overRaw]);
    // 4 KiB clusters: compressed, unmapped zeros, data across the backing file's end.
    const small = path.join(d, 'small-clusters.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', rawBase, '-F', 'raw', small, '8M']);
    await qemuIo(small, 'qcow2', ['write -c -P 7 0 64k', 'write -z -u 2M 64k', 'write -P 1 2990080 8k']);
    await same([small]);
    // Three layers, each longer than the one below, zero clusters over data.
    const b3 = path.join(d, 'b3.qcow2');
    await createImage(b3, 'qcow2', '2M');
    await qemuIo(b3, 'qcow2', ['write -P 1 0 2M']);
    const m3 = path.join(d, 'm3.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', b3, '-F', 'qcow2', m3, '4M']);
    await qemuIo(m3, 'qcow2', ['write -z 1M 64k', 'write -P 3 3M 64k']);
    const t3 = path.join(d, 't3.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', m3, '-F', 'qcow2', t3, '6M']);
    await qemuIo(t3, 'qcow2', ['write -P 4 0 64k', 'write -z 2M 64k']);
    await same([t3]);
    // An overlay shorter than its backing file.
    const shortTop = path.join(d, 'short.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', rawBase, '-F', 'raw', shortTop, '1000000']);
    await same([shortTop]);
    // Raw: fully written, and sparse with data, written zeros and an odd size.
    const plain = path.join(d, 'plain.raw');
    fs.writeFileSync(plain, Buffer.alloc(3 << 20, 0x11));
    await same(['-f', 'raw', plain]);
    const sparse = path.join(d, 'sparse.raw');
    fs.writeFileSync(sparse, Buffer.alloc(0));
    fs.truncateSync(sparse, 100 * 1024 * 1024 + 1);
    const sfd = fs.openSync(sparse, 'r+');
    fs.writeSync(sfd, Buffer.alloc(192 * 1024, 0x33), 0, 192 * 1024, 6_553_600);
    fs.writeSync(sfd, Buffer.alloc(192 * 1024, 0), 0, 192 * 1024, 19_660_800);
    fs.writeSync(sfd, Buffer.from('abc'), 0, 3, 50 * 1024 * 1024 + 7);
    fs.writeSync(sfd, Buffer.from('z'), 0, 1, 100 * 1024 * 1024);
    fs.closeSync(sfd);
    await same(['-f', 'raw', sparse]);
  });

  it('preallocated zero clusters keep their offset; metadata preallocation: data clusters the file holds as holes read as zeros', async () => {
    const d = tmp.dir;
    const za = path.join(d, 'zero-alloc.qcow2');
    await createImage(za, 'qcow2', '12M');
    await qemuIo(za, 'qcow2', ['write -P 2 4M 64k', 'write -z 4M 64k', 'write -P 4 8M 192k', 'write -z 8M 192k', 'write -z -u 10M 64k']);
    await same([za]);
    // QEMU asks the file under a metadata-preallocated image (qcow2_detect_metadata_preallocation).
    const cases: [string, string][] = [['pm.qcow2', 'preallocation=metadata'], ['pm4k.qcow2', 'preallocation=metadata,cluster_size=4k'], ['pf.qcow2', 'preallocation=falloc']];
    for (const [name, opts] of cases) {
      const f = path.join(d, name);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, f, '5M']);
      await qemuIo(f, 'qcow2', ['write -P 1 0 64k', 'write -P 2 1M 4k', 'write -z 2M 64k']);
      await same([f]);
    }
  });
});
