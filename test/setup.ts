// Root hooks for every test file: no FUSE mount may outlive the suite.
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';

function fuseMountsUnder(prefix: string): string[] {
  return fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f.length > 2 && /^fuse(\.|$)/.test(f[2] ?? '') && (f[1] ?? '').startsWith(prefix))
    .map((f) => (f[1] ?? '').replace(/\\040/g, ' '));
}

export const mochaHooks = {
  afterAll(): void {
    // This run's mounts live under its temp dirs (tempDir puts the pid in the name);
    // anything left there is a bug in a test. Other runs' mounts are theirs to judge.
    const stale = fuseMountsUnder(`/tmp/tsmount-${process.pid}-`);
    for (const m of stale) {
      try {
        execFileSync('umount', ['-l', m]);
      } catch {
        /* already gone */
      }
    }
    if (stale.length) throw new Error(`stale FUSE mounts left behind by the tests: ${stale.join(', ')}`);
  },
};
