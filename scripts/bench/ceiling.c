// The FUSE ceiling of this machine (issue 21): a file system on libfuse3's low-level
// API that serves memory, no storage at all. Mounted over a regular file like
// tsmount's and qemu-storage-daemon's exports, it answers READ from one static 1 MiB
// buffer and WRITE by counting the bytes: what remains is the kernel, /dev/fuse and
// libfuse's own loop. scripts/bench.ts builds it with gcc and pkg-config fuse3.
//
//   ceiling SIZE MOUNTPOINT [--single] [--direct] [--file PATH]
//
// --single: one thread (fuse_session_loop) instead of libfuse's worker threads.
// --direct: FOPEN_DIRECT_IO on every open; otherwise the page cache is kept
//   (FOPEN_KEEP_CACHE), as tsmount does for files that cannot change.
// --file PATH: not memory but PATH, a raw image: READ preads it into a per-thread buffer,
//   WRITE pwrites it. The same storage work as tsmount's on a raw image, done in C on
//   libfuse3 (an anchor for the random 4 KiB rows, not the ceiling: scripts/bench/ab.sh
//   says how to run it).
// It runs in the foreground until the mount goes away (umount, fusermount3 -u) or a
// signal.
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#define MAX_IO (1024 * 1024)

static char data[MAX_IO];
static off_t disk_size;
static int direct_io;
static int file_fd = -1;
/* --file: each libfuse thread's read buffer, made on its first READ (not in static TLS,
   which every new thread would zero) and freed when the thread ends. */
static __thread char *file_buf;
static pthread_key_t file_buf_key;

static void fill_stat(struct stat *st) {
  memset(st, 0, sizeof(*st));
  st->st_ino = FUSE_ROOT_ID;
  st->st_mode = S_IFREG | 0644;
  st->st_nlink = 1;
  st->st_uid = getuid();
  st->st_gid = getgid();
  st->st_size = disk_size;
  st->st_blksize = 4096;
  st->st_blocks = disk_size / 512;
}

static void op_init(void *userdata, struct fuse_conn_info *conn) {
  (void)userdata;
  // 1 MiB requests, as tsmount negotiates (FUSE_MAX_PAGES is libfuse's default here).
  conn->max_write = MAX_IO;
  conn->max_readahead = MAX_IO;
  conn->want |= FUSE_CAP_ASYNC_READ | FUSE_CAP_ASYNC_DIO;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)fi;
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  struct stat st;
  fill_stat(&st);
  fuse_reply_attr(req, &st, 1.0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
  (void)attr;
  (void)to_set;
  op_getattr(req, ino, fi);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  if (ino != FUSE_ROOT_ID) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  fi->direct_io = direct_io;
  fi->keep_cache = !direct_io;
  fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  if (off >= disk_size) size = 0;
  else if ((off_t)size > disk_size - off) size = disk_size - off;
  if (size > MAX_IO) size = MAX_IO;
  if (file_fd >= 0) {
    if (!file_buf) {
      if (posix_memalign((void **)&file_buf, 4096, MAX_IO) != 0) {
        file_buf = NULL;
        fuse_reply_err(req, ENOMEM);
        return;
      }
      pthread_setspecific(file_buf_key, file_buf);
    }
    ssize_t n = pread(file_fd, file_buf, size, off);
    if (n < 0) fuse_reply_err(req, errno);
    else fuse_reply_buf(req, file_buf, n);
    return;
  }
  fuse_reply_buf(req, data, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  if (off >= disk_size) {
    fuse_reply_err(req, ENOSPC);
    return;
  }
  if ((off_t)size > disk_size - off) size = disk_size - off;
  if (file_fd >= 0) {
    ssize_t n = pwrite(file_fd, buf, size, off);
    if (n < 0) {
      fuse_reply_err(req, errno);
      return;
    }
    size = n;
  }
  fuse_reply_write(req, size);
}

static void op_ok(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  (void)ino;
  (void)fi;
  fuse_reply_err(req, 0);
}

/* --file: an fsync reaches the file, as tsmount's does (the random-write A/B ends in one). */
static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
  if (file_fd >= 0 && (datasync ? fdatasync(file_fd) : fsync(file_fd)) < 0) {
    fuse_reply_err(req, errno);
    return;
  }
  op_ok(req, ino, fi);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_ok,
    .release = op_ok,
    .fsync = op_fsync,
};

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s SIZE MOUNTPOINT [--single] [--direct] [--file PATH]\n", argv[0]);
    return 2;
  }
  disk_size = strtoll(argv[1], NULL, 10);
  const char *mountpoint = argv[2];
  int single = 0;
  for (int i = 3; i < argc; i++) {
    if (strcmp(argv[i], "--single") == 0) single = 1;
    else if (strcmp(argv[i], "--direct") == 0) direct_io = 1;
    else if (strcmp(argv[i], "--file") == 0 && i + 1 < argc) {
      file_fd = open(argv[++i], O_RDWR);
      pthread_key_create(&file_buf_key, free);
      if (file_fd < 0) {
        perror(argv[i]);
        return 2;
      }
    }
    else {
      fprintf(stderr, "%s: unknown option %s\n", argv[0], argv[i]);
      return 2;
    }
  }
  // Something other than zeros, so a reader cannot be shortcut by zero detection.
  for (size_t i = 0; i < sizeof(data); i++) data[i] = (char)(i * 7 + 1);
  char *fargv[] = {argv[0], "-o", "fsname=ceiling,subtype=ceiling,default_permissions", NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
  struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
  if (!se) return 1;
  if (fuse_set_signal_handlers(se) != 0) return 1;
  if (fuse_session_mount(se, mountpoint) != 0) return 1;
  int ret;
  if (single) {
    ret = fuse_session_loop(se);
  } else {
    struct fuse_loop_config cfg = {.clone_fd = 0, .max_idle_threads = 10};
    ret = fuse_session_loop_mt(se, &cfg);
  }
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  fuse_session_destroy(se);
  return ret ? 1 : 0;
}
