// qed's probe, by itself so the format registry can probe without loading the driver.
import { HEADER_BYTES, QED_MAGIC } from './header.js';

export function probe(head: Uint8Array): number {
  if (head.length < HEADER_BYTES) return 0;
  return new DataView(head.buffer, head.byteOffset, head.byteLength).getUint32(0, true) === QED_MAGIC ? 100 : 0;
}
