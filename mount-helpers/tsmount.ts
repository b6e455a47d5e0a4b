#!/usr/bin/env node
// tsmount [options] IMAGE... MOUNTPOINT   |   tsmount -u MOUNTPOINT
//
// The command (tsmount-cli.ts) and the detached server it starts (serve.ts) are both
// this script. A command line that will likely start a server starts it here, before
// anything else loads (server-process.ts says why); the server waits on its ready
// channel for what to mount. Static imports stay tiny for that reason.
import { mayStartServer, SERVE_FLAG, startServer } from './server-process.js';
import { expandMountOptions } from './mount-options.js';

async function launch(argv: string[]): Promise<void> {
  if (argv[2] === SERVE_FLAG) {
    await (await import('./serve.js')).serveStarted(Number(argv[3]));
    return;
  }
  // Every option also has an -o spelling (fstab, mount -t fuse.tsmount): rewritten first.
  const args = expandMountOptions(argv.slice(2));
  const early = mayStartServer(args) ? startServer(args) : undefined;
  await (await import('./tsmount-cli.js')).run([...argv.slice(0, 2), ...args], early);
}

void launch(process.argv);
