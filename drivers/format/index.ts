// The format registry and probing (QEMU's bdrv_find_format / find_image_format).
import type { BlockNode, Creatable, FormatDriver, OpenOptions } from '../types.js';
import { UnsupportedError, UsageError } from '../errors.js';
import { rawDriver } from './raw.js';
import { probe as qcow2Probe } from './qcow2/probe.js';
import { probe as vmdkProbe } from './vmdk/probe.js';
import { probe as qedProbe } from './qed/probe.js';
import { probe as qcowProbe } from './qcow/probe.js';
import { probe as vdiProbe } from './vdi/probe.js';
import { probe as parallelsProbe } from './parallels/probe.js';
import { probe as vpcProbe } from './vpc/probe.js';
import { probe as vhdxProbe } from './vhdx/probe.js';
import { probe as luksProbe } from './luks/probe.js';
import { probe as dmgProbe, TAIL_BYTES as DMG_TAIL_BYTES } from './dmg/probe.js';
import { probe as bochsProbe } from './bochs/probe.js';
import { probe as cloopProbe, HEADER_BYTES as CLOOP_HEADER_BYTES } from './cloop/probe.js';

/**
 * A registered format: what probing and listing need (name, probe, tailBytes), and
 * the driver itself, imported the first time an image of the format is opened or
 * created. A driver module brings its tables, ciphers and codecs with it, so loading
 * them all would cost every command (`tsimg --version` included) for the one format
 * it opens. Each probe is a small module of its own, shared with the driver.
 */
export interface FormatEntry extends FormatDriver {
  /** The driver module's own object, with create() and its options where it has them. */
  load(): Promise<FormatDriver & Partial<Creatable>>;
}

type Loaded = FormatDriver & Partial<Creatable>;

function lazy(name: string, probe: FormatDriver['probe'], load: () => Promise<Loaded>, tailBytes?: number): FormatEntry {
  let driver: Promise<Loaded> | undefined;
  const get = () => (driver ??= load());
  return { name, probe, tailBytes, load: get, open: async (file: BlockNode, opts: OpenOptions) => (await get()).open(file, opts) };
}

/** Raw is the last resort of every probe, and light: loaded at once. */
function loaded(d: Loaded): FormatEntry {
  return { ...d, load: async () => d };
}

/** Formats tsmount can open; one line each. */
const drivers: FormatEntry[] = [
  loaded(rawDriver),
  lazy('qcow2', qcow2Probe, async () => (await import('./qcow2/index.js')).qcow2Driver),
  lazy('vmdk', vmdkProbe, async () => (await import('./vmdk/index.js')).vmdkDriver),
  lazy('qed', qedProbe, async () => (await import('./qed/index.js')).qedDriver),
  lazy('qcow', qcowProbe, async () => (await import('./qcow/index.js')).qcowDriver),
  lazy('vdi', vdiProbe, async () => (await import('./vdi/index.js')).vdiDriver),
  lazy('parallels', parallelsProbe, async () => (await import('./parallels/index.js')).parallelsDriver),
  lazy('vpc', vpcProbe, async () => (await import('./vpc/index.js')).vpcDriver),
  lazy('vhdx', vhdxProbe, async () => (await import('./vhdx/index.js')).vhdxDriver),
  lazy('luks', luksProbe, async () => (await import('./luks/index.js')).luksDriver),
  lazy('dmg', dmgProbe, async () => (await import('./dmg/index.js')).dmgDriver, DMG_TAIL_BYTES),
  lazy('bochs', bochsProbe, async () => (await import('./bochs/index.js')).bochsDriver),
  lazy('cloop', cloopProbe, async () => (await import('./cloop/index.js')).cloopDriver, CLOOP_HEADER_BYTES),
];

/** Formats tsmount can open, by QEMU's driver name. */
export const formatDrivers: ReadonlyMap<string, FormatEntry> = new Map(drivers.map((d) => [d.name, d]));

/** Bytes read from the start of an image for probing. */
export const PROBE_BYTES = 4096;
/** Bytes read from the end of an image for probing: as many as any driver asks. */
export const PROBE_TAIL_BYTES = Math.max(0, ...drivers.map((d) => d.tailBytes ?? 0));

/**
 * Signatures of formats QEMU knows and tsmount does not open yet. Recognising them
 * keeps such an image from being taken for raw (and written to as raw).
 */
const knownSignatures: { name: string; test: (h: Uint8Array) => boolean }[] = [
];

function ascii(h: Uint8Array, off: number, len: number): string {
  return off + len <= h.length ? String.fromCharCode(...h.subarray(off, off + len)) : '';
}

function be32(h: Uint8Array, off: number): number {
  return off + 4 <= h.length ? new DataView(h.buffer, h.byteOffset + off, 4).getUint32(0, false) : -1;
}

export function formatByName(name: string): FormatEntry {
  const d = formatDrivers.get(name);
  if (d) return d;
  if (knownSignatures.some((s) => s.name === name)) throw new UnsupportedError(`format '${name}' is not supported yet`);
  throw new UsageError(`unknown format '${name}' (known: ${[...formatDrivers.keys()].join(', ')})`);
}

/** The driver that claims the image best; raw only when nothing else does. */
export function probeFormat(head: Uint8Array, filename: string, tail?: Uint8Array): FormatEntry {
  const raw = formatDrivers.get('raw')!;
  let best = raw;
  let bestScore = 0;
  for (const d of formatDrivers.values()) {
    const score = d.probe(head, filename, tail);
    if (score > bestScore) {
      best = d;
      bestScore = score;
    }
  }
  if (best === raw) {
    const other = knownSignatures.find((s) => s.test(head));
    if (other) throw new UnsupportedError(`${filename}: looks like a ${other.name} image, a format tsmount does not open yet`);
  }
  return best;
}
