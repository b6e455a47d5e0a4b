// Apple Data Compression (ADC), the codec of dmg's UDCO chunks: a byte stream of
// literal runs and back-references, as dmg2img's adc.c and other public decoders
// read it. Small enough to write by hand; the registry has no maintained package.
//   1LLLLLLL                    a literal run of L+1 bytes follows
//   01LLLLLL OOOOOOOO OOOOOOOO  copy L+4 bytes from O+1 bytes back
//   00LLLLOO OOOOOOOO           copy L+3 bytes from O+1 bytes back

export class AdcError extends Error {}

/**
 * Decode `src` into `dst`; returns the bytes written. Decoding stops at the end of
 * the input or when `dst` is full (as dmg2img does); a code cut off by the end of
 * the input, or one that reaches before the start of the output, is corrupt.
 */
export function adcDecode(src: Uint8Array, dst: Uint8Array): number {
  let p = 0;
  let out = 0;
  while (p < src.length && out < dst.length) {
    const b = src[p]!;
    if (b & 0x80) {
      const n = (b & 0x7f) + 1;
      if (p + 1 + n > src.length) throw new AdcError('literal run cut off');
      if (out + n > dst.length) throw new AdcError('decodes to more than its chunk');
      dst.set(src.subarray(p + 1, p + 1 + n), out);
      p += 1 + n;
      out += n;
      continue;
    }
    let n: number;
    let back: number;
    if (b & 0x40) {
      if (p + 3 > src.length) throw new AdcError('copy code cut off');
      n = (b & 0x3f) + 4;
      back = ((src[p + 1]! << 8) | src[p + 2]!) + 1;
      p += 3;
    } else {
      if (p + 2 > src.length) throw new AdcError('copy code cut off');
      n = ((b & 0x3c) >> 2) + 3;
      back = (((b & 0x03) << 8) | src[p + 1]!) + 1;
      p += 2;
    }
    if (back > out) throw new AdcError('copy reaches before the start of the output');
    if (out + n > dst.length) throw new AdcError('decodes to more than its chunk');
    // Byte by byte: a copy that overlaps its source repeats it.
    for (let i = 0; i < n; i++) dst[out + i] = dst[out - back + i]!;
    out += n;
  }
  return out;
}
