// The format registry loads a driver only when an image of its format is opened or
// created, and tsimg loads a subcommand's module only when it runs: the start-up of
// `tsimg --version`, `info` or `map` does not pay for every format, codec and cipher.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatDrivers } from '../drivers/format/index.js';
import { run, runOk, tempDir } from './helpers/qemu.js';
import { TSIMG } from './helpers/images.js';

const REGISTER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), 'helpers/load-trace-register.js');

/** The modules a tsimg command imports, as paths under dist/ or package names. */
async function modulesLoaded(args: string[], dir: string): Promise<string[]> {
  const trace = path.join(dir, `trace-${args[0]}.txt`);
  fs.rmSync(trace, { force: true });
  const r = await run(process.execPath, ['--import', REGISTER, TSIMG, ...args], { cwd: dir, env: { ...process.env, DEBUG: '', TSMOUNT_LOAD_TRACE: trace } });
  expect(r.code, r.stderr).to.equal(0);
  const dist = path.resolve(path.dirname(TSIMG), '..');
  return fs
    .readFileSync(trace, 'utf8')
    .split('\n')
    .filter((u) => u.startsWith('file:'))
    .map((u) => fileURLToPath(u))
    .map((p) => (p.includes('/node_modules/') ? p.replace(/^.*\/node_modules\/([^/]+).*$/, '$1') : path.relative(dist, p)));
}

describe('format registry: lazy drivers', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('format-registry')));
  after(() => t.cleanup());

  it("each entry's driver has the entry's name, probe and tail", async () => {
    for (const [name, entry] of formatDrivers) {
      const driver = await entry.load();
      expect(driver.name).to.equal(name);
      expect(driver.probe, name).to.equal(entry.probe);
      expect(driver.tailBytes, name).to.equal(entry.tailBytes);
    }
  });

  it('tsimg --version loads no driver, no codec, no FFI', async () => {
    const mods = await modulesLoaded(['--version'], t.dir);
    expect(mods.filter((m) => m.startsWith('drivers/format/') || m.startsWith('drivers/protocol/') || m.startsWith('drivers/util/'))).to.deep.equal([]);
    for (const pkg of ['koffi', 'cli-progress', 'hash-wasm', 'fzstd', 'seek-bzip', 'ssh2', 'debug']) expect(mods).to.not.include(pkg);
  });

  it('tsimg info and map of a qcow2 load the qcow2 driver and no other', async () => {
    const img = path.join(t.dir, 'a.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    for (const cmd of ['info', 'map']) {
      const mods = await modulesLoaded([cmd, '--output', 'json', img], t.dir);
      const drivers = new Set(mods.filter((m) => /^drivers\/format\/[^/]+\/index\.js$/.test(m)).map((m) => m.split('/')[2]));
      expect([...drivers], cmd).to.deep.equal(['qcow2']);
      // No cipher, no codec and no debug package for an unencrypted image read with debug output off.
      for (const pkg of ['hash-wasm', 'ssh2', 'fzstd', 'seek-bzip', 'debug']) expect(mods, cmd).to.not.include(pkg);
      expect(mods.filter((m) => m.startsWith('drivers/crypto/') && m !== 'drivers/crypto/magic.js'), cmd).to.deep.equal([]);
    }
  });
});
