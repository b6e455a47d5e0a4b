// vdi's probe, by itself so the format registry can probe without loading the driver.
import { HDR, HEADER_BYTES, VDI_SIGNATURE } from './header.js';

export function probe(head: Uint8Array): number {
  if (head.length < HEADER_BYTES) return 0;
  return new DataView(head.buffer, head.byteOffset, head.byteLength).getUint32(HDR.signature, true) === VDI_SIGNATURE ? 100 : 0;
}
