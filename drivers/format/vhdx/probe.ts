// vhdx's probe, by itself so the format registry can probe without loading the driver.
import { ascii } from './layout.js';

export function probe(head: Uint8Array): number {
  return head.length >= 8 && ascii(head, 0, 8) === 'vhdxfile' ? 100 : 0;
}
