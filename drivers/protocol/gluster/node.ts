// The GlusterFS protocol node: a file on a gluster volume through libgfapi (gfapi.ts).
// One glfs instance per server list, volume and log options is shared by every node of
// a chain (a backing file on the same volume costs no second connection to glusterd).
// libgfapi itself follows the volume's layout: on a replicated volume a brick that goes
// away is left behind by the replication translator, and the writer sees nothing.
import { constants as osc } from 'node:os';
import { IoError, UsageError } from '../../errors.js';
import type { TruncateOptions } from '../../types.js';
import { refusePreallocation } from '../../resize.js';
import { callAsync, gfapi, STAT_BYTES, STAT_SIZE_OFFSET, type Ptr } from './gfapi.js';
import { describeServers, formatGlusterUri, parseGlusterSpec, type GlusterTarget } from './uri.js';
import { inParallel, pieces } from '../parallel.js';
import { RemoteNode, remoteLog, SharedConnections, withDeadline } from '../remote-node.js';

const E = osc.errno;
const O_RDONLY = 0;
const O_RDWR = 2;
const O_CREAT = 0o100;
const O_TRUNC = 0o1000;
/** One glfs_pread/pwrite; larger requests become several in flight. */
const PIECE = 1 << 20;
/** Calls in flight per request (each holds a worker thread). */
const WINDOW = 3;
/** glfs_init against a server that does not answer retries for a long time; give up after this. */
const INIT_TIMEOUT_MS = 10_000;
/** How long an instance nobody uses waits for its next user before glfs_fini (GlusterVolumes.release). */
const LINGER_MS = 2000;

function errnoName(errno: number): string {
  const name = Object.entries(E).find(([, v]) => v === errno)?.[0];
  return name ?? `errno ${errno}`;
}

interface Volume {
  key: string;
  fs: Ptr;
  refs: number;
  /** libgfapi calls on this instance still running in a worker thread (some past their deadline). */
  calls: Set<Promise<unknown>>;
}

/** The glfs instances of one process, by servers, volume and log options; owned by the driver. */
export class GlusterVolumes {
  private readonly volumes = new SharedConnections<Volume>();
  /** Instances nobody uses, kept LINGER_MS for the next open of the same volume. */
  private readonly lingering = new Map<string, { v: Volume; timer: NodeJS.Timeout }>();

  constructor(readonly log: (msg: string) => void = remoteLog) {}

  async acquire(t: GlusterTarget, name: string): Promise<Volume> {
    if (t.rdma) this.log(`${name}: warning: the rdma transport is deprecated, using tcp instead (as QEMU does)`);
    const key = formatGlusterUri({ ...t, path: '/' });
    const idle = this.lingering.get(key);
    if (idle) {
      clearTimeout(idle.timer);
      this.lingering.delete(key);
      return this.volumes.acquire(key, () => Promise.resolve(idle.v), () => true);
    }
    return this.volumes.acquire(key, () => this.connect(t, key, name), () => true);
  }

  /**
   * The last user of a volume gone, its glfs instance stays LINGER_MS for the next open
   * (tsimg create opens a volume twice in a row; an overlay and its backing file, one
   * after the other), then is freed with glfs_fini (each instance holds connections to
   * glusterd and the bricks, and threads). glfs_fini blocks for about 10 s while
   * libgfapi tears its threads down, so it runs on a worker thread, one at a time (see
   * fini), and only once every call on the instance has returned (a call past its
   * deadline may still be running there). The wait is unref'd: a process that ends
   * meanwhile does not wait for it (its files were closed and synced by then; the
   * connections end with the process), where qemu-img spends those 10 s at exit.
   */
  async release(v: Volume): Promise<void> {
    this.volumes.release(v.key, v, () => {
      const timer = setTimeout(() => {
        if (this.lingering.get(v.key)?.v === v) this.lingering.delete(v.key);
        void Promise.allSettled([...v.calls]).then(() => fini(v.fs));
      }, LINGER_MS);
      timer.unref();
      const old = this.lingering.get(v.key);
      if (old) {
        clearTimeout(old.timer);
        void Promise.allSettled([...old.v.calls]).then(() => fini(old.v.fs));
      }
      this.lingering.set(v.key, { v, timer });
    });
  }

  /** A libgfapi call on one of the volume's files, counted until it returns. */
  static track<T>(v: Volume, call: Promise<T>): Promise<T> {
    v.calls.add(call);
    const done = (): void => void v.calls.delete(call);
    call.then(done, done);
    return call;
  }

