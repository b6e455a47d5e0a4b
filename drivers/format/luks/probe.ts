// luks' probe, by itself so the format registry can probe without loading the driver
// and its ciphers.
import { luksVersion } from '../../crypto/magic.js';

export function probe(head: Uint8Array): number {
  return luksVersion(head) ? 100 : 0;
}
