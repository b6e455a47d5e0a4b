// Root hooks for every test file: no FUSE mount may outlive the suite.
import { execFileSync } from 'node:child_process';
import { config } from 'chai';
import { fuseMountsUnder } from './helpers/mount.js';

// A failing assertion prints its whole actual value: CI keeps only the log, and a cut
// error message (chai's default is 40 characters) leaves the cause unknown.
config.truncateThreshold = 0;

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