  private async connect(t: GlusterTarget, key: string, name: string): Promise<Volume> {
    const g = gfapi();
    const fs = g.glfs_new(t.volume);
    if (!fs) throw new IoError(`${name}: glfs_new failed for volume '${t.volume}'`, E.ENOMEM);
    const where = describeServers(t);
    try {
      for (const s of t.servers) {
        const r = s.type === 'unix' ? g.glfs_set_volfile_server(fs, 'unix', s.socket, 0) : g.glfs_set_volfile_server(fs, 'tcp', s.host, s.port);
        if (r !== 0) throw new UsageError(`${name}: libgfapi refused the server ${s.type === 'unix' ? s.socket : s.host}`);
      }
      if (g.glfs_set_logging(fs, t.logfile, t.debug) !== 0) throw new UsageError(`${name}: libgfapi cannot log to '${t.logfile}'`);
    } catch (err) {
      void fini(fs);
      throw err;
    }
    const init = callAsync<number>(g.glfs_init, fs);
    let result: { ret: number; errno: number };
    try {
      result = await withDeadline(init, INIT_TIMEOUT_MS, () => new UsageError(`${name}: no answer from glusterd at ${where} within ${INIT_TIMEOUT_MS / 1000} s`));
    } catch (err) {
      // The init goes on in its worker thread: free the instance once it gives up.
      void init.then(() => fini(fs), () => undefined);
      throw err;
    }
    if (result.ret !== 0) {
      void fini(fs);
      const why =
        result.errno === E.ENOENT ? `glusterd has no volume '${t.volume}' (or it is not started)` : result.errno === E.ENOTCONN ? `glusterd unreachable (ENOTCONN)` : errnoName(result.errno);
      throw new UsageError(`${name}: cannot connect to gluster volume '${t.volume}' at ${where}: ${why}`);
    }
    return { key, fs, refs: 0, calls: new Set() };
  }
}

/** The glfs_fini calls of the process, one after another (fini below). */
let finis: Promise<void> = Promise.resolve();

/**
 * Free a glfs instance. glfs_fini blocks its thread for about 10 s here (libgfapi's
 * teardown), and it runs on libuv's thread pool (4 threads by default), which every
 * file read and write of the process shares: a few instances freed at once (volumes
 * opened and closed in turn) once left no thread for anything else, and the next
 * open's glfs_init waited out its deadline (seen in CI). So they run one at a time,
 * holding at most one thread of the pool.
 */
function fini(fs: Ptr): Promise<void> {
  const p = finis.then(() => callAsync<number>(gfapi().glfs_fini, fs)).then(
    () => undefined,
    () => undefined,
  );
  finis = p;
  return p;
}

export class GlusterNode extends RemoteNode {
  private constructor(
    name: string,
    private readonly volumes: GlusterVolumes,
    private readonly volume: Volume,
    private readonly fd: Ptr,
    private currentSize: number,
    readOnly: boolean,
    ignoreFlush: boolean,
  ) {
    super(name, readOnly, ignoreFlush);
  }

  static async open(spec: string, opts: { readOnly: boolean; ignoreFlush?: boolean }, volumes: GlusterVolumes): Promise<GlusterNode> {
    const t = parseGlusterSpec(spec);
    const v = await volumes.acquire(t, spec);
    try {
      const g = gfapi();
      const { ret: fd, errno } = await callAsync<Ptr>(g.glfs_open, v.fs, t.path, opts.readOnly ? O_RDONLY : O_RDWR);
      if (!fd) {
        if (errno === E.ENOENT) throw new UsageError(`${spec}: no such file on gluster volume '${t.volume}'`);
        throw new IoError(`${spec}: cannot open on the gluster volume: ${errnoName(errno)}`, errno || E.EIO);
      }
      const st = new Uint8Array(STAT_BYTES);
      const r = await callAsync<number>(g.glfs_fstat, fd, st);
      if (r.ret !== 0) {
        await callAsync(g.glfs_close, fd).catch(() => undefined);
        throw new IoError(`${spec}: cannot stat on the gluster volume: ${errnoName(r.errno)}`, r.errno || E.EIO);
      }
      const size = Number(new DataView(st.buffer).getBigInt64(STAT_SIZE_OFFSET, true));
      return new GlusterNode(spec, volumes, v, fd, size, opts.readOnly, !!opts.ignoreFlush);
    } catch (err) {
      await volumes.release(v);
      throw err;
    }
  }

  /** Make an empty file on the volume (tsimg create). */
  static async create(spec: string, volumes: GlusterVolumes): Promise<void> {
    const t = parseGlusterSpec(spec);
    const v = await volumes.acquire(t, spec);
    try {
      const g = gfapi();
      const { ret: fd, errno } = await callAsync<Ptr>(g.glfs_creat, v.fs, t.path, O_RDWR | O_CREAT | O_TRUNC, 0o644);
      if (!fd) throw new UsageError(`${spec}: cannot create on gluster volume '${t.volume}': ${errnoName(errno)}`);
      await callAsync(g.glfs_close, fd);
    } finally {
      await volumes.release(v);
    }
  }

