#!/usr/bin/env node
// tsmount [options] IMAGE... MOUNTPOINT   |   tsmount -u MOUNTPOINT
//
// The command is tsmount-cli.ts; the detached server it hands a mount to starts at
// tsmount-server.cts. A command line that will likely start a server starts it here,
// before anything else loads (server-process.ts says why); the server waits on its
// ready channel for what to mount. Static imports stay tiny for that reason.
import { mayStartServer, startServer } from './server-process.js';
import { expandMountOptions } from './mount-options.js';

async function launch(argv: string[]): Promise<void> {
  // Every option also has an -o spelling (fstab, mount -t fuse.tsmount): rewritten first.
  const args = expandMountOptions(argv.slice(2));
  const early = mayStartServer(args) ? startServer(args) : undefined;
  await (await import('./tsmount-cli.js')).run([...argv.slice(0, 2), ...args], early);
}

void launch(process.argv);
