// The detached server's entry: `node tsmount-server.cjs STARTER-PID -- ARGS...`, started
// by the command (server-process.ts; ARGS are only for ps). CommonJS on purpose: for an
// ES module entry Node starts libuv's thread pool (to read the module files) before any
// of the module's code runs, and PR_SET_IO_FLUSHER reaches only the threads a thread
// starts after setting it (drivers/util/sys.ts says why the server wants it). Here it
// is set first, koffi loaded synchronously; the pool's threads, which do the image's
// reads and writes, start with the import below and inherit it.
import koffi = require('koffi');

const PR_SET_IO_FLUSHER = 57;

function setIoFlusher(): number {
  try {
    const prctl = koffi.load('libc.so.6').func('int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)');
    return (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) as number) === 0 ? 0 : koffi.errno();
  } catch {
    return -1;
  }
}

const ioFlusher = setIoFlusher();
void import('./serve.js').then((m) => m.serveStarted(Number(process.argv[2]), ioFlusher));
