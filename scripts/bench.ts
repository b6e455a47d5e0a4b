// npm run bench [-- --quick] [--rows 1,2,3] [--repeat N] [--out FILE] [--images DIR] [--cold] [--no-warm-memory]
//
// tsmount against qemu-storage-daemon's FUSE export (and xmount where it reads the
// format), on the same images, in one run (issue 6). Every measurement gets a fresh
// mount, so no page cache of the mounted file is counted; the two systems alternate
// and each row reports the median of the per-repetition ratios and their spread, as
// only same-run ratios mean anything on a shared machine.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { imageInfo } from './lib/qemu.js';
import { Images, LUKS_SECRET, type Sizes } from './bench/images.js';
import { cleanupAll, liveMounts, peakRss, withMount, type MountRequest, type System } from './bench/mounts.js';
import { convertSeconds, halfDataRaw, qemuImgSeconds, scattered1T, tsimgSeconds } from './bench/tsimg.js';
import { GiB, MiB, ddRead, ddReadParallel, ddWrite, drop, fio, have, loadAverage, machine, median, warm, holdFreeMemory, warmFreeMemory, type Machine } from './bench/tools.js';

export interface BenchConfig {
  quick: boolean;
  repeat: number;
  rows: Set<number>;
  out?: string;
  imagesDir?: string;
  keepImages: boolean;
  cold: boolean;
  sizes: Sizes;
  /** Seconds per random-read fio run. */
  fioRuntime: number;
  /** Bytes each random-write fio run writes. */
  fioWriteBytes: number;
  /** Node options for the tsmount server, e.g. --cpu-prof (profiling runs). */
  serverNodeArgs: string[];
  /** Bytes of memory freed just before each measurement (tools.ts warmFreeMemory; --no-warm-memory: 0, and no holdFreeMemory). */
  warmMemory: number;
}

export interface Row {
  id: string;
  what: string;
  tsmount: string;
  qsd: string;
  xmount: string;
  /**
   * The libfuse3 server of memory (scripts/bench/ceiling.c): the machine's FUSE limit.
   * On the sequential write rows (3*): a plain dd into a file on the same disk instead.
   */
  ceiling: string;
  /** tsmount speed / ceiling (or dd) speed: median (min..max). */
  cratio: string;
  /** tsmount speed / qsd speed: median (min..max). */
  ratio: string;
  target: string;
  note: string;
  load: string;
}

const ALL_ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13];
export const NOTES_MARKER = '<!-- Everything below this line is kept when scripts/bench.ts rewrites the file. -->';

