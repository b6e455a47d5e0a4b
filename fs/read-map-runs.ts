// What the threads that answer READs from a read map share (fs/fuse-worker.ts, the
// /dev/fuse workers, and fs/fuse-uring.ts, the io_uring queues): a READ's range as runs
// of host-file bytes, ciphertext or zeros, those runs read (and decrypted) into a reply,
// and a WRITE written in place. Imports only the map's layout, so a worker loads nothing
// of the block graph (the cipher code only once a map names a cipher: ThreadCiphers).
import fs from 'node:fs';
import type { SectorCipher, SectorCipherSpec } from '../drivers/crypto/modes.js';
import type { WriteLog } from '../drivers/types.js';
import { INFLATE_SLACK, rawInflater, type Inflater } from '../drivers/util/raw-inflater.js';
import { libdeflate, type WholeInflater } from '../drivers/util/libdeflate.js';
import { libzstd } from '../drivers/util/libzstd.js';
import { countWritten, granuleOf, H_CHANGING, H_WRITABLE, H_WRITES_IN_FLIGHT, lookup, STREAM_DEFLATE_RAW, STREAM_VMDK_GRAIN, STREAM_ZSTD } from './read-map-table.js';

/**
 * Words per run in readRuns' output: fd (-1: zeros), host offset, length, cipher (0:
 * none; negative: a compressed cluster, its stream in the -cipher bytes at the host
 * offset, read-map-table.ts publish), and for a compressed run where in its cluster it
 * starts and the stream's kind (STREAM_*); 0 and 0 for the others.
 */
export const RUN = 6;

/** A compressed cluster's stream is read only up to this many times the cluster, and a grain marker (qcow2 counts at most a cluster and a sector; QEMU refuses a VMDK grain over twice the grain). */
export const MAX_COMPRESSED = 2;

/** A map's cipher as a reading thread holds it: sector n of it lies at ivBase + n * sectorSize. */
export interface RunCipher {
  cipher: SectorCipher;
  ivBase: number;
}

/**
 * A read map as the main thread hands it to the reading threads: the shared table, and
 * what its entries' cipher numbers n stand for (ciphers[n - 1]: the spec a thread makes
 * its own cipher from, and its ivBase). No ciphers: no entry has one.
 */
export interface MapShare {
  table: Int32Array;
  ciphers?: { spec: Readonly<SectorCipherSpec>; ivBase: number }[];
  /** Where a write around the file is recorded (BlockNode.writeLog: qcow2's persistent bitmaps). */
  log?: WriteLog;
}

/** This thread's write logs, by the table of the file they log (registered as maps arrive). */
const logs = new WeakMap<ArrayBufferLike, WriteLog>();

/** A map arrived in this thread (or was made, in the main thread): its log goes with its table. */
export function registerLog(share: MapShare): void {
  if (share.log) logs.set(share.table.buffer, share.log);
}

/** Bytes [offset, offset + size) of the file were written around the graph: their granules in its log. */
function logWrite(table: Int32Array, offset: number, size: number): void {
  const log = logs.get(table.buffer);
  if (!log) return;
  const first = Math.floor(offset / 2 ** log.granuleBits);
  const last = Math.floor((offset + size - 1) / 2 ** log.granuleBits);
  for (let g = first; g <= last; g++) Atomics.or(log.words, g >>> 5, 1 << (g & 31));
}

/**
 * A reading thread's ciphers, per file, made from the maps it is given. The cipher code
 * is loaded only once a map names a cipher (11 ms and 5 MiB per thread): the thread's
 * loop, which never yields, returns while `waiting`, awaits load(), and runs again.
 * Until then (and for good if the code cannot load here) the file's ciphertext is the
 * main thread's: fillRuns refuses a run of a cipher it is not given.
 */
export class ThreadCiphers {
  private readonly byFile = new Map<number, (RunCipher | undefined)[]>();
  private pending: Map<number, NonNullable<MapShare['ciphers']>> | null = new Map();
  private make: ((spec: SectorCipherSpec) => SectorCipher) | undefined;

  /** File `ino`'s map (again): its ciphers, if any. */
  got(ino: number, ciphers: MapShare['ciphers']): void {
    this.byFile.delete(ino);
    if (!ciphers) return;
    if (this.make) this.byFile.set(ino, this.list(ciphers));
    else this.pending?.set(ino, ciphers);
  }

  /** Whether a map waits for load(). */
  get waiting(): boolean {
    return !this.make && !!this.pending?.size;
  }

  async load(): Promise<void> {
    try {
      this.make = (await import('../drivers/crypto/modes.js')).makeSectorCipher;
    } catch {
      this.pending = null;
      return;
    }
    for (const [ino, ciphers] of this.pending!) this.byFile.set(ino, this.list(ciphers));
    this.pending!.clear();
  }

