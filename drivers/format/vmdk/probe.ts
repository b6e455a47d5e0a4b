// vmdk's probe, by itself so the format registry can probe without loading the driver.
import { probeDescriptor } from './descriptor.js';
import { VMDK3_MAGIC, VMDK4_MAGIC } from './header.js';

export function be32(b: Uint8Array): number {
  return b.length < 4 ? -1 : new DataView(b.buffer, b.byteOffset, 4).getUint32(0, false);
}

export function probe(head: Uint8Array): number {
  if (head.length < 4) return 0;
  const m = be32(head);
  if (m === VMDK3_MAGIC || m === VMDK4_MAGIC) return 100;
  return probeDescriptor(head) ? 100 : 0;
}