function parseArgs(argv: string[]): BenchConfig {
  const quick = argv.includes('--quick');
  const value = (flag: string): string | undefined => {
    const i = argv.indexOf(flag);
    if (i < 0) return undefined;
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`${flag} needs a value`);
    return v;
  };
  const known = new Set(['--quick', '--rows', '--repeat', '--out', '--images', '--keep-images', '--cold', '--cpu-prof', '--no-warm-memory']);
  for (const a of argv) if (a.startsWith('--') && !known.has(a)) throw new Error(`unknown option ${a}`);
  const rowsArg = value('--rows');
  const rows = new Set(rowsArg ? rowsArg.split(',').map((s) => Number(s.trim())) : ALL_ROWS);
  for (const r of rows) if (!ALL_ROWS.includes(r)) throw new Error(`--rows: no row ${r} (rows are 1..${ALL_ROWS.length})`);
  const repeat = Number(value('--repeat') ?? (quick ? 1 : 3));
  if (!Number.isInteger(repeat) || repeat < 1 || repeat > 50) throw new Error('--repeat must be 1..50');
  const cpuProf = value('--cpu-prof');
  return {
    quick,
    repeat,
    rows,
    out: value('--out'),
    imagesDir: value('--images'),
    keepImages: argv.includes('--keep-images'),
    cold: argv.includes('--cold'),
    sizes: quick ? { main: 64 * MiB, big: 256 * MiB, small: 16 * MiB } : { main: GiB, big: 4 * GiB, small: 64 * MiB },
    fioRuntime: quick ? 1 : 5,
    fioWriteBytes: quick ? 8 * MiB : 128 * MiB,
    serverNodeArgs: cpuProf ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(cpuProf)}`] : [],
    // More than any one measurement puts into the page cache (row 9's 2 GiB of data, row 1's flat file).
    warmMemory: argv.includes('--no-warm-memory') ? 0 : quick ? 256 * MiB : 3 * GiB,
  };
}

const fmtSize = (b: number): string => (b >= GiB ? `${b / GiB} GiB` : `${b / MiB} MiB`);
const mbps = (x: number): string => `${(x / 1e6).toFixed(0)} MB/s`;
const iops = (x: number): string => `${x.toFixed(0)} IOPS`;
const secs = (x: number): string => `${x.toFixed(3)} s`;
const mib = (x: number): string => `${(x / MiB).toFixed(0)} MiB`;

function spread(xs: number[], digits = 2): string {
  if (xs.length === 0) return '—';
  const m = median(xs).toFixed(digits);
  return xs.length === 1 ? m : `${m} (${Math.min(...xs).toFixed(digits)}..${Math.max(...xs).toFixed(digits)})`;
}

/** Errors that mean "tsmount does not read this yet", as opposed to a broken benchmark. */
function isUnsupported(msg: string): boolean {
  return /not supported|does not open|unknown format|Input\/output error|not a .* image/i.test(msg);
}

interface Measured {
  samples: Record<System, number[]>;
  ratios: number[];
  xratios: number[];
  /** tsmount / ceiling, or tsmount / dd on the rows that measure dd instead. */
  cratios: number[];
  /** Why a system dropped out; a tsmount failure ends the row. */
  failed: Partial<Record<System, string>>;
}

class Bench {
  readonly rows: Row[] = [];
  private targetSeq = 0;
  /** Row 7 reads the big image anyway: row 8 reuses those speeds. */
  private readonly bigSpeeds: Record<'tsmount' | 'qsd', number[]> = { tsmount: [], qsd: [] };
  private hasXmount = false;

  constructor(readonly cfg: BenchConfig, readonly images: Images, readonly work: string) {}

  async init(): Promise<void> {
    this.hasXmount = await have('xmount');
  }

  /** A fresh target for a mount: a regular file (tsmount, qsd) or a directory (xmount). */
  private target(system: System): string {
    const p = path.join(this.work, `mnt-${system}-${this.targetSeq++}`);
    if (system === 'xmount') fs.mkdirSync(p);
    else fs.writeFileSync(p, '');
    return p;
  }

  private request(system: System, image: string, format: string, extra: Partial<MountRequest> = {}): MountRequest {
    return { image, format, rw: false, target: this.target(system), nodeArgs: system === 'tsmount' ? this.cfg.serverNodeArgs : undefined, size: this.cfg.sizes.main, ...extra };
  }

  /**
   * Measure each system `repeat` times, alternating which goes first, each time on a
   * fresh mount. `higher`: bigger numbers are better (speeds); else times.
   */
  private async compare(
    systems: System[],
    files: string[],
    repeat: number,
    higher: boolean,
    measure: (s: System) => Promise<number>,
  ): Promise<Measured> {
    const res: Measured = { samples: { tsmount: [], qsd: [], xmount: [], ceiling: [], dd: [] }, ratios: [], xratios: [], cratios: [], failed: {} };
    let active = systems.filter((s) => s !== 'xmount' || this.hasXmount);
    if (systems.includes('xmount') && !this.hasXmount) res.failed.xmount = 'xmount is not installed (apt-get install xmount)';
    if (!this.cfg.cold) await warm(files);
    for (let i = 0; i < repeat && active.includes('tsmount') && (active.includes('qsd') || !systems.includes('qsd')); i++) {
      const order = i % 2 === 0 ? active : [...active].reverse();
      const got: Partial<Record<System, number>> = {};
      for (const s of order) {
        if (this.cfg.cold) await drop(files);
        warmFreeMemory(this.cfg.warmMemory);
        try {
          got[s] = await measure(s);
          res.samples[s].push(got[s]!);
        } catch (err) {
          res.failed[s] = err instanceof Error ? err.message : String(err);
          active = active.filter((x) => x !== s);
          if (s === 'tsmount') break;
        }
      }
      const t = got.tsmount;
      const q = got.qsd;
      const x = got.xmount;
      const c = got.ceiling ?? got.dd;
      if (t !== undefined && q !== undefined) res.ratios.push(higher ? t / q : q / t);
      if (t !== undefined && x !== undefined) res.xratios.push(higher ? t / x : x / t);
      if (t !== undefined && c !== undefined) res.cratios.push(higher ? t / c : c / t);
    }
    return res;
  }

  private push(row: Omit<Row, 'load'>, load: string): void {
    this.rows.push({ ...row, load });
    const r = this.rows[this.rows.length - 1]!;
    process.stderr.write(
      `  ${r.id} ${r.what}: ${r.ratio}  [tsmount ${r.tsmount}, qsd ${r.qsd}${r.xmount !== '—' ? `, xmount ${r.xmount}` : ''}${r.ceiling !== '—' ? `, ceiling ${r.ceiling}, tsmount/ceiling ${r.cratio}` : ''}]${r.note ? `  ${r.note}` : ''}\n`,
    );
  }

  /** A row from a comparison: speeds, the ratio, the ≥ 1.0 target, and why anything dropped out. */
  private report(id: string, what: string, m: Measured, fmt: (x: number) => string, load: string, target = '≥ 1.0', extraNote = '', ceilingTarget?: number): void {
    const med = (s: System): string => (m.samples[s].length ? fmt(median(m.samples[s])) : '—');
    // The write rows measure a plain dd where the others measure the ceiling server.
    const anchor: System = m.samples.dd.length ? 'dd' : 'ceiling';
    const notes: string[] = [];
    if (m.failed.tsmount) notes.push(`${isUnsupported(m.failed.tsmount) ? 'skipped: tsmount does not read this yet' : 'tsmount failed'}: ${m.failed.tsmount}`);
    if (m.failed.qsd) notes.push(`qemu-storage-daemon failed: ${m.failed.qsd}`);
    if (m.failed.xmount) notes.push(`xmount: ${m.failed.xmount}`);
    if (m.failed.ceiling) notes.push(`ceiling: ${m.failed.ceiling}`);
    if (m.failed.dd) notes.push(`dd: ${m.failed.dd}`);
    if (m.xratios.length) notes.push(`tsmount/xmount ${spread(m.xratios)}`);
    if (extraNote) notes.push(extraNote);
    const r = median(m.ratios);
    let met = m.ratios.length === 0 ? '—' : `${target}: ${r >= 1 ? 'yes' : 'no'}`;
    if (ceilingTarget !== undefined && m.cratios.length) met += `; ≥ ${ceilingTarget} of ${anchor === 'dd' ? 'dd' : 'ceiling'}: ${median(m.cratios) >= ceilingTarget ? 'yes' : 'no'}`;
    this.push(
      { id, what, tsmount: med('tsmount'), qsd: med('qsd'), xmount: med('xmount'), ceiling: anchor === 'dd' ? `dd ${med('dd')}` : med('ceiling'), cratio: spread(m.cratios), ratio: spread(m.ratios), target: met, note: notes.join('; ') },
      load,
    );
  }

  /** Sequential dd read of a whole image. */
  private async seqRead(id: string, what: string, image: string, format: string, systems: System[], files = [image], extra: Partial<MountRequest> = {}): Promise<void> {
    const load = loadAverage();
    const size = extra.size ?? (await virtualSize(image, format));
    const m = await this.compare(systems, files, this.cfg.repeat, true, (s) => withMount(s, this.request(s, image, format, { size, ...extra }), (mt) => ddRead(mt.file, size)));
    this.report(id, what, m, mbps, load, '≥ 1.0', '', systems.includes('ceiling') ? 0.7 : undefined);
  }

  async row1(): Promise<void> {
    const size = fmtSize(this.cfg.sizes.main);
    await this.seqRead('1', `sequential read, dd bs=1M, fully allocated ${size} qcow2 (64 KiB clusters)`, await this.images.fullQcow2(), 'qcow2', ['tsmount', 'qsd', 'ceiling']);
    await this.seqRead('1r', `the same on the ${size} raw image (xmount reads raw, not qcow2)`, await this.images.dataRaw(), 'raw', ['tsmount', 'qsd', 'xmount', 'ceiling']);
  }

  async row2(): Promise<void> {
    const img = await this.images.fullQcow2();
    const size = this.cfg.sizes.main;
    for (const jobs of [1, 4]) {
      const load = loadAverage();
      const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [img], this.cfg.repeat, true, (s) =>
        withMount(s, this.request(s, img, 'qcow2'), (mt) => fio({ file: mt.file, rw: 'randread', jobs, size, runtime: this.cfg.fioRuntime })),
      );
      this.report(`2${jobs === 1 ? 'a' : 'b'}`, `random 4 KiB reads, fio psync, ${jobs} job${jobs > 1 ? 's' : ''}, ${this.cfg.fioRuntime} s`, m, iops, load, '≥ 1.0', '', 1.0);
    }
    const raw = await this.images.dataRaw();
    const load = loadAverage();
    const m = await this.compare(['tsmount', 'qsd', 'xmount', 'ceiling'], [raw], this.cfg.repeat, true, (s) =>
      withMount(s, this.request(s, raw, 'raw'), (mt) => fio({ file: mt.file, rw: 'randread', jobs: 1, size, runtime: this.cfg.fioRuntime })),
    );
    this.report('2r', 'random 4 KiB reads, 1 job, on the raw image (with xmount)', m, iops, load, '≥ 1.0', '', 1.0);
    await this.row2Uring(img, size);
  }

  /**
   * Rows 2u/2ub: rows 2a/2b with tsmount's opt-in transport, FUSE over io_uring
   * (TSMOUNT_FUSE_URING=1). The kernel offers it only with fuse.enable_uring=Y: the
   * row sets it for its own mounts (root) and puts the old value back.
   */
  private async row2Uring(img: string, size: number): Promise<void> {
    const param = '/sys/module/fuse/parameters/enable_uring';
    let old: string;
    try {
      old = fs.readFileSync(param, 'utf8').trim();
      fs.writeFileSync(param, 'Y');
    } catch (err) {
      process.stderr.write(`  2u skipped: ${param}: ${err instanceof Error ? err.message : String(err)}\n`);
      return;
    }
    try {
      for (const jobs of [1, 4]) {
        const load = loadAverage();
        const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [img], this.cfg.repeat, true, (s) =>
          withMount(s, this.request(s, img, 'qcow2', s === 'tsmount' ? { env: { TSMOUNT_FUSE_URING: '1' } } : {}), (mt) => fio({ file: mt.file, rw: 'randread', jobs, size, runtime: this.cfg.fioRuntime })),
        );
        this.report(jobs === 1 ? '2u' : '2ub', `random 4 KiB reads, ${jobs} job${jobs > 1 ? 's' : ''}, tsmount over FUSE io_uring (TSMOUNT_FUSE_URING=1, opt-in)`, m, iops, load, '≥ 1.0', '', 1.0);
      }
    } finally {
      fs.writeFileSync(param, old === 'Y' ? 'Y' : 'N');
    }
  }

  /**
   * Sequential writes, dd bs=1M conv=notrunc,fsync of the whole disk, allocating and
   * overwriting, qcow2 and raw. The anchor is the same dd straight into a host file on
   * the same disk (a fresh sparse file where the row allocates, an allocated one where
   * it overwrites): what the machine writes with no FUSE server in the way.
   */
  private async seqWrite(id: string, what: string, format: 'qcow2' | 'raw' | 'luks', overwrite: boolean, preallocate = false): Promise<void> {
    const src = await this.images.dataRaw();
    const size = this.cfg.sizes.main;
    const load = loadAverage();
    // Overwrites reuse one allocated image (and one allocated dd target) for every measurement.
    const image = !overwrite || format === 'raw' ? undefined : format === 'luks' ? await this.images.luksCopy(`over-${id}.luks`) : await this.images.writableCopy(`over-${id}.qcow2`);
    const over = overwrite ? { image, raw: await this.images.rawCopy(`over-${id}.raw`) } : undefined;
    const extra: Partial<MountRequest> = { rw: true, ...(format === 'luks' ? { secret: LUKS_SECRET } : {}), ...(preallocate ? { preallocate } : {}) };
    const m = await this.compare(['tsmount', 'qsd', 'dd'], [src], this.cfg.repeat, true, async (s) => {
      if (s === 'dd') return ddWrite(src, over ? over.raw : this.images.sparseRaw(`alloc-${id}-dd.raw`), size);
      let img: string;
      if (over) img = over.image ?? over.raw;
      else img = format === 'qcow2' ? await this.images.emptyQcow2(`write-${s}.qcow2`) : this.images.sparseRaw(`alloc-${id}-${s}.raw`);
      return withMount(s, this.request(s, img, format, extra), (mt) => ddWrite(src, mt.file, size));
    });
    this.report(id, what, m, mbps, load, '≥ 1.0', 'ceiling column: the same dd straight into a host file on the same disk', 0.9);
  }

  async row3(): Promise<void> {
    const size = fmtSize(this.cfg.sizes.main);
    await this.seqWrite('3', `sequential write that allocates, dd bs=1M conv=fsync into an empty ${size} qcow2`, 'qcow2', false);
    await this.seqWrite('3p', `the same through QEMU's preallocate filter (tsmount --preallocate; qsd: a preallocate blockdev), default 128 MiB ahead`, 'qcow2', false, true);
    await this.seqWrite('3o', `sequential overwrite, dd bs=1M conv=fsync into a fully allocated ${size} qcow2`, 'qcow2', true);
    await this.seqWrite('3r', `sequential write that allocates, dd bs=1M conv=fsync into a sparse ${size} raw image`, 'raw', false);
    await this.seqWrite('3ro', `sequential overwrite, dd bs=1M conv=fsync into an allocated ${size} raw image`, 'raw', true);
    await this.seqWrite('3l', `sequential overwrite, dd bs=1M conv=fsync into a ${size} luks image (aes-256-xts-plain64)`, 'luks', true);
  }

  async row4(): Promise<void> {
    const img = await this.images.writableCopy('random-write.qcow2');
    const bytes = this.cfg.fioWriteBytes;
    for (const jobs of [1, 4]) {
      const load = loadAverage();
      // The ceiling server counts the writes (direct I/O, as the other two serve writable files).
      const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [img], this.cfg.repeat, true, (s) =>
        withMount(s, this.request(s, img, 'qcow2', { rw: true }), (mt) => fio({ file: mt.file, rw: 'randwrite', jobs, size: this.cfg.sizes.main, ioSize: bytes / jobs })),
      );
      this.report(
        jobs === 1 ? '4' : '4b',
        `random 4 KiB writes into an allocated qcow2, fio psync, ${jobs} job${jobs > 1 ? 's' : ''}, ${fmtSize(bytes)}${jobs > 1 ? ' in all' : ''} then fsync`,
        m,
        iops,
        load,
        '≥ 1.0',
        '',
        1.0,
      );
    }
    // The same into a fresh copy of a qcow2 with every other cluster allocated: about a
    // quarter of the writes allocate a cluster, the rest overwrite (a new disk in use).
    const half = await this.images.halfQcow2();
    for (const jobs of [1, 4]) {
      const load = loadAverage();
      const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [half], this.cfg.repeat, true, async (s) => {
        const img = s === 'ceiling' ? half : await this.images.copyOf(half, `half-${s}.qcow2`);
        return withMount(s, this.request(s, img, 'qcow2', { rw: true }), (mt) => fio({ file: mt.file, rw: 'randwrite', jobs, size: this.cfg.sizes.main, ioSize: bytes / jobs }));
      });
      this.report(
        jobs === 1 ? '4h' : '4hb',
        `random 4 KiB writes into a half-allocated qcow2 (every other cluster), fio psync, ${jobs} job${jobs > 1 ? 's' : ''}, ${fmtSize(bytes)}${jobs > 1 ? ' in all' : ''} then fsync`,
        m,
        iops,
        load,
        '≥ 1.0',
        '',
        1.0,
      );
    }
  }

  /**
   * Rows 12*: random 4 KiB writes into a new empty image of each writable format (a new
   * VM disk being filled): nearly every block's first write allocates it, so each
   * format's allocation path decides (zeros of a new block, table entries, barriers).
   */
  async row12(): Promise<void> {
    const bytes = this.cfg.fioWriteBytes;
    const formats = ['qcow2', 'vmdk', 'vdi', 'vpc', 'vhdx', 'qed', 'qcow', 'parallels'];
    for (const [k, format] of formats.entries()) {
      const load = loadAverage();
      const probe = await this.images.emptyImage(format, `new-probe.${format}`);
      const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [probe], this.cfg.repeat, true, async (s) => {
        const img = s === 'ceiling' ? probe : await this.images.emptyImage(format, `new-${s}.${format}`);
        return withMount(s, this.request(s, img, format, { rw: true }), (mt) => fio({ file: mt.file, rw: 'randwrite', jobs: 1, size: this.cfg.sizes.main, ioSize: bytes }));
      });
      this.report(`12${String.fromCharCode(97 + k)}`, `random 4 KiB writes into a new empty ${fmtSize(this.cfg.sizes.main)} ${format}, fio psync, 1 job, ${fmtSize(bytes)} then fsync`, m, iops, load, '≥ 1.0', '', 1.0);
    }
    // Row 12a again through QEMU's preallocate filter on both sides.
    const load = loadAverage();
    const probe = await this.images.emptyImage('qcow2', 'new-probe.qcow2');
    const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [probe], this.cfg.repeat, true, async (s) => {
      const img = s === 'ceiling' ? probe : await this.images.emptyImage('qcow2', `new-${s}.qcow2`);
      return withMount(s, this.request(s, img, 'qcow2', { rw: true, preallocate: s !== 'ceiling' }), (mt) => fio({ file: mt.file, rw: 'randwrite', jobs: 1, size: this.cfg.sizes.main, ioSize: bytes }));
    });
    this.report('12p', `row 12a through QEMU's preallocate filter (tsmount --preallocate; qsd: a preallocate blockdev)`, m, iops, load, '≥ 1.0', '', 1.0);
  }

  /**
   * Rows 13*: random 4 KiB overwrites into a fresh copy of an allocated image of each
   * writable format: no allocation, so the request path decides (the FUSE workers write
   * in place where the format lets them).
   */
  async row13(): Promise<void> {
    const bytes = this.cfg.fioWriteBytes;
    const formats = ['qcow2', 'vmdk', 'vdi', 'vpc', 'vhdx', 'qed', 'qcow', 'parallels'];
    for (const [k, format] of formats.entries()) {
      const load = loadAverage();
      const full = await this.images.fullImage(format);
      const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [full], this.cfg.repeat, true, async (s) => {
        const img = s === 'ceiling' ? full : await this.images.copyOf(full, `over-${s}.${format}`);
        return withMount(s, this.request(s, img, format, { rw: true }), (mt) => fio({ file: mt.file, rw: 'randwrite', jobs: 1, size: this.cfg.sizes.main, ioSize: bytes }));
      });
      this.report(`13${String.fromCharCode(97 + k)}`, `random 4 KiB overwrites into an allocated ${fmtSize(this.cfg.sizes.main)} ${format}, fio psync, 1 job, ${fmtSize(bytes)} then fsync`, m, iops, load, '≥ 1.0', '', 1.0);
    }
  }

  async row5(): Promise<void> {
    const size = fmtSize(this.cfg.sizes.main);
    await this.seqRead('5a', `sequential read, ${size} vmdk (monolithicSparse)`, await this.images.vmdk(), 'vmdk', ['tsmount', 'qsd', 'ceiling']);
    await this.seqRead('5b', `sequential read, ${size} vhdx`, await this.images.vhdx(), 'vhdx', ['tsmount', 'qsd', 'ceiling']);
    await this.seqRead('5c', `sequential read, ${size} compressed qcow2`, await this.images.compressedQcow2(), 'qcow2', ['tsmount', 'qsd', 'ceiling']);
    await this.seqRead('5f', `sequential read, ${size} compressed qcow2 (compression_type=zstd)`, await this.images.zstdQcow2(), 'qcow2', ['tsmount', 'qsd', 'ceiling']);
    await this.seqRead('5g', `sequential read, ${size} compressed qcow2 with 1 MiB clusters (the JS thread's inflate pool)`, await this.images.compressedQcow2Big(), 'qcow2', ['tsmount', 'qsd', 'ceiling']);
    const luks = await this.images.luks();
    await this.seqRead('5d', `sequential read, ${size} luks (aes-256-xts-plain64)`, luks, 'luks', ['tsmount', 'qsd', 'ceiling'], [luks], { secret: LUKS_SECRET, size: this.cfg.sizes.main });
    await this.seqRead('5e', `sequential read, ${size} vmdk (streamOptimized)`, await this.images.streamVmdk(), 'vmdk', ['tsmount', 'qsd', 'ceiling']);
    const flat = await this.images.flatVmdk();
    await this.seqRead('5h', `sequential read, ${size} vmdk (monolithicFlat: FUSE passthrough of its extent file)`, flat, 'vmdk', ['tsmount', 'qsd', 'ceiling'], [flat, flat.replace(/\.vmdk$/, '-flat.vmdk')]);
    await this.seqRead('5i', `sequential read, ${size} vpc (fixed VHD, the FUSE workers)`, await this.images.fixedVpc(), 'vpc', ['tsmount', 'qsd', 'ceiling']);
  }

  async row6(): Promise<void> {
    const repeat = Math.max(this.cfg.repeat * 2, this.cfg.quick ? 2 : 6);
    const cases: [string, string, string, string[]][] = [];
    const sparse = await this.images.sparse1T();
    cases.push(['6a', 'time to mount a 1 TiB sparse qcow2', sparse, [sparse]]);
    const chain = await this.images.chain();
    cases.push(['6b', 'time to mount a qcow2 over a 4-deep backing chain', chain[chain.length - 1]!, chain]);
    for (const [id, what, img, files] of cases) {
      const load = loadAverage();
      const m = await this.compare(['tsmount', 'qsd'], files, repeat, false, (s) => withMount(s, this.request(s, img, 'qcow2'), async (mt) => mt.mountSeconds));
      const t = median(m.samples.tsmount);
      const target = id === '6a' && m.samples.tsmount.length ? `< 0.5 s: ${t < 0.5 ? 'yes' : 'no'}; ` : '';
      this.report(id, what, m, secs, load, `${target}≥ 1.0`, 'ratio: qsd time / tsmount time; tsmount is timed from start to its return, qsd until its mount appears');
    }
  }

  /** Row 7: peak RSS while reading the big image; also row 8's big-image speeds. */
  async row7(): Promise<void> {
    const img = await this.images.allocated('big.qcow2', this.cfg.sizes.big);
    const size = this.cfg.sizes.big;
    for (const cacheSize of [undefined, '16M']) {
      const load = loadAverage();
      const rss: Record<'tsmount' | 'qsd', number[]> = { tsmount: [], qsd: [] };
      const systems: System[] = cacheSize ? ['tsmount'] : ['tsmount', 'qsd'];
      // With --cache-size 16M only tsmount changes; qsd is measured once, in 7a.
      const m = await this.compare(systems, [img], this.cfg.repeat, true, async (s) => {
        return withMount(s, this.request(s, img, 'qcow2', { cacheSize }), async (mt) => {
          const speed = await ddRead(mt.file, size);
          const peak = peakRss(mt.pid);
          if (peak !== undefined && (s === 'tsmount' || s === 'qsd')) rss[s].push(peak);
          if (!cacheSize && (s === 'tsmount' || s === 'qsd')) this.bigSpeeds[s].push(speed);
          return speed;
        });
      });
      const limit = (cacheSize ? 16 * MiB : 64 * MiB) + 100 * MiB;
      const t = median(rss.tsmount);
      const notes: string[] = [];
      if (m.failed.tsmount) notes.push(`tsmount failed: ${m.failed.tsmount}`);
      if (m.failed.qsd) notes.push(`qemu-storage-daemon failed: ${m.failed.qsd}`);
      notes.push(`peak RSS (VmHWM) of the serving process while dd reads ${fmtSize(size)}; samples ${rss.tsmount.map(mib).join(', ')}`);
      this.push(
        {
          id: cacheSize ? '7b' : '7a',
          what: `peak resident memory reading ${fmtSize(size)}, ${cacheSize ? '--cache-size 16M' : 'default cache size (64M)'}`,
          tsmount: rss.tsmount.length ? mib(t) : '—',
          qsd: rss.qsd.length ? mib(median(rss.qsd)) : cacheSize ? '(as 7a)' : '—',
          xmount: '—',
          ceiling: '—',
          cratio: '—',
          ratio: rss.qsd.length && rss.tsmount.length ? `qsd/tsmount memory ${(median(rss.qsd) / t).toFixed(2)}` : '—',
          target: rss.tsmount.length ? `≤ ${mib(limit)}: ${t <= limit ? 'yes' : 'no'}` : '—',
          note: notes.join('; '),
        },
        load,
      );
    }
  }

  async row8(): Promise<void> {
    const small = await this.images.allocated('small.qcow2', this.cfg.sizes.small);
    const big = await this.images.allocated('big.qcow2', this.cfg.sizes.big);
    const load = loadAverage();
    if (this.bigSpeeds.tsmount.length === 0) {
      await this.compare(['tsmount', 'qsd'], [big], this.cfg.repeat, true, (s) =>
        withMount(s, this.request(s, big, 'qcow2'), async (mt) => {
          const v = await ddRead(mt.file, this.cfg.sizes.big);
          if (s === 'tsmount' || s === 'qsd') this.bigSpeeds[s].push(v);
          return v;
        }),
      );
    }
    // The small image reads in a blink: more repeats to tame the noise.
    const m = await this.compare(['tsmount', 'qsd'], [small], this.cfg.repeat * 3, true, (s) =>
      withMount(s, this.request(s, small, 'qcow2'), (mt) => ddRead(mt.file, this.cfg.sizes.small)),
    );
    const scale = (s: 'tsmount' | 'qsd'): number => median(this.bigSpeeds[s]) / median(m.samples[s]);
    const ts = scale('tsmount');
    const both = (s: 'tsmount' | 'qsd'): string =>
      m.samples[s].length && this.bigSpeeds[s].length ? `${mbps(median(this.bigSpeeds[s]))} / ${mbps(median(m.samples[s]))} = ${scale(s).toFixed(2)}` : '—';
    this.push(
      {
        id: '8',
        what: `scaling: sequential read speed, ${fmtSize(this.cfg.sizes.big)} image / ${fmtSize(this.cfg.sizes.small)} image (qcow2)`,
        tsmount: both('tsmount'),
        qsd: both('qsd'),
        xmount: '—',
        ceiling: '—',
        cratio: '—',
        ratio: '—',
        target: Number.isFinite(ts) ? `≥ 0.90: ${ts >= 0.9 ? 'yes' : 'no'}` : '—',
        note: m.failed.tsmount ? `tsmount failed: ${m.failed.tsmount}` : 'each column: big-image speed / small-image speed (medians)',
      },
      load,
    );
  }

  /**
   * Row 9: tsimg convert -O qcow2 of the big (4 GiB) raw image, half data and half
   * holes, against qemu-img convert of the same image (the tsmount column is tsimg,
   * the qsd column qemu-img); then the cost of -p, tsimg with it against without.
   */
  async row9(): Promise<void> {
    const src = await halfDataRaw(this.images.dir, this.cfg.sizes.big);
    // More pairs than the other rows: a convert takes about a second, and the host's
    // page-cache copies are bimodal here (BENCHMARKS session 6), so three pairs told
    // little (a 2 % cost of -p is far inside one slow sample).
    const pairs = Math.max(this.cfg.repeat, 7);
    const dst = path.join(this.work, 'convert-out.qcow2');
    const what = `convert -O qcow2 of a ${fmtSize(this.cfg.sizes.big)} raw image, half data (64 MiB runs) and half holes`;
    let load = loadAverage();
    const m = await this.compare(['tsmount', 'qsd'], [src], pairs, false, (s) => convertSeconds(s === 'tsmount' ? 'tsimg' : 'qemu-img', src, dst));
    this.report('9a', `tsimg ${what}, against qemu-img convert`, m, secs, load, '≥ 1.0', `tsmount column: tsimg; qsd column: qemu-img; ratio: qemu-img time / tsimg time; ${m.ratios.length} pairs`);
    load = loadAverage();
    const p = await this.compare(['tsmount', 'qsd'], [src], pairs, false, (s) => convertSeconds('tsimg', src, dst, s === 'tsmount' ? ['-p'] : []));
    const r = median(p.ratios);
    this.push(
      {
        id: '9b',
        what: `the cost of -p: tsimg ${what}, with -p against without`,
        tsmount: p.samples.tsmount.length ? secs(median(p.samples.tsmount)) : '—',
        qsd: p.samples.qsd.length ? secs(median(p.samples.qsd)) : '—',
        xmount: '—',
        ceiling: '—',
        cratio: '—',
        ratio: spread(p.ratios, 3),
        target: p.ratios.length ? `≥ 0.98 (-p costs under 2%): ${r >= 0.98 ? 'yes' : 'no'}` : '—',
        note: `tsmount column: tsimg -p; qsd column: tsimg without -p; ratio: time without / time with; ${p.ratios.length} pairs${p.failed.tsmount ? `; failed: ${p.failed.tsmount}` : ''}`,
      },
      load,
    );
  }

  /**
   * Row 11: both cores. Four readers at once on the fully allocated qcow2: tsmount as it
   * runs by default (FUSE worker threads) against tsmount serving every request on its
   * one JS thread (TSMOUNT_FUSE_WORKERS=0; its preads still run on libuv's pool), with
   * the ceiling server. 11a: random 4 KiB reads (the cost per request decides);
   * 11b: sequential 1 MiB reads, a quarter of the disk each (the cost per byte decides).
   */
  async row11(): Promise<void> {
    const img = await this.images.fullQcow2();
    const size = this.cfg.sizes.main;
    const cases: [string, string, (file: string) => Promise<number>, (x: number) => string][] = [
      ['11a', `both cores: random 4 KiB reads, fio psync, 4 jobs, ${this.cfg.fioRuntime} s, worker threads against one JS thread`, (f) => fio({ file: f, rw: 'randread', jobs: 4, size, runtime: this.cfg.fioRuntime }), iops],
      ['11b', `both cores: 4 sequential readers at once (dd bs=1M, a quarter each) of the ${fmtSize(size)} qcow2, worker threads against one JS thread`, (f) => ddReadParallel(f, size, 4), mbps],
    ];
    for (const [id, what, work, fmt] of cases) {
      const load = loadAverage();
      // The qsd slot carries the one-thread tsmount here; the ratio is workers / one thread.
      const m = await this.compare(['tsmount', 'qsd', 'ceiling'], [img], this.cfg.repeat, true, (s) =>
        withMount(s === 'qsd' ? 'tsmount' : s, this.request(s, img, 'qcow2', s === 'qsd' ? { env: { TSMOUNT_FUSE_WORKERS: '0' } } : {}), (mt) => work(mt.file)),
      );
      const r = median(m.ratios);
      this.push(
        {
          id,
          what,
          tsmount: m.samples.tsmount.length ? fmt(median(m.samples.tsmount)) : '—',
          qsd: m.samples.qsd.length ? fmt(median(m.samples.qsd)) : '—',
          xmount: '—',
          ceiling: m.samples.ceiling.length ? fmt(median(m.samples.ceiling)) : '—',
          cratio: spread(m.cratios),
          ratio: spread(m.ratios),
          target: m.ratios.length ? `workers past one thread (> 1.0): ${r > 1 ? 'yes' : 'no'}` : '—',
          note: `tsmount column: default (worker threads); qsd column: tsmount with TSMOUNT_FUSE_WORKERS=0; ratio: workers / one thread${m.failed.tsmount ? `; failed: ${m.failed.tsmount}` : ''}${m.failed.qsd ? `; one thread failed: ${m.failed.qsd}` : ''}`,
        },
        load,
      );
    }
  }

  /** Row 10: tsimg map --output json of a 1 TiB sparse qcow2 with scattered data, qemu-img map as the anchor. */
  async row10(): Promise<void> {
    const img = await scattered1T(this.images.dir);
    const load = loadAverage();
    const args = ['map', '--output', 'json', '-f', 'qcow2', img];
    const m = await this.compare(['tsmount', 'qsd'], [img], Math.max(this.cfg.repeat * 2, 4), false, (s) => (s === 'tsmount' ? tsimgSeconds(args) : qemuImgSeconds(args)));
    const t = median(m.samples.tsmount);
    const target = m.samples.tsmount.length ? `< 1 s: ${t < 1 ? 'yes' : 'no'}; ` : '';
    this.report('10', 'tsimg map --output json of a 1 TiB sparse qcow2, 64 KiB of data at 200 places, against qemu-img map', m, secs, load, `${target}≥ 1.0`, 'tsmount column: tsimg; qsd column: qemu-img; times include process start (node\'s too); ratio: qemu-img time / tsimg time');
  }
}

