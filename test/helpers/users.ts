// A throwaway unprivileged user for tests that run as root: made with useradd, removed
// (with its tsmount runtime folder) in an after hook or, failing that, at process exit.
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { run, runOk, type RunResult } from './qemu.js';

export interface TestUser {
  name: string;
  uid: number;
  gid: number;
  /** Run a command as the user, without root's groups or runtime folder, HOME as given. */
  run(cmd: string, args: string[], opts?: { home?: string; timeoutMs?: number }): Promise<RunResult>;
  /** Remove the user (synchronous: also runs from the exit hook). Safe to call twice. */
  remove(): void;
}

export async function makeTestUser(): Promise<TestUser> {
  const name = `tsmount-test-${crypto.randomBytes(4).toString('hex')}`;
  // userdel removes the user's own group (-U) too.
  await runOk('useradd', ['-M', '-U', '-s', '/usr/sbin/nologin', name]);
  let made = true;
  const uid = Number((await runOk('id', ['-u', name])).trim());
  const gid = Number((await runOk('id', ['-g', name])).trim());
  const remove = (): void => {
    if (!made) return;
    made = false;
    try {
      execFileSync('userdel', [name], { stdio: 'ignore' });
    } catch {
      process.stderr.write(`test user: could not remove user ${name}\n`);
    }
    // tsmount's state folder for a user without XDG_RUNTIME_DIR.
    fs.rmSync(`/tmp/tsmount-${uid}`, { recursive: true, force: true });
  };
  process.once('exit', remove);
  return {
    name,
    uid,
    gid,
    remove,
    run: (cmd, args, opts = {}) => {
      const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: opts.home ?? '/nonexistent', LANG: 'C' };
      return run('setpriv', [`--reuid=${uid}`, `--regid=${gid}`, '--clear-groups', '--', cmd, ...args], { env, timeoutMs: opts.timeoutMs });
    },
  };
}
