// Virtual FAT benchmarks (issue 15): mount time of a tree of 10 GB in 10,000 sparse
// files and of 100,000 small files, the serving process's memory for the latter, and
// sequential reads of a large file through the FAT disk against the same file
// mounted raw (the host file warm in the page cache for both). Prints markdown rows for scripts/BENCHMARKS.md.
// Run: npm run build && node dist/scripts/vvfat-bench.js
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { TSMOUNT, forceUnmount, mountedPid } from './lib/mounts.js';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tsmount-vvfat-bench-'));
const mps: string[] = [];

function mount(args: string[], mp: string): number {
  fs.mkdirSync(mp, { recursive: true });
  mps.push(mp);
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, [TSMOUNT, ...args, mp], { encoding: 'utf8' });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`tsmount ${args.join(' ')}: ${r.stderr}`);
  return s;
}

function unmount(mp: string): void {
  spawnSync(process.execPath, [TSMOUNT, '-u', mp]);
}

/** dd of a file, bs=1M; MB/s. (The host file is in the page cache for both: the machine is shared, no cache is dropped.) */
function ddRate(file: string, skip = 0, count?: number): number {
  const args = [`if=${file}`, 'of=/dev/null', 'bs=1M', `skip=${skip}`, 'iflag=skip_bytes'];
  if (count !== undefined) args.push(`count=${count}`);
  const t0 = process.hrtime.bigint();
  execFileSync('dd', args, { stdio: 'ignore' });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return ((count ?? fs.statSync(file).size / 2 ** 20) * 2 ** 20) / s / 1e6;
}

function peakRss(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

try {
  const load = os.loadavg().map((x) => x.toFixed(2)).join(' ');
  const rows: string[] = [];

  // 0: the baseline, a 1 MiB raw file (the start of node and the mount itself).
  const small = path.join(tmp, 'small.raw');
  fs.writeFileSync(small, Buffer.alloc(1 << 20));
  const t0 = mount(['-f', 'raw', small], path.join(tmp, 'mp0'));
  unmount(path.join(tmp, 'mp0'));
  rows.push(`| v0 | time to mount a 1 MiB raw file (baseline: node's start and the mount) | ${t0.toFixed(3)} s | — | ${load} | |`);

  // 1: 10 GB in 10,000 sparse files.
  const big = path.join(tmp, 'tenk');
  for (let d = 0; d < 10; d++) {
    fs.mkdirSync(path.join(big, `dir${d}`), { recursive: true });
    for (let f = 0; f < 1000; f++) {
      const p = path.join(big, `dir${d}`, `file number ${f}.dat`);
      fs.closeSync(fs.openSync(p, 'w'));
      fs.truncateSync(p, 1_000_000);
    }
  }
  const t1 = mount([`fat:32:${big}`], path.join(tmp, 'mp1'));
  unmount(path.join(tmp, 'mp1'));
  rows.push(`| v1 | time to mount fat:32: of 10 GB in 10,000 sparse files | ${t1.toFixed(3)} s | < 1 s: ${t1 < 1 ? 'yes' : 'no'} | ${load} | tsmount from start to its return |`);

  // 2: 100,000 small files.
  const many = path.join(tmp, 'many');
  for (let d = 0; d < 100; d++) {
    fs.mkdirSync(path.join(many, `d${d}`), { recursive: true });
    for (let f = 0; f < 1000; f++) fs.writeFileSync(path.join(many, `d${d}`, `small file ${f}.txt`), `${d}/${f}\n`);
  }
  const mp2 = path.join(tmp, 'mp2');
  const t2 = mount([`fat:32:${many}`], mp2);
  const rss = peakRss(mountedPid(mp2)!);
  unmount(mp2);
  rows.push(`| v2 | time to mount fat:32: of 100,000 small files | ${t2.toFixed(3)} s | a few seconds: ${t2 < 5 ? 'yes' : 'no'} | ${load} | peak RSS of the server ${rss.toFixed(0)} MiB |`);

  // 3: sequential read of a 1 GiB file through the FAT disk against the file mounted raw.
  const one = path.join(tmp, 'one');
  fs.mkdirSync(one);
  const file = path.join(one, 'data.bin');
  execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=1M', 'count=1024', 'status=none']);
  execFileSync('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', 'status=none']);
  const mp3 = path.join(tmp, 'mp3');
  mount([`fat:32:${one}`], mp3);
  // data.bin is the first file after the root directory cluster: cluster 3.
  const raw3 = path.join(mp3, 'one.raw');
  const head = Buffer.alloc(512);
  const fd = fs.openSync(raw3, 'r');
  fs.readSync(fd, head, 0, 512, 63 * 512);
  fs.closeSync(fd);
  const spc = head[13]!;
  const reserved = head.readUInt16LE(14);
  const spf = head.readUInt32LE(36);
  const dataStart = (63 + reserved + 2 * spf) * 512;
  const fileAt = dataStart + 1 * spc * 512;
  const fat = ddRate(raw3, fileAt, 1024);
  unmount(mp3);
  const mp4 = path.join(tmp, 'mp4');
  mount(['-f', 'raw', file], mp4);
  const raw = ddRate(path.join(mp4, 'data.raw'));
  unmount(mp4);
  rows.push(`| v3 | sequential read of a 1 GiB file, dd bs=1M, through fat:32: vs. the file mounted raw | ${fat.toFixed(0)} MB/s vs ${raw.toFixed(0)} MB/s | ≥ 0.8: ${fat / raw >= 0.8 ? 'yes' : 'no'} (${(fat / raw).toFixed(2)}) | ${os.loadavg().map((x) => x.toFixed(2)).join(' ')} | host file in the page cache for both |`);

  console.log('| row | what | tsmount | target | load avg | note |\n| --- | --- | --- | --- | --- | --- |');
  for (const r of rows) console.log(r);
} finally {
  for (const mp of mps) if (mountedPid(mp) !== undefined) forceUnmount(mp);
  fs.rmSync(tmp, { recursive: true, force: true });
}
