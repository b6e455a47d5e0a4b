// One conformance suite for every format in the registry (drivers/format/index.ts),
// judged by QEMU: each variant qemu-img makes reads as `qemu-img convert` reads it
// (probed without -f); unaligned writes, hole punching and zeroing through a --rw
// mount leave an image `qemu-img compare` finds equal to a raw file written the same
// way, and `qemu-img check` passes; overlays over backing files read and write as
// QEMU does; `tsimg create` makes images qemu-img accepts; damaged images give a
// one-line error or EIO, never a crash or a hang. Formats QEMU only reads (bochs,
// cloop) are made by their own tools, refuse --rw and mount read-only instead of the
// write cases. How each format is made is in test/helpers/formats.ts; a registered
// format without an entry there fails here.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { formatDrivers } from '../drivers/format/index.js';
import { formatOf } from '../drivers/open.js';
import { imageInfo, md5File, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';
import { nodeMd5, openTestImage, tsimg, unalignedWrites, writeSynced as writeAt } from './helpers/images.js';
import { checkRef, compareRef, convertRef, formatTable, makeVariant, oracleMd5, qemuIoRef, type FormatEntry, type ImageRef } from './helpers/formats.js';
import { exercise, withDeadline } from './helpers/corrupt.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** fallocate ranges: punched (-p) and zeroed (-z), unaligned, over data and over nothing. */
function holes(size: number): { mode: '-p' | '-z'; offset: number; length: number }[] {
  return [
    { mode: '-p' as const, offset: 100 * KiB + 77, length: 150 * KiB },
    { mode: '-z' as const, offset: 3 * MiB + 4096, length: 64 * KiB + 5 },
    { mode: '-p' as const, offset: 5 * MiB - 512, length: 2 * MiB },
    { mode: '-z' as const, offset: size - 3 * MiB, length: 2 * MiB + 1 },
  ].filter((h) => h.offset + h.length <= size);
}

describe('conformance: every registered format against qemu-img', function () {
  this.timeout(600_000);
  let tmp: ReturnType<typeof tempDir>;
  let seq = 0;
  const fresh = (what: string): string => {
    const d = path.join(tmp.dir, `${seq++}-${what}`);
    fs.mkdirSync(d);
    return d;
  };
  const mounts = new MountTracker();
  before(() => (tmp = tempDir('conformance')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  for (const name of formatDrivers.keys()) {
    const entry: FormatEntry | undefined = formatTable[name];
    describe(name, function () {
      if (!entry) {
        it('has an entry in test/helpers/formats.ts', function () {
          throw new Error(`format '${name}' is registered in drivers/format/index.ts but test/helpers/formats.ts does not say how qemu-img makes it`);
        });
        return;
      }
      const secretOf = (ref: ImageRef): { secret?: string } => (ref.secret ? { secret: ref.secret } : {});

      describe('reads every variant as qemu-img convert does', function () {
        for (const v of entry.read) {
          it(v.title, async function () {
            const dir = fresh(`${name}-read`);
            const ref = await makeVariant(dir, name, v, 'img');
            const node = await openTestImage(ref.file, { ...secretOf(ref), format: v.probes === false ? name : undefined });
            try {
              expect(formatOf(node), 'probed format').to.equal(name);
              expect(node.size).to.equal((await imageInfo(ref.file, name))['virtual-size']);
              const want = await oracleMd5(ref, v.large);
              expect(await nodeMd5(node, v.large ? 4 * MiB : MiB)).to.equal(want);
              // Odd-sized requests across cluster and sector edges read the same bytes.
              if (node.size <= 64 * MiB) expect(await nodeMd5(node, 100_003)).to.equal(want);
            } finally {
              await node.close();
            }
          });
        }
      });

      const w = entry.write;
      if (entry.readOnly)
        it('is read-only: --rw is refused with one line and the image unchanged; a read-only mount (probed) reads as qemu-img does', async function () {
          const dir = fresh(`${name}-ro-mount`);
          const ref = await makeVariant(dir, name, entry.damaged ?? entry.read[0]!, 'disk');
          const before = await md5File(ref.file);
          const mp = path.join(dir, 'mnt');
          fs.mkdirSync(mp);
          const refused = await tsmount(['--rw', ref.file, mp]);
          expect(refused.code, 'exit status of --rw').to.not.equal(0);
          expect(refused.stderr.trim().split('\n'), refused.stderr).to.have.length(1);
          expect(refused.stderr).to.include(ref.file).and.to.match(/read-only/);
          await mounts.mount([ref.file, mp]);
          expect(await md5File(path.join(mp, 'disk.raw')), 'reads through the mount').to.equal(await oracleMd5(ref));
          await mounts.unmount(mp);
          expect(await md5File(ref.file), 'the image is unchanged').to.equal(before);
        });
      else if (!w) it(`writes through a mount (pending: ${name} is read-only here)`);
      else
        it('takes unaligned writes, punched holes and zeroed ranges through a --rw mount (probed); compare and check agree', async function () {
          const dir = fresh(`${name}-mount`);
          const ref = await makeVariant(dir, name, w, 'disk');
          const want = path.join(dir, 'want.bin');
          await convertRef(ref, want);
          const size = fs.statSync(want).size;
          const mp = path.join(dir, 'mnt');
          fs.mkdirSync(mp);
          await mounts.mount(['--rw', ...(ref.secret ? ['--secret', ref.secret] : []), ref.file, mp]);
          const flat = path.join(mp, 'disk.raw');
          expect(fs.statSync(flat).size).to.equal(size);
          expect(await md5File(flat), 'reads through the mount').to.equal(await md5File(want));
          for (const u of unalignedWrites(size)) {
            writeAt(flat, u.offset, u.data);
            writeAt(want, u.offset, u.data);
          }
          for (const h of holes(size)) {
            for (const f of [flat, want]) await runOk('fallocate', [h.mode, ...(h.mode === '-p' ? [] : ['-n']), '-o', String(h.offset), '-l', String(h.length), f]);
          }
          expect(await md5File(flat), 'reads back through the mount').to.equal(await md5File(want));
          await mounts.unmount(mp);
          const cmp = await compareRef(ref, want);
          expect(cmp.code, cmp.stdout + cmp.stderr).to.equal(0);
          if (entry.checked) {
            const c = await checkRef(ref);
            expect(c.code, c.stdout + c.stderr).to.equal(0);
          }
        });

      if (!entry.backing) it(`overlays over a backing file (pending: ${name} has no backing files)`);
      else
        it('reads and writes an overlay over a backing file (qemu-img create -b) as QEMU does, leaving the backing file alone', async function () {
          const dir = fresh(`${name}-backing`);
          const base: ImageRef = { file: path.join(dir, `base.${entry.ext}`), format: name };
          await runOk('qemu-img', ['create', '-q', '-f', name, base.file, '16M'], { cwd: dir });
          await qemuIoRef(base, ['write -P 0xb0 0 4M', 'write -P 0xb1 15M 1M']);
          const top: ImageRef = { file: path.join(dir, `top.${entry.ext}`), format: name };
          await runOk('qemu-img', ['create', '-q', '-f', name, '-b', path.basename(base.file), '-F', name, top.file], { cwd: dir });
          await qemuIoRef(top, ['write -P 0x11 1M 64k', 'write -P 0x12 3M 2M']);
          const baseMd5 = await md5File(base.file);
          const want = path.join(dir, 'want.bin');
          await convertRef(top, want);
          let node = await openTestImage(top.file);
          try {
            expect(formatOf(node)).to.equal(name);
            expect(await nodeMd5(node, 100_003)).to.equal(await md5File(want));
          } finally {
            await node.close();
          }
          node = await openTestImage(top.file, { rw: true });
          try {
            for (const u of unalignedWrites(node.size)) {
              await node.write(u.offset, u.data);
              writeAt(want, u.offset, u.data);
            }
            if (node.zero) {
              await node.zero(2 * MiB + 100, MiB, true);
              writeAt(want, 2 * MiB + 100, Buffer.alloc(MiB));
            }
            await node.flush();
          } finally {
            await node.close();
          }
          const cmp = await compareRef(top, want);
          expect(cmp.code, cmp.stdout + cmp.stderr).to.equal(0);
          if (entry.checked) {
            const c = await checkRef(top);
            expect(c.code, c.stdout + c.stderr).to.equal(0);
          }
          expect(await md5File(base.file), 'the backing file is unchanged').to.equal(baseMd5);
        });

      const create = entry.create;
      if (!create) it(`tsimg create (pending: tsimg cannot create ${name} images)`);
      else
        it('tsimg create makes an image qemu-img info and check accept, and that reads as qemu-img reads it', async function () {
          const dir = fresh(`${name}-create`);
          const file = path.join(dir, `new.${entry.ext}`);
          const o = Object.entries(create.options ?? {}).map(([k, x]) => `${k}=${x}`);
          const r = await tsimg(['create', '-q', '-f', name, ...create.args, ...(o.length ? ['-o', o.join(',')] : []), file, '16M'], dir);
          expect(r.code, r.stderr).to.equal(0);
          const info = await imageInfo(file, name);
          expect(info.format).to.equal(name);
          // At least the size asked for (vpc rounds up to a CHS geometry, as qemu-img does).
          const size = info['virtual-size'];
          expect(size).to.be.within(16 * MiB, 16 * MiB + MiB);
          const secretIdx = create.args.indexOf('--secret');
          const ref: ImageRef = { file, format: name, secretKey: entry.secretKey, ...(secretIdx >= 0 ? { secret: create.args[secretIdx + 1] } : {}) };
          if (entry.checked) {
            const c = await checkRef(ref);
            expect(c.code, c.stdout + c.stderr).to.equal(0);
          }
          const want = await oracleMd5(ref);
          // A new encrypted image holds whatever its zeroed payload decrypts to; others read as zeros.
          if (!ref.secret) expect(want).to.equal(await md5File(await zeros(dir, size)));
          const node = await openTestImage(file, secretOf(ref));
          try {
            expect(formatOf(node)).to.equal(name);
            expect(node.size).to.equal(size);
            expect(await nodeMd5(node)).to.equal(want);
          } finally {
            await node.close();
          }
        });

      // A read-only format is damaged in its own `damaged` image, or the first one it reads.
      const victim = w ?? entry.damaged ?? entry.read[0];
      if (!victim) it(`corruption (pending: no image of ${name} to damage)`);
      else
        it('a truncated file or damaged header bytes give a one-line error or EIO, never a crash or a hang, and change nothing', async function () {
          const dir = fresh(`${name}-corrupt`);
          const ref = await makeVariant(dir, name, victim, 'base');
          const image = fs.readFileSync(ref.file);
          const xor = (b: Buffer, from: number, to: number): Buffer => {
            const c = Buffer.from(b);
            for (let i = Math.max(0, from); i < Math.min(to, c.length); i++) c[i]! ^= 0xa5;
            return c;
          };
          const mutations: { what: string; bytes: Buffer }[] = [
            { what: 'an empty file', bytes: Buffer.alloc(0) },
            { what: 'cut after 512 bytes', bytes: image.subarray(0, 512) },
            { what: 'cut in half', bytes: image.subarray(0, image.length >> 1) },
            { what: 'header fields after the magic damaged', bytes: xor(image, 8, 128) },
            { what: 'the first 64 KiB damaged every 97 bytes', bytes: (() => { const c = Buffer.from(image); for (let i = 3; i < Math.min(c.length, 64 * KiB); i += 97) c[i]! ^= 0xff; return c; })() },
            { what: 'the last 512 bytes damaged (footers)', bytes: xor(image, image.length - 512, image.length) },
          ];
          const file = path.join(dir, `mut.${entry.ext}`);
          for (const m of mutations) {
            fs.writeFileSync(file, m.bytes);
            const before = await md5File(file);
            try {
              await withDeadline(exercise(file, name, ref.secret ?? 'x'), `${name}: ${m.what}`);
            } catch (err) {
              throw new Error(`${name}, ${m.what}: ${(err as Error).stack ?? String(err)}`);
            }
            expect(await md5File(file), `${m.what} changed the file`).to.equal(before);
          }
        });
    });
  }
});

/** A file of `size` zero bytes (sparse), made once per folder. */
async function zeros(dir: string, size: number): Promise<string> {
  const f = path.join(dir, `zeros-${size}`);
  if (!fs.existsSync(f)) {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, size);
  }
  return f;
}
