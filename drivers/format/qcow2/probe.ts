// qcow2's probe, by itself so the format registry can probe without loading the driver.
import { QCOW2_MAGIC } from './header.js';

export function probe(head: Uint8Array): number {
  if (head.length < 8) return 0;
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return dv.getUint32(0, false) === QCOW2_MAGIC && dv.getUint32(4, false) >= 2 ? 100 : 0;
}
