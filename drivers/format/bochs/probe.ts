// bochs' probe, by itself so the format registry can probe without loading the driver.
const MAGIC = 'Bochs Virtual HD Image';

/** A NUL-terminated string field of the header. */
export function field(h: Uint8Array, at: number, len: number): string {
  const f = h.subarray(at, Math.min(at + len, h.length));
  const nul = f.indexOf(0);
  return String.fromCharCode(...(nul < 0 ? f : f.subarray(0, nul)));
}

/** Every bochs image with the magic is claimed, so that open can name what it refuses. */
export function probe(head: Uint8Array): number {
  return head.length >= 64 && field(head, 0, 32) === MAGIC ? 100 : 0;
}
