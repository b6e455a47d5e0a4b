// The soak (issue 20, "Load"): fio with verification, four jobs of random reads and
// writes of mixed sizes (4 KiB, 64 KiB, 1 MiB), on a --rw mount of every writable
// format (the FUSE workers write the overwrites of each in place while the JS thread
// allocates). 20 s per format in CI, 200 s with TSMOUNT_SOAK=1 (TSMOUNT_SOAK_SECONDS=N;
// TSMOUNT_SOAK_FORMATS=qcow2,vdi picks formats): no verify error, the server's memory
// flat once warm; after the unmount QEMU reads exactly the bytes the mount served
// (qemu-img compare against a copy read through the mount), and qemu-img check is
// clean where it judges the format.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { run, runOk, tempDir } from './helpers/qemu.js';
import { checkRef, compareRef, makeVariant, writableCases } from './helpers/formats.js';
import { mountedPid, MountTracker } from './helpers/mount.js';

const SECONDS = Number(process.env.TSMOUNT_SOAK_SECONDS ?? (process.env.TSMOUNT_SOAK ? 200 : 20));
/** Every writable format, and the layouts whose data lies in other files (helpers/formats.ts writableLayouts). */
const CASES = writableCases(process.env.TSMOUNT_SOAK_FORMATS?.split(','));
const MiB = 1 << 20;

function rssOf(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

describe(`soak: fio with verify, 4 jobs, ${SECONDS} s per format on a --rw mount`, function () {
  this.timeout(SECONDS * 1000 * 3 + 120_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('soak')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  for (const { name: format, format: driver, write, checked } of CASES) {
    it(`${format}: no verify error, memory flat once warm, QEMU reads what the mount served`, async () => {
      // The format's write variant (its options and passphrase), 512 MiB and empty.
      const ref = await makeVariant(tmp.dir, driver, { ...write, size: '512M', io: [] }, `soak-${format}`);
      const mp = path.join(tmp.dir, `mp-${format}`);
      fs.mkdirSync(mp);
      // The format named: a fixed VHD is probed as raw, as QEMU probes it.
      await mounts.mount(['--rw', '-f', driver, ...(ref.secret ? ['--secret', ref.secret] : []), ref.file, mp]);
      const flat = path.join(mp, fs.readdirSync(mp).find((n) => n.endsWith('.raw'))!);
      const pid = mountedPid(mp)!;
      const samples: number[] = [];
      const timer = setInterval(() => samples.push(rssOf(pid)), 1000);
      let r;
      try {
        r = await run('fio', [
          '--name=soak', `--filename=${flat}`, '--rw=randrw', '--bssplit=4k/50:64k/30:1m/20',
          '--numjobs=4', '--size=96M', '--offset_increment=128M', '--verify=crc32c', '--verify_backlog=256',
          '--time_based', `--runtime=${SECONDS}`, '--direct=1', '--ioengine=libaio', '--iodepth=8',
          '--group_reporting', '--output-format=terse', '--terse-version=3',
        ], { timeoutMs: SECONDS * 1000 * 3 + 60_000, cwd: tmp.dir }); // fio leaves its verify state files in its folder
      } finally {
        clearInterval(timer);
      }
      expect(r.code, `fio: ${r.stderr}`).to.equal(0);
      expect(r.stderr).to.not.match(/verify: bad|bad magic|crc32c: wanted/i);
      const f = r.stdout.trim().split(';');
      const readMBs = Number(f[6]) / 1024;
      const writeMBs = Number(f[47]) / 1024;
      // Warm after half the run (the data and metadata caches filled): from then on RSS stays within a bound.
      const warm = samples.slice(Math.floor(samples.length / 2));
      const growth = warm.length ? Math.max(...warm) - warm[0]! : 0;
      console.log(`      ${format}: read ${readMBs.toFixed(0)} MB/s, write ${writeMBs.toFixed(0)} MB/s, RSS ${(warm[0]! / MiB).toFixed(0)} -> max ${(Math.max(...warm) / MiB).toFixed(0)} MiB`);
      expect(f[4], 'fio error field').to.equal('0');
      expect(growth, 'server RSS growth once warm').to.be.below(64 * MiB);
      // What the mount serves, read back through it; after the unmount QEMU must read the same.
      const served = path.join(tmp.dir, `served-${format}.raw`);
      await runOk('dd', [`if=${flat}`, `of=${served}`, 'bs=1M', 'conv=sparse', 'status=none'], { timeoutMs: 120_000 });
      await mounts.unmount(mp);
      const same = await compareRef(ref, served);
      expect(same.code, `qemu-img compare: ${same.stdout}${same.stderr}`).to.equal(0);
      fs.rmSync(served);
      if (checked) {
        const check = await checkRef(ref);
        expect(check.code, check.stdout + check.stderr).to.equal(0);
      }
      fs.rmSync(ref.file);
    });
  }
});
