// Bad input at the command line (issue 3, "Bad input"): one line on stderr naming the
// file and the problem, a non-zero exit, no stack trace, no hang, no mount or server
// left behind, and the image bytes exactly as they were, read-only and with --rw.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, imageInfo, md5File, qemuIo, rawMd5, run, runOk, tempDir } from './helpers/qemu.js';
import { fuseMountsUnder, isAlive, mountedPid, MountTracker, TSMOUNT, tsmount, tsmountProcesses, waitFor } from './helpers/mount.js';
import { firstL2Offset, patch, readBytes, u32be, u64be } from './helpers/images.js';

const MiB = 1 << 20;
/** A refusal must come well inside this; tsmount itself is killed at TIMEOUT_MS. */
const BOUND_MS = 20_000;
const TIMEOUT_MS = 30_000;


describe('tsmount: bad input gets a one-line error and changes nothing', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let dir: string;
  let mp: string;
  let good: string;
  let raw: string;

  const at = (name: string): string => path.join(dir, name);

  before(async () => {
    tmp = tempDir('cli-errors');
    dir = tmp.dir;
    mp = at('mnt');
    fs.mkdirSync(mp);
    mounts.track(mp);
    good = at('good.qcow2');
    await createImage(good, 'qcow2', 16 * MiB);
    await qemuIo(good, 'qcow2', ['write -P 0x11 0 128k']);
    raw = at('plain.raw');
    fs.writeFileSync(raw, Buffer.alloc(MiB, 0x5a));
  });
  afterEach(async () => {
    await mounts.cleanup();
    // A server a failed test left running holds locks that would confuse the next one.
    for (const pid of tsmountProcesses(dir)) process.kill(pid, 'SIGKILL');
  });
  after(() => tmp.cleanup());

  /** A copy of the good qcow2 image, changed by `damage`. */
  function damaged(name: string, damage: (file: string) => void): string {
    const f = at(name);
    fs.copyFileSync(good, f);
    damage(f);
    return f;
  }

  interface Refusal {
    /** The command line, mountpoint last. */
    args: string[];
    /** What the one line must say: the file it is about and the problem. */
    says: RegExp[];
  }

  /**
   * Runs tsmount and checks everything a refusal promises. Every argument that is a
   * regular file (images, a file mountpoint) must keep its bytes.
   */
  async function expectRefused(r: Refusal): Promise<string> {
    const files = r.args.filter((a) => !a.startsWith('-') && fs.existsSync(a) && fs.statSync(a).isFile());
    const before = await Promise.all(files.map((f) => md5File(f)));
    const t0 = Date.now();
    const res = await tsmount(r.args, { cwd: dir, timeoutMs: TIMEOUT_MS });
    const took = Date.now() - t0;
    const what = `tsmount ${r.args.map((a) => (path.isAbsolute(a) ? path.relative(dir, a) : a)).join(' ')}`;
    expect(took, `${what} took ${took} ms`).to.be.below(BOUND_MS);
    expect(res.code, `${what}: exit status`).to.not.equal(0);
    const err = res.stderr.replace(/\n$/, '');
    expect(err.split('\n'), `${what}: one line on stderr, got:\n${res.stderr}`).to.have.length(1);
    expect(err, what).to.match(/^tsmount: /);
    expect(err, `${what}: no stack trace`).to.not.match(/\bat .*:\d+:\d+|Error:|TypeError|node:internal/);
    for (const re of r.says) expect(err, what).to.match(re);
    expect(res.stdout, `${what}: stdout`).to.equal('');
    // Nothing mounted, no server left (it may take a moment to exit after saying why).
    expect(fuseMountsUnder(dir), `${what}: mounts`).to.deep.equal([]);
    expect(mountedPid(mp)).to.equal(undefined);
    await waitFor(() => tsmountProcesses(dir).length === 0, 5000, `${what}: its server to exit`).catch(() => {
      throw new Error(`${what}: tsmount processes left: ${tsmountProcesses(dir).join(' ')}`);
    });
    const after = await Promise.all(files.map((f) => md5File(f)));
    expect(after, `${what}: image bytes`).to.deep.equal(before);
    return err;
  }

  /** The same refusal read-only and with --rw. */
  async function expectRefusedBothWays(args: string[], says: RegExp[]): Promise<void> {
    await expectRefused({ args, says });
    await expectRefused({ args: ['--rw', ...args], says });
  }

  const quote = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  /** The file named either as given or by its absolute path. */
  const names = (file: string): RegExp => new RegExp(`(^|[\\s'(/])${quote(path.basename(file))}\\b`);

  describe('images that cannot be opened', function () {
    it('a missing file', async () => {
      await expectRefusedBothWays([at('missing.qcow2'), mp], [names('missing.qcow2'), /no such file/i]);
    });

    it('a directory given as the image', async () => {
      const d = at('a-directory');
      fs.mkdirSync(d);
      await expectRefusedBothWays([d, mp], [names(d), /directory/i]);
    });

    it('an empty file', async () => {
      const f = at('empty.img');
      fs.writeFileSync(f, '');
      await expectRefusedBothWays([f, mp], [names(f), /empty/i]);
      await expectRefusedBothWays(['-f', 'qcow2', f, mp], [names(f), /empty|not a qcow2/i]);
    });

    for (const length of [40, 100]) {
      it(`a qcow2 header cut to ${length} bytes`, async () => {
        const f = damaged(`cut${length}.qcow2`, (x) => fs.truncateSync(x, length));
        await expectRefusedBothWays([f, mp], [names(f), /too short|truncated/i]);
        await expectRefusedBothWays(['-f', 'qcow2', f, mp], [names(f), /too short|truncated/i]);
      });
    }
  });

  describe('corrupt qcow2 headers', function () {
    const cases: { what: string; offset: number; bytes: Buffer; says: RegExp }[] = [
      { what: 'cluster_bits 31', offset: 20, bytes: u32be(31), says: /cluster_bits 31/ },
      { what: 'cluster_bits 8', offset: 20, bytes: u32be(8), says: /cluster_bits 8/ },
      { what: 'an L1 table of 2^28 entries', offset: 36, bytes: u32be(0x10000000), says: /L1 table/ },
      { what: 'an L1 table offset past the end of the file', offset: 40, bytes: u64be(1n << 40n), says: /L1 table.*(outside|past|beyond)/ },
      { what: 'version 4', offset: 4, bytes: u32be(4), says: /version 4/ },
      { what: 'a refcount table of 2^31 clusters', offset: 56, bytes: u32be(0x80000000), says: /refcount table/ },
      { what: 'a virtual size of 2^62', offset: 24, bytes: u64be(1n << 62n), says: /size|L1 table/ },
    ];
    for (const c of cases) {
      it(`a header with ${c.what}`, async () => {
        const f = damaged(`hdr-${c.offset}-${c.bytes.toString('hex')}.qcow2`, (x) => patch(x, c.offset, c.bytes));
        await expectRefusedBothWays([f, mp], [names(f), c.says]);
      });
    }
  });

  describe('formats', function () {
    it('an unknown -f', async () => {
      await expectRefusedBothWays(['-f', 'nosuchformat', good, mp], [/nosuchformat/, /unknown format/i, names(good)]);
    });

    it('-f qcow2 on a raw file', async () => {
      await expectRefusedBothWays(['-f', 'qcow2', raw, mp], [names(raw), /not a qcow2 image/i]);
    });

    // Other engineers add these drivers: an image must either be read exactly as
    // qemu-img reads it, or be refused by name. Never served as the raw container.
    for (const fmt of ['qed', 'vdi']) {
      it(`a ${fmt} image made by qemu-img is read as ${fmt} or refused, never served as raw`, async () => {
        const f = at(`other.${fmt}`);
        await createImage(f, fmt, 8 * MiB);
        await qemuIo(f, fmt, ['write -P 0x42 1M 64k']);
        const before = await md5File(f);
        const res = await tsmount([f, mp], { timeoutMs: TIMEOUT_MS });
        if (res.code === 0) {
          const flat = path.join(mp, `other.raw`);
          try {
            expect(fs.statSync(flat).size).to.equal((await imageInfo(f, fmt))['virtual-size']);
            expect(await md5File(flat)).to.equal(await rawMd5(f, fmt));
          } finally {
            await mounts.unmount(mp);
          }
          expect(await md5File(f)).to.equal(before);
          return;
        }
        await expectRefusedBothWays([f, mp], [names(f), new RegExp(fmt)]);
      });
    }
  });

  describe('backing files', function () {
    it('a missing backing file, named in the message', async () => {
      const f = at('orphan.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone-base.qcow2', '-F', 'qcow2', f, '16M']);
      await expectRefusedBothWays([f, mp], [/gone-base\.qcow2/, /not found|no such file/i]);
    });

    it('a missing backing file under an image with a persistent bitmap: --rw clears no autoclear bit', async () => {
      // Opening read-write clears the bitmaps bit; a refused open must not get that far.
      const base = at('bm-base.qcow2');
      const f = at('bm.qcow2');
      await createImage(base, 'qcow2', 16 * MiB);
      await createImage(f, 'qcow2', 16 * MiB, {}, { file: 'bm-base.qcow2', format: 'qcow2' });
      await runOk('qemu-img', ['bitmap', '--add', f, 'b0']);
      fs.rmSync(base);
      await expectRefusedBothWays([f, mp], [/bm-base\.qcow2/, /not found|no such file/i]);
    });

    it('a missing backing file under an image left dirty (lazy refcounts): --rw repairs nothing before refusing', async () => {
      const base = at('dirty-base.qcow2');
      const f = at('dirty.qcow2');
      await createImage(base, 'qcow2', 16 * MiB);
      await createImage(f, 'qcow2', 16 * MiB, { lazy_refcounts: 'on' }, { file: 'dirty-base.qcow2', format: 'qcow2' });
      // qemu-io's abort leaves the dirty bit set and the refcounts stale.
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 64k', '-c', 'abort', f], { cwd: dir });
      expect(readBytes(f, 72, 8).readBigUInt64BE(0) & 1n, 'dirty bit').to.equal(1n);
      fs.rmSync(base);
      await expectRefused({ args: [f, mp], says: [/dirty-base\.qcow2/, /not found|no such file/i] });
      // Refused for the backing file, or for the dirty bit itself: either way, unchanged.
      await expectRefused({ args: ['--rw', f, mp], says: [/dirty-base\.qcow2.*(not found|no such file)|dirty|not closed cleanly/i] });
    });

    it('a backing chain that loops: a.qcow2 -> b.qcow2 -> a.qcow2', async () => {
      const a = at('loop-a.qcow2');
      const b = at('loop-b.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', a, '16M']);
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', b, '16M']);
      await expectRefusedBothWays([a, mp], [/loop-[ab]\.qcow2/, /loop/i]);
    });

    it('an image that is its own backing file', async () => {
      const f = at('self.qcow2');
      await createImage(f, 'qcow2', 16 * MiB);
      // qemu-img refuses to make one; write the backing name into the header cluster.
      const name = Buffer.from('self.qcow2');
      patch(f, 1024, name);
      patch(f, 8, Buffer.concat([u64be(1024n), u32be(name.length)]));
      await expectRefusedBothWays([f, mp], [/self\.qcow2/, /loop/i]);
    });
  });

  describe('mountpoints and options', function () {
    it('a missing mountpoint', async () => {
      await expectRefusedBothWays([good, at('no-such-dir')], [names('no-such-dir'), /does not exist|no such/i]);
    });

    it('a regular-file mountpoint with two images', async () => {
      const target = at('target.raw');
      fs.writeFileSync(target, 'placeholder');
      await expectRefusedBothWays([good, raw, target], [names(target), /one image/i]);
      expect(fs.readFileSync(target, 'utf8')).to.equal('placeholder');
    });

    it('two images with the same stem', async () => {
      const sub = at('other-dir');
      fs.mkdirSync(sub, { recursive: true });
      const twin = path.join(sub, 'good.raw');
      fs.writeFileSync(twin, Buffer.alloc(MiB));
      await expectRefusedBothWays([good, twin, mp], [/good\.raw/, /both/i]);
    });

    it('--force-share with --rw', async () => {
      await expectRefused({ args: ['--force-share', '--rw', good, mp], says: [/force-share/, /read-only|--rw/] });
      await expectRefused({ args: ['-U', '--rw', good, mp], says: [/force-share/] });
    });

    for (const size of ['lots', '0', '1K', '-1M', '1e999', '99999999999999999999G']) {
      it(`--cache-size=${size}`, async () => {
        await expectRefused({ args: [`--cache-size=${size}`, good, mp], says: [/--cache-size/] });
      });
    }

    it('an unknown option', async () => {
      await expectRefused({ args: ['--no-such-option', good, mp], says: [/no-such-option/] });
    });
  });

  describe('corruption found while reading', function () {
    it('fails that read with EIO, logs why, and keeps serving the rest', async () => {
      const f = at('l2-past-eof.qcow2');
      await createImage(f, 'qcow2', 16 * MiB, { cluster_size: 65536 });
      await qemuIo(f, 'qcow2', ['write -P 0x21 0 64k', 'write -P 0x22 8M 64k']);
      // Guest cluster 0 now points 1 TiB into a file of a few hundred KiB.
      patch(f, firstL2Offset(f), u64be((1n << 63n) | (1n << 40n)));
      const before = await md5File(f);
      const log = at('server.log');
      for (const rw of [false, true]) {
        fs.writeFileSync(log, '');
        await mounts.mount([...(rw ? ['--rw'] : []), '--log', log, f, mp]);
        const pid = mountedPid(mp)!;
        const flat = path.join(mp, 'l2-past-eof.raw');
        const bad = await run('dd', [`if=${flat}`, 'of=/dev/null', 'bs=4096', 'count=1', 'status=none'], { timeoutMs: TIMEOUT_MS });
        expect(bad.code).to.not.equal(0);
        expect(bad.stderr).to.match(/Input\/output error/);
        if (rw) {
          const w = await run('dd', ['if=/dev/zero', `of=${flat}`, 'bs=512', 'count=1', 'seek=3', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: TIMEOUT_MS });
          expect(w.code).to.not.equal(0);
          expect(w.stderr).to.match(/Input\/output error/);
        }
        // Far from the bad cluster, so no readahead window takes it in.
        const out = at('read-8M.bin');
        const good8M = await run('dd', [`if=${flat}`, `of=${out}`, 'bs=65536', 'skip=128', 'count=1', 'status=none'], { timeoutMs: TIMEOUT_MS });
        expect(good8M.code, good8M.stderr).to.equal(0);
        expect(fs.readFileSync(out).equals(Buffer.alloc(65536, 0x22))).to.equal(true);
        expect(isAlive(pid)).to.equal(true);
        expect(mountedPid(mp)).to.equal(pid);
        await mounts.unmount(mp);
        const logged = fs.readFileSync(log, 'utf8');
        expect(logged).to.match(/l2-past-eof\.qcow2/);
        expect(logged).to.match(/past the end of the file/);
      }
      expect(await md5File(f)).to.equal(before);
    });
  });
});

