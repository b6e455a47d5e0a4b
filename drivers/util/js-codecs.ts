// The decoders written in JavaScript (bzip2 through seek-bzip, ADC and LZFSE written
// here), synchronous: decode-pool.ts runs them in a worker thread, and in-thread when
// no worker can. Each bounds its output to the size it is given.
import zlib from 'node:zlib';
import { createRequire } from 'node:module';
import { adcDecode } from './adc.js';
import { lzfseDecode } from './lzfse.js';

export type JsCodec = 'bzip2' | 'adc' | 'lzfse';

export function isJsCodec(codec: string): codec is JsCodec {
  return codec === 'bzip2' || codec === 'adc' || codec === 'lzfse';
}

/** Decode `input` into at most `size` bytes; throws on a damaged stream. */
export function decodeSync(codec: JsCodec, input: Uint8Array, size: number): Buffer {
  switch (codec) {
    case 'bzip2':
      return bunzip(input, size);
    case 'adc': {
      const dst = Buffer.alloc(size);
      return dst.subarray(0, adcDecode(input, dst));
    }
    case 'lzfse': {
      // An LZFSE stream carries no total size: it must fill the room given exactly.
      const dst = Buffer.alloc(size);
      lzfseDecode(input, dst);
      return dst;
    }
  }
}

/**
 * One bzip2 stream through seek-bzip, with byte streams of our own: reading past
 * the input or writing more than `size` bytes throws (the library's own buffers
 * would read undefined bytes or grow without bound).
 */
function bunzip(input: Uint8Array, size: number): Buffer {
  const out = Buffer.alloc(size);
  let written = 0;
  let pos = 0;
  const inStream = {
    readByte(): number {
      if (pos >= input.length) throw new Error('bzip2 stream cut off');
      return input[pos++]!;
    },
    read(buf: Uint8Array, at: number, length: number): number {
      let n = 0;
      while (n < length && pos < input.length) buf[at + n++] = input[pos++]!;
      return n === 0 ? -1 : n;
    },
    seek(p: number): void {
      pos = p;
    },
    eof(): boolean {
      return pos >= input.length;
    },
  };
  const outStream = {
    writeByte(b: number): void {
      if (written >= size) throw new Error(`bzip2 stream decodes to more than ${size} bytes`);
      out[written++] = b;
    },
  };
  // seek-bzip (CommonJS) is required on the first bzip2 stream, not by every process that decodes.
  const Bunzip = createRequire(import.meta.url)('seek-bzip') as (typeof import('seek-bzip'))['default'];
  Bunzip.decode(inStream, outStream, false);
  return out.subarray(0, written);
}


/** What decode-pool.ts also compresses off the event loop. */
export type EncodeCodec = 'deflate-raw';

/**
 * Compress `input` as QEMU's qcow and qcow2 do (qcow2-threads.c, qcow.c): a raw deflate
 * stream, default level, a 4 KiB window (windowBits -12, which their inflate expects)
 * and memLevel 9. Undefined when the result would be longer than `limit` bytes.
 */
export function encodeSync(codec: EncodeCodec, input: Uint8Array, limit: number): Buffer | undefined {
  switch (codec) {
    case 'deflate-raw': {
      const out = zlib.deflateRawSync(input, { level: zlib.constants.Z_DEFAULT_COMPRESSION, windowBits: 12, memLevel: 9 });
      return out.length <= limit ? out : undefined;
    }
  }
}
