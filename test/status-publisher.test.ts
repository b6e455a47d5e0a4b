// The counters tsmount --list shows are written into the mount's state file every
// second. Off the JS thread (fs/status.ts, mounts.ts updateStateAsync): /run is a
// journalled disk on some machines, where one rename waited 161 ms for the journal
// while a writer fsynced through the mount. The file appears, changes only when the
// counters do, and once stopped nothing writes it again, even a write in flight.
import { expect } from 'chai';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { newCounters } from '../drivers/filters/counting.js';
import type { MountState } from '../fs/mounts.js';
import { StatusPublisher } from '../fs/status.js';

describe('status publisher (the counters in the state file)', () => {
  let dir: string;
  beforeEach(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tsmount-status-'))));
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  function state(): MountState {
    return { pid: process.pid, mountpoint: '/mnt/x', images: ['a.qcow2'], rw: true, details: { files: [] } as unknown as MountState['details'] };
  }

  async function until(what: () => boolean): Promise<void> {
    for (let i = 0; i < 200 && !what(); i++) await new Promise((r) => setTimeout(r, 10));
    expect(what(), 'not written within 2 s').to.equal(true);
  }

  const read = (file: string): { details: { counters: { reads: number } } } => JSON.parse(fs.readFileSync(file, 'utf8'));

  it('writes the counters without blocking the caller, and again only when they changed', async () => {
    const file = path.join(dir, '0_40.json');
    const io = newCounters();
    const p = new StatusPublisher(file, state(), io, []);
    const renames: string[] = [];
    const real = fs.renameSync;
    fs.renameSync = ((a: fs.PathLike, b: fs.PathLike) => {
      renames.push(String(b));
      real(a, b);
    }) as typeof fs.renameSync;
    try {
      p.publish();
      expect(fs.existsSync(file), 'written before publish() returned: on this thread').to.equal(false);
      await until(() => fs.existsSync(file));
      await p.stop();
    } finally {
      fs.renameSync = real;
    }
    expect(renames, 'renameSync on the JS thread').to.deep.equal([]);
    expect(read(file).details.counters.reads).to.equal(0);
    expect(fs.readdirSync(dir)).to.deep.equal(['0_40.json']);

    const q = new StatusPublisher(file, state(), io, []);
    q.publish();
    await new Promise((r) => setTimeout(r, 50));
    const before = fs.statSync(file).mtimeMs;
    fs.utimesSync(file, 0, 0);
    q.publish(); // unchanged: not written
    await new Promise((r) => setTimeout(r, 50));
    expect(fs.statSync(file).mtimeMs).to.equal(0);
    io.reads = 7;
    q.publish();
    await until(() => read(file).details.counters.reads === 7);
    await q.stop();
    expect(read(file).details.counters.reads).to.equal(7);
    expect(before).to.be.greaterThan(0);
  });

  it('once stopped, a write in flight does not put back a file removed meanwhile, and nothing is left beside it', async () => {
    const file = path.join(dir, '0_41.json');
    const io = newCounters();
    const p = new StatusPublisher(file, state(), io, []);
    p.publish();
    const done = p.stop();
    fs.rmSync(file, { force: true }); // the exit path's forget()
    await done;
    p.publish();
    await new Promise((r) => setTimeout(r, 50));
    expect(fs.readdirSync(dir)).to.deep.equal([]);
  });
});