describe('tsmount --help', function () {
  it('names every format and source tsmount opens, both forms, the -o values, and examples', async () => {
    const { formatDrivers } = await import('../drivers/format/index.js');
    const { FORMATS_RO, FORMATS_RW } = await import('../mount-helpers/help.js');
    const r = await tsmount(['--help']);
    expect(r.code).to.equal(0);
    const help = r.stdout;
    // Every registered format is listed, once, read-write or read-only.
    expect([...FORMATS_RW, ...FORMATS_RO].sort()).to.deep.equal([...formatDrivers.keys()].sort());
    for (const f of formatDrivers.keys()) expect(help).to.match(new RegExp(`\\b${f}\\b`));
    for (const source of ['/dev/', 'nvme://', 'fat:', 'nbd://', 'nbd+unix://', 'nbd:HOST', 'nbds://', 'ssh://', 'iscsi://', 'gluster', 'sheepdog', 'json:{', '--image-opts']) expect(help).to.contain(source);
    expect(help).to.contain('tsmount IMAGE FILE');
    for (const o of ['allow_other', 'uid=N', 'umask=M', 'max_write=N', 'growable', 'cache=', 'partitions']) expect(help).to.contain(o);
    expect(help).to.contain('Examples:');
    // Each -o key the rewriter or the FUSE layer accepts is one the help names.
    const probe = ['ro', 'rw', 'noatime', 'noexec', 'allow_root', 'default_permissions', 'nonempty', 'kernel_cache', 'direct_io', 'passthrough', 'nopassthrough', 'max_read=N', 'max_readahead=N', 'gid=N', 'locking=', 'format=', 'secret-file=', 'overlay=', 'log=', 'readconfig=', 'force-share', 'share-rw', 'snapshot', 'layers', 'confine', 'trust-image-paths', 'debug'];
    for (const o of probe) expect(help).to.contain(o);
  });
});
