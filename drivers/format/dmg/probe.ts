// dmg's probe, by itself so the format registry can probe without loading the driver
// and its decoders.
import { hasKoly } from './udif.js';

/** The trailer and the 511 bytes before it that QEMU also searches. */
export const TAIL_BYTES = 1024;

/**
 * The file's last bytes hold a koly trailer (QEMU probes by the .dmg name alone; the
 * trailer is surer). Below the formats known by their header (100): in those the last
 * bytes are guest data, which may well end with a dmg (a qcow2 holding a .dmg file).
 */
export function probe(_head: Uint8Array, _filename: string, tail?: Uint8Array): number {
  return tail && hasKoly(tail) ? 50 : 0;
}