  /** File `ino`'s ciphers by the map's number (index 0 unused). */
  of(ino: number): readonly (RunCipher | undefined)[] | undefined {
    return this.byFile.get(ino);
  }

  /** One that cannot be made here stays out. */
  private list(ciphers: NonNullable<MapShare['ciphers']>): (RunCipher | undefined)[] {
    const out: (RunCipher | undefined)[] = [undefined];
    for (const c of ciphers) {
      try {
        out.push({ cipher: this.make!(c.spec), ivBase: c.ivBase });
      } catch {
        out.push(undefined);
      }
    }
    return out;
  }
}

/** What a reading thread's loop returns when a map's ciphers wait for ThreadCiphers.load(). */
export const NEED_CIPHERS = -1;

/**
 * The runs of [offset, offset + size) in `table`, RUN words each (fd, host offset,
 * length, cipher) in `runs`: granules that continue each other (zeros, or one file
 * contiguously under the same cipher) make one run. Returns the number of words
 * written, or -1 when a granule is not in the map (the main thread answers then). `hit`
 * is the caller's scratch for lookup(). `inPlace`: for a WRITE, every granule must be
 * writable in place (else -1).
 */
export function readRuns(table: Int32Array, offset: number, size: number, hit: number[], runs: number[], inPlace = false): number {
  const end = offset + size;
  const granule = granuleOf(table);
  let count = 0;
  let runFd = 0;
  let runHost = 0;
  let runCipher = 0;
  let runFrom = offset;
  let pos = offset;
  let open = false;
  while (pos < end) {
    const g = Math.floor(pos / granule);
    if (!lookup(table, g, hit) || (inPlace && hit[2] !== 1)) return -1;
    const next = Math.min(end, (g + 1) * granule);
    const fd = hit[0]!;
    const cipher = hit[3]!;
    if (cipher < 0) {
      // A compressed cluster is a run of its own: the whole stream at its host offset, and where in the cluster the run starts.
      if (open) count = putRun(runs, count, runFd, runHost, pos - runFrom, runCipher, 0, 0);
      open = false;
      count = putRun(runs, count, fd, hit[1]!, next - pos, cipher, pos - g * granule, hit[4]!);
      pos = next;
      continue;
    }
    const host = hit[1]! + (pos - g * granule);
    if (open && (fd !== runFd || cipher !== runCipher || (fd >= 0 && host !== runHost + (pos - runFrom)))) {
      count = putRun(runs, count, runFd, runHost, pos - runFrom, runCipher, 0, 0);
      open = false;
    }
    if (!open) {
      open = true;
      runFd = fd;
      runHost = host;
      runCipher = cipher;
      runFrom = pos;
    }
    pos = next;
  }
  if (open) count = putRun(runs, count, runFd, runHost, end - runFrom, runCipher, 0, 0);
  return count;
}

/** One run's RUN words into `runs` at `count`; returns the count after them. */
function putRun(runs: number[], count: number, fd: number, host: number, length: number, cipher: number, skip: number, stream: number): number {
  runs[count] = fd;
  runs[count + 1] = host;
  runs[count + 2] = length;
  runs[count + 3] = cipher;
  runs[count + 4] = skip;
  runs[count + 5] = stream;
  return count + RUN;
}

/**
 * The `count` words of runs (readRuns) read into `out` from `at` on, ciphertext
 * decrypted with `ciphers` (by the map's cipher number), compressed clusters of `unit`
 * bytes (the map's granule, granuleOf) inflated. False, for the main thread to answer,
 * on a short read or an error, for a run of a cipher this thread was not given or not
 * of whole sectors (a READ not aligned to them), and for a cluster that does not
 * inflate to exactly `unit` bytes (the main thread then gives the error it gives).
 */
export function fillRuns(runs: number[], count: number, out: Buffer, at: number, ciphers?: readonly (RunCipher | undefined)[], unit = 0): boolean {
  for (let i = 0; i < count; i += RUN) {
    const fd = runs[i]!;
    const host = runs[i + 1]!;
    const length = runs[i + 2]!;
    const c = runs[i + 3]!;
    if (c === 0) {
      if (!fillFromHost(fd, host, out, at, length)) return false;
    } else if (c < 0) {
      if (!inflateRun(fd, host, -c, runs[i + 5]!, runs[i + 4]!, unit, out, at, length)) return false;
    } else {
      const k = ciphers?.[c];
      const sector = sectorOf(host, length, k);
      if (sector < 0) return false;
      try {
        // Straight into the cipher's module memory where it has room: one copy fewer.
        const staged = k!.cipher.staging(length);
        if (staged) {
          if (!fillFromHost(fd, host, staged, 0, length)) return false;
          k!.cipher.decryptStaged(length, sector, out, at);
        } else {
          if (!fillFromHost(fd, host, out, at, length)) return false;
          k!.cipher.decrypt(out.subarray(at, at + length), sector);
        }
      } catch {
        return false;
      }
    }
    at += length;
  }
  return true;
}

