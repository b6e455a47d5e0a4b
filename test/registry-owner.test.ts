// The registry seen by root for another user's mount (fs/mounts.ts stateOf): root's
// `tsmount -u` finds that user's state file in their usual runtime folders, and trusts
// the pid in it only when the process is that user's own (it is signalled).
import { expect } from 'chai';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { stateDirsFor, stateOf } from '../fs/mounts.js';

const isRoot = process.getuid?.() === 0;

describe('the registry: another user’s state file, read by root', function () {
  this.timeout(60_000);
  const user = `tsmreg-${process.pid}`.slice(0, 31);
  let uid = -1;
  let dir = '';
  let sleeper: ChildProcess | undefined;

  before(function () {
    if (!isRoot) this.skip();
    execFileSync('useradd', ['-M', '-N', '-s', '/usr/sbin/nologin', user]);
    uid = Number(execFileSync('id', ['-u', user], { encoding: 'utf8' }).trim());
    dir = `/tmp/tsmount-${uid}`;
    fs.mkdirSync(dir, { mode: 0o700 });
    fs.chownSync(dir, uid, 0);
    // A process of that user, standing in for its server.
    sleeper = spawn('setpriv', [`--reuid=${uid}`, '--regid=65534', '--clear-groups', 'sleep', '60'], { stdio: 'ignore' });
  });
  after(() => {
    sleeper?.kill('SIGKILL');
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
    if (uid >= 0) execFileSync('userdel', [user]);
  });

  const write = (pid: number): void => {
    fs.writeFileSync(path.join(dir, '0_4242.json'), JSON.stringify({ pid, mountpoint: '/mnt/theirs', images: ['/home/x/disk.qcow2'], rw: false, details: { reads: 1 } }));
  };

  it('finds it in /tmp/tsmount-UID when the folder is that user’s and nobody else may write it', async () => {
    await new Promise((r) => setTimeout(r, 300));
    expect(stateDirsFor(uid)).to.include(dir);
    write(sleeper!.pid!);
    const s = stateOf(uid, '0:4242', '/mnt/theirs');
    expect(s?.pid).to.equal(sleeper!.pid);
    // Another user's counters are not shown to root.
    expect(s?.details).to.equal(undefined);
    expect(stateOf(uid, '0:4242', '/mnt/elsewhere')).to.equal(undefined);
  });

  it('refuses a pid that is not that user’s process (root would signal it)', () => {
    write(process.pid);
    expect(stateOf(uid, '0:4242', '/mnt/theirs')).to.equal(undefined);
  });

  it('ignores the folder when others may write it, or someone else owns it', () => {
    write(sleeper!.pid!);
    fs.chmodSync(dir, 0o777);
    expect(stateDirsFor(uid)).to.not.include(dir);
    expect(stateOf(uid, '0:4242', '/mnt/theirs')).to.equal(undefined);
    fs.chmodSync(dir, 0o700);
    fs.chownSync(dir, 0, 0);
    expect(stateDirsFor(uid)).to.not.include(dir);
    fs.chownSync(dir, uid, 0);
    expect(stateOf(uid, '0:4242', '/mnt/theirs')?.pid).to.equal(sleeper!.pid);
  });
});
