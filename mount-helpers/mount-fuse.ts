#!/usr/bin/env node
// mount.fuse.tsmount: what mount(8) runs for `mount -t fuse.tsmount` and fstab lines of
// type fuse.tsmount, as `mount.fuse.tsmount SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]
// [-t TYPE]`. Installed also as `mount.fuse` would call it. It turns that into a tsmount
// command line (every option has an -o spelling: mount-options.ts) and runs tsmount,
// which returns once the mount is ready.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function fail(msg: string): never {
  process.stderr.write(`mount.fuse.tsmount: ${msg}\n`);
  process.exit(1);
}

/** tsmount's arguments for mount(8)'s helper arguments. */
function helperArgs(argv: string[]): string[] {
  const positional: string[] = [];
  const options: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-o') options.push(argv[++i] ?? '');
    else if (a.startsWith('-o')) options.push(a.slice(2));
    else if (a === '-t') {
      // `-t fuse.tsmount` (or the subtype alone): nothing else can come here.
      const type = argv[++i] ?? '';
      if (!['fuse.tsmount', 'tsmount', 'fuseblk.tsmount'].includes(type)) fail(`type '${type}' is not tsmount's`);
    } else if (a === '-N') i++; // a mount namespace: mount(8) has entered it already
    else if (/^-[sfnvrw]+$/.test(a)) continue; // sloppy, fake, no mtab, verbose: nothing to do here
    else positional.push(a);
  }
  if (positional.length !== 2) fail('usage: mount.fuse.tsmount IMAGE MOUNTPOINT [-o OPTIONS]');
  // `tsmount#IMAGE` is how mount.fuse names the program and the source in one field.
  const source = positional[0]!.replace(/^tsmount#/, '');
  return [source, positional[1]!, ...options.filter(Boolean).flatMap((o) => ['-o', o])];
}

function main(): void {
  const args = helperArgs(process.argv.slice(2));
  const tsmount = path.join(path.dirname(fileURLToPath(import.meta.url)), 'tsmount.js');
  const child = spawn(process.execPath, [tsmount, ...args], { stdio: 'inherit' });
  child.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
  child.on('error', (err) => fail(err.message));
}

main();
