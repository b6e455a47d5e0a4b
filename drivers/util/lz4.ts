// LZ4 block format decoding (the reference's lz4_Block_format.md; LZ4_decompress_safe):
// sequences of a token, literals and a match copied from earlier output. cloop V4
// stores LZ4 blocks without a frame. No npm package is in the tree for it, and the
// format is a page long; every length and offset is checked against both buffers.

/** Decode `src` into `dst`; returns the bytes written. Throws on any malformed input. */
export function lz4BlockDecode(src: Uint8Array, dst: Uint8Array): number {
  let ip = 0;
  let op = 0;
  const bad = (why: string): never => {
    throw new Error(`malformed LZ4 block: ${why} at input byte ${ip}`);
  };
  /** A length continued in bytes of 255 (the token's nibble was 15). */
  const more = (n: number): number => {
    for (;;) {
      if (ip >= src.length) bad('length runs past the end');
      const b = src[ip++]!;
      n += b;
      if (b !== 255) return n;
    }
  };
  if (src.length === 0) bad('empty input');
  for (;;) {
    if (ip >= src.length) bad('block ends after a match, not with literals');
    const token = src[ip++]!;
    let literals = token >> 4;
    if (literals === 15) literals = more(literals);
    if (ip + literals > src.length) bad('literals run past the end of the input');
    if (op + literals > dst.length) bad('literals run past the end of the output');
    dst.set(src.subarray(ip, ip + literals), op);
    ip += literals;
    op += literals;
    // The last sequence is literals only.
    if (ip === src.length) return op;
    if (ip + 2 > src.length) bad('match offset cut off');
    const offset = src[ip]! | (src[ip + 1]! << 8);
    ip += 2;
    if (offset === 0 || offset > op) bad(`match offset ${offset} outside the output`);
    let length = token & 15;
    if (length === 15) length = more(length);
    length += 4;
    if (op + length > dst.length) bad('match runs past the end of the output');
    // Byte by byte: a match may overlap the bytes it produces (offset < length).
    for (let from = op - offset, end = op + length; op < end; ) dst[op++] = dst[from++]!;
  }
}
