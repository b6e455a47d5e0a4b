// vpc's probe, by itself so the format registry can probe without loading the driver.
import { ascii } from './footer.js';

/**
 * A dynamic VHD starts with a footer copy; a fixed one has its footer only at the
 * end, which probing cannot see. Like QEMU, probing takes a fixed VHD for raw; the
 * 1 ("could be a fixed VHD") lets `-f vpc` open one, while raw still wins ties.
 */
export function probe(head: Uint8Array): number {
  return head.length >= 8 && ascii(head, 0, 8) === 'conectix' ? 100 : 1;
}
