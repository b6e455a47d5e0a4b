// qcow's probe, by itself so the format registry can probe without loading the driver.
import { HEADER_BYTES, QCOW_MAGIC, QCOW_VERSION } from './header.js';

export function probe(head: Uint8Array): number {
  if (head.length < HEADER_BYTES) return 0;
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return dv.getUint32(0, false) === QCOW_MAGIC && dv.getUint32(4, false) === QCOW_VERSION ? 100 : 0;
}
