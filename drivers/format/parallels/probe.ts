// parallels' probe, by itself so the format registry can probe without loading the driver.
import { HDR, HEADER_BYTES, HEADER_VERSION, MAGIC_V1, MAGIC_V2, magicOf } from './header.js';

export function probe(head: Uint8Array): number {
  if (head.length < HEADER_BYTES) return 0;
  const magic = magicOf(head);
  const version = new DataView(head.buffer, head.byteOffset, head.byteLength).getUint32(HDR.version, true);
  return (magic === MAGIC_V1 || magic === MAGIC_V2) && version === HEADER_VERSION ? 100 : 0;
}