/** This thread's inflaters, made at its first compressed cluster of each kind (raw-inflater.ts), and libdeflate's and libzstd's where they load (null: they do not). */
let rawDeflate: Inflater | undefined;
let zlibStream: Inflater | undefined;
let fastRaw: WholeInflater | null | undefined;
let fastZlib: WholeInflater | null | undefined;
let zstd: WholeInflater | null | undefined;
/** This thread's buffers for a cluster's compressed bytes and, when a READ takes part of it, the cluster (grown as needed). */
let packed = Buffer.alloc(0);
let cluster = Buffer.alloc(0);
/** A VMDK grain marker: the grain's sector (u64), then its stream's size (u32). */
export const VMDK_MARKER = 12;

/**
 * Bytes [skip, skip + length) of the `unit`-byte cluster whose stream of kind `stream`
 * lies in the `cLength` bytes at `host` in `fd` into `out` at `at`: raw deflate filling
 * them (fewer where the file ends first, as QEMU reads the last cluster of an image),
 * a VMDK grain marker and the zlib stream it sizes, or a zstd frame and what is left of
 * its last sector (libzstd only: decompress.ts decides the rest). False unless exactly `unit`
 * bytes come out. A cluster a READ takes whole inflates straight into the reply when
 * the reply has room for the slack past it.
 */
function inflateRun(fd: number, host: number, cLength: number, stream: number, skip: number, unit: number, out: Buffer, at: number, length: number): boolean {
  if (unit <= 0 || cLength <= 0 || cLength > MAX_COMPRESSED * unit + VMDK_MARKER || skip + length > unit) return false;
  if (stream !== STREAM_DEFLATE_RAW && stream !== STREAM_VMDK_GRAIN && stream !== STREAM_ZSTD) return false;
  if (packed.length < cLength) packed = Buffer.alloc(cLength);
  let got = 0;
  try {
    while (got < cLength) {
      const n = fs.readSync(fd, packed, got, cLength - got, host + got);
      if (n <= 0) break;
      got += n;
    }
  } catch {
    return false;
  }
  let input: Buffer;
  let fast: WholeInflater | null;
  if (stream === STREAM_VMDK_GRAIN) {
    if (got < VMDK_MARKER) return false;
    const size = packed.readUInt32LE(8);
    if (size === 0 || VMDK_MARKER + size > got) return false;
    input = packed.subarray(VMDK_MARKER, VMDK_MARKER + size);
    fast = fastZlib ??= libdeflate('zlib') ?? null;
  } else {
    if (got === 0) return false;
    input = packed.subarray(0, got);
    // zstd has only libzstd here: what it does not decode, the main thread decides.
    fast = stream === STREAM_ZSTD ? (zstd ??= libzstd() ?? null) : (fastRaw ??= libdeflate('raw') ?? null);
  }
  // Straight into the reply when the READ takes the cluster whole and the reply has room
  // past it: the room (the next run's place, filled after it) shows a stream that inflates
  // to more. libzstd needs none: it refuses a frame larger than its destination.
  const slack = stream === STREAM_ZSTD ? 0 : INFLATE_SLACK;
  const direct = skip === 0 && length === unit && out.length - at >= unit + slack;
  if (!direct && cluster.length < unit + slack) cluster = Buffer.alloc(unit + slack);
  const dst = direct ? out.subarray(at, at + unit + slack) : cluster.subarray(0, unit + slack);
  // libdeflate first; what it does not decode to exactly the cluster, zlib decides.
  if (!fast || fast(input, dst) !== unit) {
    if (stream === STREAM_ZSTD) return false;
    const inflate = stream === STREAM_VMDK_GRAIN ? (zlibStream ??= rawInflater('zlib')) : (rawDeflate ??= rawInflater('raw'));
    if (inflate(input, dst) !== unit) return false;
  }
  if (!direct) cluster.copy(out, at, skip, skip + length);
  return true;
}

/** `length` bytes at `at` in out: zeros (fd < 0) or the host file's bytes; false on a short read or an error. */
export function fillFromHost(fd: number, host: number, out: Uint8Array, at: number, length: number): boolean {
  if (fd < 0) {
    out.fill(0, at, at + length);
    return true;
  }
  let done = 0;
  try {
    while (done < length) {
      const n = fs.readSync(fd, out, at + done, length - done, host + done);
      if (n <= 0) return false;
      done += n;
    }
  } catch {
    return false;
  }
  return true;
}

