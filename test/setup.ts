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
    // Test mounts live under the temp dir; anything left there is a bug in a test.
    const stale = fuseMountsUnder('/tmp/tsmount-');
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
