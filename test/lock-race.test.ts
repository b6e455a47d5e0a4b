// Locking under load (issue 20): two tsmount processes and qemu-io race to open the
// same image read-write, round after round. At most one of them may win each round
// (QEMU's lock protocol may also leave none: each sees the other's lock); every loser
// fails with the lock error, nothing else. 30 rounds in CI, 1000 with TSMOUNT_SOAK=1
// (or TSMOUNT_LOCK_ROUNDS=N).
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, holdWithQemuIo, qemuIo, tempDir, checkImage, type QemuHolder } from './helpers/qemu.js';
import { mountedPid, MountTracker, tsmount } from './helpers/mount.js';
import { rng } from './helpers/corrupt.js';

const LOCK_ERROR = /Failed to get (shared )?"(consistent read|write|write unchanged|resize)" lock/;
const ROUNDS = Number(process.env.TSMOUNT_LOCK_ROUNDS ?? (process.env.TSMOUNT_SOAK ? 1000 : 30));

describe('locking under load: two tsmounts and qemu-io race for one image --rw', function () {
  this.timeout(ROUNDS * 30_000 + 60_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let holder: QemuHolder | undefined;
  before(() => (tmp = tempDir('lock-race')));
  afterEach(async () => {
    await mounts.cleanup();
    await holder?.stop();
    holder = undefined;
  });
  after(() => tmp.cleanup());

  it(`never two writers in ${ROUNDS} rounds; every loser is refused with the lock error`, async () => {
    const img = path.join(tmp.dir, 'race.qcow2');
    await createImage(img, 'qcow2', '16M');
    await qemuIo(img, 'qcow2', ['write -P 0x11 0 1M']);
    const mpA = path.join(tmp.dir, 'a');
    const mpB = path.join(tmp.dir, 'b');
    fs.mkdirSync(mpA);
    fs.mkdirSync(mpB);
    mounts.track(mpA);
    mounts.track(mpB);
    const won = { a: 0, b: 0, qemu: 0, none: 0 };
    const random = rng(Number(process.env.TSMOUNT_CRASH_SEED ?? 0x10c4));
    // About how long tsmount takes to reach its lock here: the spread of the delays.
    const t0 = Date.now();
    const probe = await tsmount(['--rw', img, mpA]);
    expect(probe.code, probe.stderr).to.equal(0);
    const spread = Math.max(200, Date.now() - t0);
    await mounts.unmount(mpA);
    mounts.track(mpA);
    for (let round = 0; round < ROUNDS; round++) {
      // qemu-io opens in a few milliseconds, tsmount after Node starts: each contender
      // waits a random while first, so that every order of arrival comes up.
      // qemu-io's wait spans twice tsmount's start-up, so it comes before, between and after them.
      const late = <T>(ms: number, f: () => Promise<T>): Promise<T> => new Promise((r) => setTimeout(r, Math.floor(random() * ms))).then(f);
      const [a, b, q] = await Promise.allSettled([
        late(spread / 4, () => tsmount(['--rw', img, mpA])),
        late(spread / 4, () => tsmount(['--rw', img, mpB])),
        late(2 * spread, () => holdWithQemuIo(img)),
      ]);
      if (q.status === 'fulfilled') holder = q.value;
      const winners: string[] = [];
      for (const [name, r, mp] of [['a', a, mpA], ['b', b, mpB]] as const) {
        if (r.status === 'rejected') throw r.reason;
        if (r.value.code === 0) {
          expect(mountedPid(mp), `round ${round}: tsmount ${name} said it mounted`).to.not.equal(undefined);
          winners.push(name);
        } else {
          expect(r.value.stderr, `round ${round}: tsmount ${name} lost for another reason`).to.match(LOCK_ERROR);
          expect(r.value.stderr.trim().split('\n'), 'one line').to.have.length(1);
        }
      }
      if (q.status === 'fulfilled') winners.push('qemu');
      else expect(String(q.reason), `round ${round}: qemu-io lost for another reason`).to.match(LOCK_ERROR);
      expect(winners, `round ${round}: writers at once`).to.have.length.at.most(1);
      if (winners.length === 0) won.none++;
      else won[winners[0] as 'a' | 'b' | 'qemu']++;
      // The winner writes, so a second writer would have had something to collide with.
      if (winners[0] === 'a' || winners[0] === 'b') {
        const mp = winners[0] === 'a' ? mpA : mpB;
        const fd = fs.openSync(path.join(mp, 'race.raw'), 'r+');
        fs.writeSync(fd, Buffer.alloc(4096, round & 0xff), 0, 4096, 4096 * (round % 256));
        fs.fsyncSync(fd);
        fs.closeSync(fd);
        await mounts.unmount(mp);
        mounts.track(mp);
      }
      await holder?.stop();
      holder = undefined;
    }
    console.log(`      ${ROUNDS} rounds: tsmount A won ${won.a}, tsmount B ${won.b}, qemu-io ${won.qemu}, nobody ${won.none}`);
    expect((await checkImage(img, 'qcow2')).code, 'qemu-img check').to.equal(0);
  });
});
