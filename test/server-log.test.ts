// The server's log (issue 19): debug namespaces (tsmount:fuse, tsmount:qcow2,
// tsmount:nbd, ...) go to the --log file when DEBUG names them or with --debug /
// -o debug, and the server logs one summary line when it exits: uptime and the
// counters tsmount --list shows.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, run, tempDir } from './helpers/qemu.js';
import { MountTracker, mountpointIn, TSMOUNT } from './helpers/mount.js';
import { startServer, type RunningServer } from './helpers/servers.js';

const KiB = 1024;
const MiB = 1 << 20;
const SUMMARY = /exiting: up [\d.]+ s: (\d+) I\/O requests \((\d+) reads, (\d+) writes\), (\d+) bytes read, (\d+) bytes written, (\d+) errors, cache (\d+) hits \/ (\d+) misses$/m;

describe('server log: debug namespaces into --log, and a summary line at exit', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let server: RunningServer | undefined;
  before(() => (tmp = tempDir('server-log')));
  afterEach(async () => {
    await mounts.cleanup();
    await server?.stop();
    server = undefined;
  });
  after(() => tmp.cleanup());

  /** tsmount with an environment of our choosing (DEBUG), its mountpoint tracked. */
  async function mountWith(args: string[], env: NodeJS.ProcessEnv): Promise<string> {
    const mp = args[args.length - 1]!;
    mounts.track(mp);
    const r = await run(process.execPath, [TSMOUNT, ...args], { env });
    if (r.code !== 0) throw new Error(`tsmount ${args.join(' ')}: ${r.stderr.trim()}`);
    return mp;
  }

  const noDebugEnv = (): NodeJS.ProcessEnv => {
    const env = { ...process.env };
    delete env.DEBUG;
    return env;
  };

  /** Namespaces that wrote to the log: "2026-...Z tsmount:fuse ..." lines. */
  const namespaces = (log: string): Set<string> => new Set([...log.matchAll(/^\S+Z (tsmount:[\w-]+) /gm)].map((m) => m[1]!));

  it('-o debug,log=FILE: tsmount:* lines in the file; the summary counts what was read and written', async () => {
    const img = path.join(tmp.dir, 'd.qcow2');
    await createImage(img, 'qcow2', 8 * MiB);
    const logFile = path.join(tmp.dir, 'debug.log');
    const mp = mountpointIn(tmp.dir, 'dbg');
    await mountWith(['--rw', '-o', `debug,log=${logFile}`, img, mp], noDebugEnv());
    const flat = path.join(mp, 'd.raw');
    const fd = fs.openSync(flat, 'r+');
    fs.writeSync(fd, Buffer.alloc(64 * KiB, 0x5a), 0, 64 * KiB, MiB);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.readFileSync(flat);
    await mounts.unmount(mp);
    const log = fs.readFileSync(logFile, 'utf8');
    const ns = namespaces(log);
    for (const want of ['tsmount:fuse', 'tsmount:qcow2', 'tsmount:server']) expect(ns.has(want), `${want} in ${[...ns].join(' ')}`).to.equal(true);
    const m = SUMMARY.exec(log);
    expect(m, log.slice(-2000)).to.not.equal(null);
    const [, requests, reads, writes, bytesRead, bytesWritten, errors] = m!.slice(0, 7).map(Number);
    expect(requests).to.equal(reads! + writes!);
    expect(writes).to.be.greaterThan(0);
    expect(bytesWritten).to.be.at.least(64 * KiB);
    expect(bytesRead).to.be.at.least(8 * MiB - 64 * KiB);
    expect(errors).to.equal(0);
    expect(log.trim().split('\n').pop()).to.match(/unmounted$/);
  });

  it('DEBUG=tsmount:nbd: only that namespace (an NBD export from qemu-nbd); without DEBUG or --debug, no debug lines but the summary', async () => {
    const raw = path.join(tmp.dir, 'export.raw');
    fs.writeFileSync(raw, Buffer.alloc(MiB, 0x11));
    const sock = path.join(tmp.dir, 'nbd.sock');
    server = await startServer('qemu-nbd', ['-t', '-r', '-f', 'raw', '-k', sock, raw], { path: sock });
    const logFile = path.join(tmp.dir, 'nbd.log');
    const mp = mountpointIn(tmp.dir, 'nbd');
    await mountWith(['--log', logFile, `nbd+unix:///?socket=${sock}`, mp], { ...noDebugEnv(), DEBUG: 'tsmount:nbd' });
    fs.readFileSync(path.join(mp, fs.readdirSync(mp)[0]!));
    await mounts.unmount(mp);
    const log = fs.readFileSync(logFile, 'utf8');
    expect([...namespaces(log)]).to.deep.equal(['tsmount:nbd']);
    expect(log).to.match(/tsmount:nbd \S+: 1 connection\(s\), 1048576 bytes/);
    expect(log).to.match(SUMMARY);

    const img = path.join(tmp.dir, 'quiet.qcow2');
    await createImage(img, 'qcow2', MiB);
    const quietLog = path.join(tmp.dir, 'quiet.log');
    const mp2 = mountpointIn(tmp.dir, 'quiet');
    await mountWith(['--log', quietLog, img, mp2], noDebugEnv());
    fs.readFileSync(path.join(mp2, 'quiet.raw'));
    await mounts.unmount(mp2);
    const quiet = fs.readFileSync(quietLog, 'utf8');
    expect([...namespaces(quiet)]).to.deep.equal([]);
    const q = SUMMARY.exec(quiet);
    expect(q, quiet).to.not.equal(null);
    expect(Number(q![4])).to.be.at.least(MiB);
  });
});
