// A generator of UDIF (.dmg) images for the tests, laid out as hdiutil lays them out
// and QEMU's block/dmg.c reads them: the chunks' stored bytes from the start of the
// file (the data fork), then the XML property list with one blkx entry (a base64
// "mish" block table) per partition, or the tables in a binary resource fork, then
// the 512-byte koly trailer. Chunks are stored as zeros, ignored, raw, zlib, bzip2
// (the bzip2 CLI), ADC and LZFSE (small encoders here: enough to exercise the decoders,
// nothing like the real compressors' ratios), or under a type nobody knows.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import zlib from 'node:zlib';
import { rng } from './corrupt.js';

const SECTOR = 512;

export type GenChunkKind = 'zero' | 'ignore' | 'raw' | 'zlib' | 'bzip2' | 'adc' | 'lzfse' | 'unknown';

export const CHUNK_TYPE: Record<GenChunkKind, number> = {
  zero: 0,
  raw: 1,
  ignore: 2,
  adc: 0x80000004,
  zlib: 0x80000005,
  bzip2: 0x80000006,
  lzfse: 0x80000007,
  unknown: 0x8000000a,
};

export interface GenChunk {
  kind: GenChunkKind;
  /** The guest bytes (zeros for zero and ignore chunks); a multiple of 512 bytes. */
  data: Buffer;
}

export interface GenPartition {
  name: string;
  chunks: GenChunk[];
}

export interface GenImage {
  /** The dmg file's bytes. */
  image: Buffer;
  /** The disk it holds: every partition's chunks in order. */
  disk: Buffer;
  /** Where each chunk's stored bytes are in the file, in the order given. */
  stored: { kind: GenChunkKind; offset: number; length: number; sector: number }[];
}

/** Compress one chunk's bytes as its kind stores them. */
export function encodeChunk(kind: GenChunkKind, data: Buffer): Buffer {
  switch (kind) {
    case 'zero':
    case 'ignore':
      return Buffer.alloc(0);
    case 'raw':
    case 'unknown':
      return data;
    case 'zlib':
      return zlib.deflateSync(data);
    case 'bzip2': {
      const r = spawnSync('bzip2', ['-c', '-9'], { input: data, maxBuffer: 256 * 1024 * 1024 });
      if (r.status !== 0) throw new Error(`bzip2 failed: ${r.stderr.toString()}`);
      return r.stdout;
    }
    case 'adc':
      return adcEncode(data);
    case 'lzfse':
      return lzfseEncode(data);
  }
}

/** ADC: runs of one byte as copy codes (distance 1), everything else as literal runs. */
export function adcEncode(data: Buffer): Buffer {
  const out: number[] = [];
  let lit: number[] = [];
  const flush = (): void => {
    for (let i = 0; i < lit.length; i += 128) {
      const part = lit.slice(i, i + 128);
      out.push(0x80 | (part.length - 1), ...part);
    }
    lit = [];
  };
  let i = 0;
  while (i < data.length) {
    let run = 1;
    while (i + run < data.length && data[i + run] === data[i] && run < 68) run++;
    if (run >= 5 && i > 0 && data[i - 1] === data[i]) {
      flush();
      if (run > 18) {
        // 01LLLLLL OOOOOOOO OOOOOOOO: L+4 bytes from O+1 back.
        const n = Math.min(run, 67);
        out.push(0x40 | (n - 4), 0, 0);
        i += n;
      } else {
        // 00LLLLOO OOOOOOOO: L+3 bytes from O+1 back.
        const n = Math.min(run, 18);
        out.push((n - 3) << 2, 0);
        i += n;
      }
      continue;
    }
    lit.push(data[i]!);
    i++;
  }
  flush();
  return Buffer.from(out);
}

/**
 * LZFSE: the data split into blocks alternating between raw ("bvx-") and LZVN
 * ("bvxn": literals, and runs of one byte as matches at distance 1), then "bvx$".
 */