async function virtualSize(image: string, format: string): Promise<number> {
  return (await imageInfo(image, format))['virtual-size'];
}

function render(mach: Machine, cfg: BenchConfig, rows: Row[], loadStart: string, loadEnd: string, seconds: number, keptNotes: string): string {
  const esc = (s: string): string => s.replace(/\|/g, '\\|').replace(/\n/g, ' ');
  const lines = [
    '# tsmount benchmarks',
    '',
    `Written by \`npm run bench\` (scripts/bench.ts)${cfg.quick ? ' with --quick (small sizes, one repetition: a smoke run, not a result)' : ''}.`,
    'Each measurement mounts afresh (no page cache of the mounted file is reused); tsmount and',
    'qemu-storage-daemon (qsd) alternate which goes first; a row\'s ratio is the median of the',
    'per-repetition ratios tsmount speed / qsd speed, with the spread (min..max) in brackets.',
    ...(cfg.warmMemory > 0 ? [`Before each measurement ${fmtSize(cfg.warmMemory)} of tmpfs is filled and freed, and the kernel holds freed memory back from the hypervisor for the run, so both sides start on backed memory (tools.ts warmFreeMemory, holdFreeMemory; --no-warm-memory leaves both out).`] : []),
    `The image files are ${cfg.cold ? 'dropped from the host page cache before every measurement (--cold)' : 'read into the host page cache before each row (both servers start warm; --cold drops them instead)'}.`,
    '',
    `- date: ${mach.date}`,
    `- machine: ${mach.nproc} CPUs (\`nproc\`), ${mach.cpu}, ${mach.memory} RAM, kernel ${mach.kernel}`,
    `- software: node ${mach.node}, qemu-storage-daemon ${mach.qemu}, ${mach.fio}, ${mach.xmount}`,
    `- load average (1, 5, 15 min) at start: ${loadStart}; at end: ${loadEnd}`,
    `- repetitions: ${cfg.repeat}; rows: ${[...cfg.rows].join(',')}; run time ${(seconds / 60).toFixed(1)} min`,
    '',
    'The ceiling is scripts/bench/ceiling.c: a libfuse3 low-level server that serves memory (no storage) with',
    '1 MiB requests, built by the benchmark with gcc; it is the most any FUSE server can do on this machine.',
    'On the sequential write rows (3, 3o, 3r, 3ro, 3l) the ceiling column is instead the same dd straight into a',
    'host file on the same disk (no FUSE at all), and the ratio next to it is tsmount / dd.',
    '',
    '| row | what | tsmount | qsd | xmount | ceiling | tsmount/qsd median (min..max) | tsmount/ceiling median (min..max) | target | load avg | note |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows.map((r) => `| ${[r.id, r.what, r.tsmount, r.qsd, r.xmount, r.ceiling, r.ratio, r.cratio, r.target, r.load, r.note].map(esc).join(' | ')} |`),
    '',
    NOTES_MARKER,
    keptNotes.trimEnd(),
    '',
  ];
  return lines.join('\n');
}