/**
 * Whether the threads write in place at all: TSMOUNT_FUSE_WORKER_WRITES=0 hands every
 * WRITE to the main thread (for comparison: scripts/bench/ab.sh; the main thread then
 * keeps no map for writes either, fs/flatfs.ts). Read in each thread: a worker inherits
 * the server's environment.
 */
export const WORKER_WRITES = process.env.TSMOUNT_FUSE_WORKER_WRITES !== '0';

/**
 * A WRITE of [offset, offset + size), its bytes in `src` from `at`, straight into the
 * host files: only where every granule is published writable in place in the current
 * epoch, and only while the main thread changes nothing of the file (read-map-table.ts
 * says how the two sides keep out of each other's way). Counted, and the file marked
 * for the next flush, before the caller replies. False: the main thread writes it (all
 * of it again, if a host error stopped this halfway, and reports the error). A run of
 * ciphertext is encrypted first with the thread's copy of its cipher (`ciphers`, by the
 * map's number); without it, the main thread writes the WRITE.
 */
export function writeInPlace(table: Int32Array, offset: number, size: number, src: Buffer, at: number, hit: number[], runs: number[], ciphers?: readonly (RunCipher | undefined)[]): boolean {
  if (!WORKER_WRITES) return false;
  Atomics.add(table, H_WRITES_IN_FLIGHT, 1);
  try {
    if (Atomics.load(table, H_CHANGING) !== 0 || Atomics.load(table, H_WRITABLE) !== 1) return false;
    const count = readRuns(table, offset, size, hit, runs, true);
    if (count < 0) return false;
    // Ciphertext is written only by a thread given its cipher, in whole sectors: all checked before a byte is written.
    for (let i = 0; i < count; i += RUN) if (runs[i + 3] !== 0 && sectorOf(runs[i + 1]!, runs[i + 2]!, ciphers?.[runs[i + 3]!]) < 0) return false;
    for (let i = 0; i < count; i += RUN) {
      const c = runs[i + 3]!;
      const ok = c === 0 ? writeToHost(runs[i]!, runs[i + 1]!, src, at, runs[i + 2]!) : writeSealed(runs[i]!, runs[i + 1]!, src, at, runs[i + 2]!, ciphers![c]!);
      if (!ok) return false;
      at += runs[i + 2]!;
    }
    // Logged before the write counts as done (and before the reply): a close folds every bit of what was acknowledged.
    logWrite(table, offset, size);
    countWritten(table, size);
    return true;
  } finally {
    Atomics.sub(table, H_WRITES_IN_FLIGHT, 1);
  }
}

/** The first sector of `length` bytes of ciphertext at `host` under `k`, or -1: no cipher here, or not whole sectors. */
function sectorOf(host: number, length: number, k: RunCipher | undefined): number {
  if (!k) return -1;
  const unit = k.cipher.sectorSize;
  const sector = (host - k.ivBase) / unit;
  return Number.isInteger(sector) && sector >= 0 && length % unit === 0 ? sector : -1;
}

/** This thread's buffer for ciphertext on its way to the host file (grown as needed, never shrunk: at most a request). */
let sealed = Buffer.alloc(0);

/** `length` bytes of `src` from `at`, encrypted with `k`, written at `host` in `fd`; false on an error. */
function writeSealed(fd: number, host: number, src: Buffer, at: number, length: number, k: RunCipher): boolean {
  try {
    // Encrypted in the cipher's module memory and written from there where it can: two copies fewer.
    const staged = k.cipher.encryptStaged(src.subarray(at, at + length), sectorOf(host, length, k));
    if (staged) return writeToHost(fd, host, staged, 0, length);
  } catch {
    return false;
  }
  if (sealed.length < length) sealed = Buffer.alloc(length);
  const buf = sealed.subarray(0, length);
  src.copy(buf, 0, at, at + length);
  try {
    k.cipher.encrypt(buf, sectorOf(host, length, k));
  } catch {
    return false;
  }
  return writeToHost(fd, host, buf, 0, length);
}

/** `length` bytes from `src` at `at` written to `host` in `fd`; false on a short write or an error. */
function writeToHost(fd: number, host: number, src: Uint8Array, at: number, length: number): boolean {
  let done = 0;
  try {
    while (done < length) {
      const n = fs.writeSync(fd, src, at + done, length - done, host + done);
      if (n <= 0) return false;
      done += n;
    }
  } catch {
    return false;
  }
  return true;
}
