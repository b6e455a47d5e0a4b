// libgfapi (GlusterFS's client library, the one QEMU links) through koffi. Loaded on
// first use; every call that talks to the servers runs on a worker thread (koffi's
// async calls), so a slow brick never blocks the event loop. Signatures of
// glusterfs >= 6 (glfs.h: pread/pwrite/fsync/ftruncate carry pre/post stat pointers,
// which we pass as NULL); dlsym gives the default (newest) symbol version.
import koffi from 'koffi';
import { UnsupportedError } from '../../errors.js';

export type Ptr = unknown;

interface Fn {
  (...args: unknown[]): unknown;
  async(...args: unknown[]): void;
}

export interface Gfapi {
  glfs_new: Fn;
  glfs_set_volfile_server: Fn;
  glfs_set_logging: Fn;
  glfs_init: Fn;
  glfs_fini: Fn;
  glfs_open: Fn;
  glfs_creat: Fn;
  glfs_close: Fn;
  glfs_pread: Fn;
  glfs_pwrite: Fn;
  glfs_fstat: Fn;
  glfs_fsync: Fn;
  glfs_ftruncate: Fn;
  glfs_discard: Fn;
  glfs_zerofill: Fn;
  glfs_fallocate: Fn;
  glfs_unlink: Fn;
}

let loaded: Gfapi | undefined;

export function gfapi(): Gfapi {
  if (loaded) return loaded;
  let lib: ReturnType<typeof koffi.load>;
  try {
    lib = koffi.load('libgfapi.so.0');
  } catch {
    throw new UnsupportedError('gluster: libgfapi.so.0 is not installed (Debian: apt-get install libgfapi0)');
  }
  koffi.opaque('tsmount_glfs_t');
  koffi.opaque('tsmount_glfs_fd_t');
  const f = (sig: string): Fn => lib.func(sig) as unknown as Fn;
  loaded = {
    glfs_new: f('tsmount_glfs_t *glfs_new(const char *volname)'),
    glfs_set_volfile_server: f('int glfs_set_volfile_server(tsmount_glfs_t *fs, const char *transport, const char *host, int port)'),
    glfs_set_logging: f('int glfs_set_logging(tsmount_glfs_t *fs, const char *logfile, int loglevel)'),
    glfs_init: f('int glfs_init(tsmount_glfs_t *fs)'),
    glfs_fini: f('int glfs_fini(tsmount_glfs_t *fs)'),
    glfs_open: f('tsmount_glfs_fd_t *glfs_open(tsmount_glfs_t *fs, const char *path, int flags)'),
    glfs_creat: f('tsmount_glfs_fd_t *glfs_creat(tsmount_glfs_t *fs, const char *path, int flags, uint32_t mode)'),
    glfs_close: f('int glfs_close(tsmount_glfs_fd_t *fd)'),
    glfs_pread: f('int64_t glfs_pread(tsmount_glfs_fd_t *fd, void *buf, size_t count, int64_t offset, int flags, void *poststat)'),
    glfs_pwrite: f('int64_t glfs_pwrite(tsmount_glfs_fd_t *fd, const void *buf, size_t count, int64_t offset, int flags, void *prestat, void *poststat)'),
    // struct stat is filled into a plain buffer: st_size is at byte 48 on x86_64 and aarch64.
    glfs_fstat: f('int glfs_fstat(tsmount_glfs_fd_t *fd, void *st)'),
    glfs_fsync: f('int glfs_fsync(tsmount_glfs_fd_t *fd, void *prestat, void *poststat)'),
    glfs_ftruncate: f('int glfs_ftruncate(tsmount_glfs_fd_t *fd, int64_t length, void *prestat, void *poststat)'),
    glfs_discard: f('int glfs_discard(tsmount_glfs_fd_t *fd, int64_t offset, size_t len)'),
    glfs_zerofill: f('int glfs_zerofill(tsmount_glfs_fd_t *fd, int64_t offset, int64_t len)'),
    glfs_fallocate: f('int glfs_fallocate(tsmount_glfs_fd_t *fd, int keep_size, int64_t offset, size_t len)'),
    glfs_unlink: f('int glfs_unlink(tsmount_glfs_t *fs, const char *path)'),
  };
  return loaded;
}

export const STAT_BYTES = 256;
export const STAT_SIZE_OFFSET = 48;

/** Run a libgfapi call on a worker thread; resolves with its result and the errno it left. */
export function callAsync<T>(fn: Fn, ...args: unknown[]): Promise<{ ret: T; errno: number }> {
  return new Promise((resolve, reject) => {
    fn.async(...args, (err: unknown, ret: T) => {
      if (err) reject(err instanceof Error ? err : new Error(String(err)));
      else resolve({ ret, errno: koffi.errno() });
    });
  });
}