function keptNotesOf(out: string | undefined): string {
  if (!out || !fs.existsSync(out)) return '\n## Notes\n\n(Analysis and profiles go here; this part survives re-runs.)\n';
  const text = fs.readFileSync(out, 'utf8');
  const i = text.indexOf(NOTES_MARKER);
  return i < 0 ? '' : text.slice(i + NOTES_MARKER.length);
}

export async function runBench(cfg: BenchConfig): Promise<Row[]> {
  const t0 = Date.now();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-tsmount-'));
  const imagesDir = cfg.imagesDir ? path.resolve(cfg.imagesDir) : path.join(work, 'images');
  // Freed memory stays backed while the rows run (tools.ts holdFreeMemory); put back at the end.
  const release = cfg.warmMemory > 0 ? holdFreeMemory() : () => undefined;
  const onSignal = (sig: NodeJS.Signals): void => {
    process.stderr.write(`\nbench: ${sig}, unmounting everything\n`);
    release();
    cleanupAll();
    removeWork(work);
    process.exit(130);
  };
  const onExit = (): void => {
    release();
    cleanupAll();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', onExit);
  try {
    const mach = await machine();
    const loadStart = loadAverage();
    const bench = new Bench(cfg, new Images(imagesDir, cfg.sizes), work);
    await bench.init();
    const rows: Record<number, () => Promise<void>> = {
      1: () => bench.row1(),
      2: () => bench.row2(),
      3: () => bench.row3(),
      4: () => bench.row4(),
      5: () => bench.row5(),
      6: () => bench.row6(),
      7: () => bench.row7(),
      8: () => bench.row8(),
      9: () => bench.row9(),
      10: () => bench.row10(),
      11: () => bench.row11(),
      12: () => bench.row12(),
      13: () => bench.row13(),
    };
    for (const n of ALL_ROWS) {
      if (!cfg.rows.has(n)) continue;
      process.stderr.write(`row ${n} (load ${loadAverage()})\n`);
      try {
        await rows[n]!();
      } catch (err) {
        // One broken row (a missing tool, a full disk) must not lose the others.
        bench.rows.push({ id: String(n), what: `row ${n}`, tsmount: '—', qsd: '—', xmount: '—', ceiling: '—', cratio: '—', ratio: '—', target: '—', note: `failed: ${err instanceof Error ? err.message : String(err)}`, load: loadAverage() });
        process.stderr.write(`  row ${n} failed: ${err instanceof Error ? err.message : String(err)}\n`);
      }
    }
    const text = render(mach, cfg, bench.rows, loadStart, loadAverage(), (Date.now() - t0) / 1000, keptNotesOf(cfg.out));
    if (cfg.out) fs.writeFileSync(cfg.out, text);
    else process.stdout.write(text);
    return bench.rows;
  } finally {
    release();
    cleanupAll();
    if (liveMounts() === 0) {
      if (cfg.imagesDir && !cfg.keepImages) {
        const written = ['write-tsmount.qcow2', 'write-qsd.qcow2', 'random-write.qcow2', 'over-3o.qcow2', 'over-3o.raw', 'over-3ro.raw', 'over-3l.luks', 'over-3l.raw'];
        for (const id of ['3', '3r']) for (const s of ['tsmount', 'qsd', 'dd']) written.push(`alloc-${id}-${s}.raw`);
        for (const f of written) fs.rmSync(path.join(imagesDir, f), { force: true });
      }
      removeWork(work);
    }
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('exit', onExit);
  }
}

/** Remove the work folder, but never while something is still mounted inside it. */
function removeWork(work: string): void {
  const mounts = fs.readFileSync('/proc/mounts', 'utf8');
  if (mounts.split('\n').some((l) => (l.split(' ')[1] ?? '').startsWith(work + path.sep))) {
    process.stderr.write(`bench: ${work} still has a mount in it; left in place\n`);
    return;
  }
  fs.rmSync(work, { recursive: true, force: true });
}

async function main(): Promise<void> {
  let cfg: BenchConfig;
  try {
    cfg = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`bench: ${(err as Error).message}\nusage: npm run bench -- [--quick] [--rows 1,2,...] [--repeat N] [--out FILE] [--images DIR] [--keep-images] [--cold] [--cpu-prof DIR] [--no-warm-memory]\n`);
    process.exit(2);
  }
  if (process.getuid?.() !== 0) process.stderr.write('bench: not root; FUSE mounts may fail\n');
  await runBench(cfg);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    cleanupAll();
    process.exit(1);
  });
}

export { parseArgs };