export function lzfseEncode(data: Buffer): Buffer {
  const parts: Buffer[] = [];
  const BLOCK = 48 * 1024;
  for (let at = 0, n = 0; at < data.length; at += BLOCK, n++) {
    const block = data.subarray(at, Math.min(data.length, at + BLOCK));
    if (n % 2 === 1) {
      const h = Buffer.alloc(8);
      h.writeUInt32LE(0x2d787662, 0);
      h.writeUInt32LE(block.length, 4);
      parts.push(h, block);
    } else {
      const payload = lzvnEncode(block, at > 0);
      const h = Buffer.alloc(12);
      h.writeUInt32LE(0x6e787662, 0);
      h.writeUInt32LE(block.length, 4);
      h.writeUInt32LE(payload.length, 8);
      parts.push(h, payload);
    }
  }
  parts.push(Buffer.from('bvx$', 'latin1'));
  return Buffer.concat(parts);
}

/** LZVN opcodes for `data`: literal runs (sml_l, lrg_l) and one-byte runs as a literal then sml_d/lrg_m matches. */
function lzvnEncode(data: Buffer, _notFirst: boolean): Buffer {
  const out: number[] = [];
  let lit: number[] = [];
  let haveD = false;
  const flush = (): void => {
    for (let i = 0; i < lit.length; ) {
      const n = Math.min(lit.length - i, 271);
      if (n >= 16) out.push(0xe0, n - 16);
      else out.push(0xe0 | n);
      out.push(...lit.slice(i, i + n));
      i += n;
    }
    lit = [];
  };
  let i = 0;
  while (i < data.length) {
    let run = 1;
    while (i + run < data.length && data[i + run] === data[i]) run++;
    if (run >= 12) {
      // One literal byte, then the rest as matches at distance 1.
      lit.push(data[i]!);
      i++;
      run--;
      flush();
      if (!haveD) {
        // sml_d with L=0, M=3, D=1: 00 000 000 | 00000001 -> sets the distance.
        out.push(0x00, 0x01);
        i += 3;
        run -= 3;
        haveD = true;
      }
      while (run >= 16) {
        const m = Math.min(run, 271);
        out.push(0xf0, m - 16);
        i += m;
        run -= m;
      }
      if (run > 0) {
        out.push(0xf0 | run);
        i += run;
      }
      continue;
    }
    lit.push(data[i]!);
    i++;
    // A literal run breaks nothing: the distance stays 1 for the next match.
  }
  flush();
  out.push(0x06, 0, 0, 0, 0, 0, 0, 0);
  return Buffer.from(out);
}

/** The 204-byte header and 40-byte entries of one partition's block table. */
function mish(firstSector: number, sectors: number, entries: { type: number; sector: number; sectors: number; offset: number; length: number }[]): Buffer {
  const all = [...entries, { type: 0x7ffffffe, sector: sectors, sectors: 0, offset: 0, length: 0 }, { type: 0xffffffff, sector: sectors, sectors: 0, offset: 0, length: 0 }];
  const b = Buffer.alloc(204 + 40 * all.length);
  b.write('mish', 0, 'latin1');
  b.writeUInt32BE(1, 4);
  b.writeBigUInt64BE(BigInt(firstSector), 8);
  b.writeBigUInt64BE(BigInt(sectors), 16);
  b.writeBigUInt64BE(0n, 24); // data offset: chunk offsets are from the data fork's start
  b.writeUInt32BE(0x208, 32); // buffers needed
  b.writeUInt32BE(all.length, 200);
  all.forEach((e, i) => {
    const at = 204 + 40 * i;
    b.writeUInt32BE(e.type, at);
    b.writeBigUInt64BE(BigInt(e.sector), at + 8);
    b.writeBigUInt64BE(BigInt(e.sectors), at + 16);
    b.writeBigUInt64BE(BigInt(e.offset), at + 24);
    b.writeBigUInt64BE(BigInt(e.length), at + 32);
  });
  return b;
}

