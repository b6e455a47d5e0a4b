// cloop's probe, by itself so the format registry can probe without loading the
// driver and its decoders; the header constants the driver reads with are here too.
export const PREAMBLE = 128;
export const HEADER_BYTES = PREAMBLE + 8;
const SIGNATURE = '#!/bin/sh\n#V';
/** Where the version ("2.0") stands in the preamble; the module compares 4 bytes from the 'V' before it. */
const VERSION_AT = 12;

function latin1(h: Uint8Array, from: number, to: number): string {
  return String.fromCharCode(...h.subarray(from, Math.min(to, h.length)));
}

/** "2.0", "4.0"... when the preamble is cloop's, else undefined. */
export function versionOf(head: Uint8Array): string | undefined {
  if (latin1(head, 0, SIGNATURE.length) !== SIGNATURE) return undefined;
  return /^(\d\.\d+) Format\n/.exec(latin1(head, VERSION_AT, VERSION_AT + 16))?.[1];
}

/**
 * Any version at the start is claimed, so that open can name one it does not read;
 * V4 also at the end, less surely: a format whose header is at the start wins over
 * bytes at the end that its data happens to end with.
 */
export function probe(head: Uint8Array, _filename: string, tail?: Uint8Array): number {
  if (versionOf(head) !== undefined) return 100;
  return tail && tail.length >= HEADER_BYTES && versionOf(tail.subarray(tail.length - HEADER_BYTES)) === '4.0' ? 50 : 0;
}