  static async remove(spec: string, volumes: GlusterVolumes): Promise<void> {
    const t = parseGlusterSpec(spec);
    const v = await volumes.acquire(t, spec);
    try {
      await callAsync(gfapi().glfs_unlink, v.fs, t.path);
    } finally {
      await volumes.release(v);
    }
  }

  get size(): number {
    return this.currentSize;
  }

  /** One libgfapi call on a worker thread, bounded by the remote request timeout; -1 becomes IoError. */
  private async call(what: string, fn: keyof ReturnType<typeof gfapi>, ...args: unknown[]): Promise<number> {
    this.checkOpen();
    const done = GlusterVolumes.track(this.volume, callAsync<number | bigint>(gfapi()[fn], this.fd, ...args));
    const { ret, errno } = await this.bounded(done, () => new IoError(`${this.name}: gluster ${what}: no answer within ${this.timeoutMs / 1000} s`, E.EIO));
    const n = Number(ret);
    if (n < 0) throw new IoError(`${this.name}: gluster ${what} failed: ${errnoName(errno)}`, errno || E.EIO);
    return n;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    await inParallel(pieces(offset, this.inside(offset, dst), PIECE), WINDOW, async ([o, n]) => {
      // Into a buffer of our own: a call that times out may still complete later.
      const buf = new Uint8Array(n);
      let done = 0;
      while (done < n) {
        const got = await this.call(`read at ${o + done}`, 'glfs_pread', buf.subarray(done), n - done, o + done, 0, null);
        if (got === 0) break; // shorter than it was: the rest reads as zeros
        done += got;
      }
      buf.fill(0, done);
      dst.set(buf, o - offset);
    });
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    this.dirty = true;
    await inParallel(pieces(offset, src.length, PIECE), WINDOW, async ([o, n]) => {
      let done = 0;
      while (done < n) {
        const put = await this.call(`write at ${o + done}`, 'glfs_pwrite', src.subarray(o - offset + done, o - offset + n), n - done, o + done, 0, null, null);
        if (put === 0) throw new IoError(`${this.name}: gluster write at ${o + done} made no progress`);
        done += put;
      }
    });
    if (offset + src.length > this.currentSize) this.currentSize = offset + src.length;
  }

  /** glfs_discard (a hole, reading as zeros) where unmapping is allowed, else glfs_zerofill; zeros written where neither works. */
  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    this.dirty = true;
    const end = Math.min(offset + length, this.currentSize);
    if (end > offset) {
      try {
        if (unmap) await this.call(`discard at ${offset}`, 'glfs_discard', offset, end - offset);
        else await this.call(`zerofill at ${offset}`, 'glfs_zerofill', offset, end - offset);
      } catch (err) {
        if (!(err instanceof IoError) || (err.errno !== E.EOPNOTSUPP && err.errno !== E.ENOSYS && err.errno !== E.EINVAL)) throw err;
        await this.writeZeros(offset, end - offset, PIECE);
      }
    }
    // Past the end the file grows, as a write of zeros would.
    if (offset + length > this.currentSize) await this.truncate(offset + length);
  }

  /**
   * QEMU's qemu_gluster_do_truncate: glfs_ftruncate; growing with falloc is one
   * glfs_fallocate of the new area, with full a glfs_zerofill of it after the truncate;
   * preallocation does not shrink.
   */
  async truncate(size: number, o: TruncateOptions = {}): Promise<void> {
    const prealloc = o.prealloc ?? 'off';
    if (prealloc === 'metadata') refusePreallocation(o);
    const old = this.currentSize;
    if (prealloc !== 'off' && size < old) throw new UsageError('Cannot use preallocation for shrinking files');
    if (size === old) return;
    this.dirty = true;
    if (prealloc === 'falloc') {
      await this.call(`fallocate at ${old}`, 'glfs_fallocate', 0, old, size - old);
      this.currentSize = size;
      return;
    }
    await this.call(`truncate to ${size}`, 'glfs_ftruncate', size, null, null);
    this.currentSize = size;
    if (prealloc === 'full') await this.call(`zerofill at ${old}`, 'glfs_zerofill', old, size - old);
  }

  protected async sync(): Promise<void> {
    await this.call('fsync', 'glfs_fsync', null, null);
  }

  protected async disconnect(): Promise<void> {
    await GlusterVolumes.track(this.volume, callAsync(gfapi().glfs_close, this.fd)).catch(() => undefined);
    await this.volumes.release(this.volume);
  }
}