function plist(tables: { name: string; mish: Buffer }[]): Buffer {
  const b64 = (b: Buffer): string => b.toString('base64').replace(/(.{52})/g, '$1\n\t\t\t\t');
  const entries = tables
    .map(
      (t, i) => `\t\t\t<dict>
\t\t\t\t<key>Attributes</key>
\t\t\t\t<string>0x0050</string>
\t\t\t\t<key>CFName</key>
\t\t\t\t<string>${t.name}</string>
\t\t\t\t<key>Data</key>
\t\t\t\t<data>
\t\t\t\t${b64(t.mish)}
\t\t\t\t</data>
\t\t\t\t<key>ID</key>
\t\t\t\t<string>${i - 1}</string>
\t\t\t\t<key>Name</key>
\t\t\t\t<string>${t.name}</string>
\t\t\t</dict>\n`,
    )
    .join('');
  // A plst resource as hdiutil writes one: a <data> that is not a block table.
  const plst = Buffer.alloc(0x600).toString('base64');
  return Buffer.from(
    `<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
\t<key>resource-fork</key>
\t<dict>
\t\t<key>blkx</key>
\t\t<array>
${entries}\t\t</array>
\t\t<key>plst</key>
\t\t<array>
\t\t\t<dict>
\t\t\t\t<key>Attributes</key>
\t\t\t\t<string>0x0050</string>
\t\t\t\t<key>Data</key>
\t\t\t\t<data>
\t\t\t\t${plst}
\t\t\t\t</data>
\t\t\t\t<key>ID</key>
\t\t\t\t<string>0</string>
\t\t\t\t<key>Name</key>
\t\t\t\t<string></string>
\t\t\t</dict>
\t\t</array>
\t</dict>
</dict>
</plist>
`,
    'utf8',
  );
}

/** A binary resource fork holding the tables, as QEMU's dmg_read_resource_fork reads one (no resource map). */
function resourceFork(tables: Buffer[]): Buffer {
  const data = Buffer.concat(tables.flatMap((t) => [u32(t.length), t]));
  const head = Buffer.alloc(256);
  head.writeUInt32BE(256, 0); // data offset
  head.writeUInt32BE(256 + data.length, 4); // map offset
  head.writeUInt32BE(data.length, 8); // data length
  head.writeUInt32BE(0, 12); // map length
  return Buffer.concat([head, data]);
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v, 0);
  return b;
}

function koly(o: { dataForkLength: number; rsrcOffset: number; rsrcLength: number; xmlOffset: number; xmlLength: number; sectors: number }): Buffer {
  const k = Buffer.alloc(512);
  k.write('koly', 0, 'latin1');
  k.writeUInt32BE(4, 4);
  k.writeUInt32BE(512, 8);
  k.writeUInt32BE(1, 12); // flags: flattened
  k.writeBigUInt64BE(0n, 16); // running data fork offset
  k.writeBigUInt64BE(0n, 24); // data fork offset
  k.writeBigUInt64BE(BigInt(o.dataForkLength), 32);
  k.writeBigUInt64BE(BigInt(o.rsrcOffset), 40);
  k.writeBigUInt64BE(BigInt(o.rsrcLength), 48);
  k.writeUInt32BE(1, 56); // segment number
  k.writeUInt32BE(1, 60); // segment count
  k.writeBigUInt64BE(BigInt(o.xmlOffset), 216);
  k.writeBigUInt64BE(BigInt(o.xmlLength), 224);
  k.writeUInt32BE(1, 488); // image variant: device image
  k.writeBigUInt64BE(BigInt(o.sectors), 492);
  return k;
}

