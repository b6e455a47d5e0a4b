// Root hooks for every test file: no FUSE mount may outlive the suite.
import { execFileSync } from 'node:child_process';
import { fuseMountsUnder } from './helpers/mount.js';


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
