// The format registry and probing (QEMU's bdrv_find_format / find_image_format).
import type { FormatDriver } from '../types.js';
import { UnsupportedError, UsageError } from '../errors.js';
import { rawDriver } from './raw.js';
import { qcow2Driver } from './qcow2/index.js';
import { vmdkDriver } from './vmdk/index.js';
import { qedDriver } from './qed/index.js';
import { qcowDriver } from './qcow/index.js';
import { vdiDriver } from './vdi/index.js';
import { parallelsDriver } from './parallels/index.js';
import { vpcDriver } from './vpc/index.js';
import { vhdxDriver } from './vhdx/index.js';
import { luksDriver } from './luks/index.js';
import { dmgDriver } from './dmg/index.js';
import { bochsDriver } from './bochs/index.js';
import { cloopDriver } from './cloop/index.js';

/** Formats tsmount can open; one line each. */
const drivers: FormatDriver[] = [
  rawDriver,
  qcow2Driver,
  vmdkDriver,
  qedDriver,
  qcowDriver,
  vdiDriver,
  parallelsDriver,
  vpcDriver,
  vhdxDriver,
  luksDriver,
  dmgDriver,
  bochsDriver,
  cloopDriver,
];

/** Formats tsmount can open, by QEMU's driver name. */
export const formatDrivers: ReadonlyMap<string, FormatDriver> = new Map(drivers.map((d) => [d.name, d]));

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

export function formatByName(name: string): FormatDriver {
  const d = formatDrivers.get(name);
  if (d) return d;
  if (knownSignatures.some((s) => s.name === name)) throw new UnsupportedError(`format '${name}' is not supported yet`);
  throw new UsageError(`unknown format '${name}' (known: ${[...formatDrivers.keys()].join(', ')})`);
}

/** The driver that claims the image best; raw only when nothing else does. */
export function probeFormat(head: Uint8Array, filename: string, tail?: Uint8Array): FormatDriver {
  let best: FormatDriver = rawDriver;
  let bestScore = 0;
  for (const d of formatDrivers.values()) {
    const score = d.probe(head, filename, tail);
    if (score > bestScore) {
      best = d;
      bestScore = score;
    }
  }
  if (best === rawDriver) {
    const other = knownSignatures.find((s) => s.test(head));
    if (other) throw new UnsupportedError(`${filename}: looks like a ${other.name} image, a format tsmount does not open yet`);
  }
  return best;
}