/** Build an image of `partitions`, one after another on the disk. */
export function buildUdif(partitions: GenPartition[], opts: { tables?: 'xml' | 'rsrc' } = {}): GenImage {
  const data: Buffer[] = [];
  let dataLength = 0;
  const tables: { name: string; mish: Buffer }[] = [];
  const stored: GenImage['stored'] = [];
  const disk: Buffer[] = [];
  let sector = 0;
  for (const p of partitions) {
    const first = sector;
    const entries: { type: number; sector: number; sectors: number; offset: number; length: number }[] = [];
    let rel = 0;
    for (const c of p.chunks) {
      if (c.data.length % SECTOR !== 0) throw new Error('chunk data must be whole sectors');
      const bytes = encodeChunk(c.kind, c.data);
      const sectors = c.data.length / SECTOR;
      entries.push({ type: CHUNK_TYPE[c.kind], sector: rel, sectors, offset: bytes.length ? dataLength : 0, length: bytes.length });
      stored.push({ kind: c.kind, offset: dataLength, length: bytes.length, sector: first + rel });
      data.push(bytes);
      dataLength += bytes.length;
      disk.push(c.kind === 'zero' || c.kind === 'ignore' ? Buffer.alloc(c.data.length) : c.data);
      rel += sectors;
    }
    tables.push({ name: p.name, mish: mish(first, rel, entries) });
    sector += rel;
  }
  let meta: Buffer;
  let k: Buffer;
  if (opts.tables === 'rsrc') {
    meta = resourceFork(tables.map((t) => t.mish));
    k = koly({ dataForkLength: dataLength, rsrcOffset: dataLength, rsrcLength: meta.length, xmlOffset: 0, xmlLength: 0, sectors: sector });
  } else {
    meta = plist(tables);
    k = koly({ dataForkLength: dataLength, rsrcOffset: 0, rsrcLength: 0, xmlOffset: dataLength, xmlLength: meta.length, sectors: sector });
  }
  return { image: Buffer.concat([...data, meta, k]), disk: Buffer.concat(disk), stored };
}

/** Bytes that compress somewhat: text-like runs, repeats and a few zero stretches, from a seed. */
export function sampleData(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  const random = rng(seed);
  const next = (): number => Math.floor(random() * 2 ** 32);
  let i = 0;
  while (i < length) {
    const r = next();
    const n = Math.min(length - i, 1 + (r % 300));
    switch (r >>> 29) {
      case 0:
      case 1:
        b.fill(r & 0xff, i, i + n); // a run of one byte
        break;
      case 2:
        b.fill(0, i, i + n);
        break;
      default:
        for (let j = 0; j < n; j++) b[i + j] = 0x20 + (next() % 64); // text-like
    }
    i += n;
  }
  return b;
}

/** Every chunk kind, in two partitions and a third of zeros, ~3.3 MiB: the standard test image. */
export function everyChunkImage(opts: { tables?: 'xml' | 'rsrc'; kinds?: GenChunkKind[] } = {}): GenImage {
  const kinds = opts.kinds ?? (['raw', 'zlib', 'bzip2', 'adc', 'lzfse', 'zero', 'ignore'] as GenChunkKind[]);
  const KiB = 1024;
  const chunk = (kind: GenChunkKind, size: number, seed: number): GenChunk => ({ kind, data: kind === 'zero' || kind === 'ignore' ? Buffer.alloc(size) : sampleData(size, seed) });
  const first: GenChunk[] = kinds.map((k, i) => chunk(k, 256 * KiB + (i % 3) * 512, 100 + i));
  // hdiutil's chunk size (1 MiB) and an odd one, so chunks do not line up with cache blocks.
  const second: GenChunk[] = [chunk(kinds.includes('zlib') ? 'zlib' : 'raw', 1024 * KiB, 7), chunk(kinds[kinds.length > 1 ? 1 : 0]!, 300 * KiB + 512, 8), chunk('raw', 64 * KiB + 512, 9)];
  const third: GenChunk[] = [chunk('zero', 512 * KiB, 0)];
  return buildUdif(
    [
      { name: 'Protective Master Boot Record (MBR : 0)', chunks: first },
      { name: 'disk image (Apple_HFS : 1)', chunks: second },
      { name: ' (Apple_Free : 2)', chunks: third },
    ],
    opts,
  );
}

export function writeUdif(file: string, img: GenImage): void {
  fs.writeFileSync(file, img.image);
}
