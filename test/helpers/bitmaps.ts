// qcow2 persistent dirty bitmaps as QEMU reads them: qemu-img info's list, and the set
// bits of one bitmap through qemu-nbd -B (qemu-img map over NBD's x-dirty-bitmap shows
// them as "data": false).
import path from 'node:path';
import { imageInfo, runOk } from './qemu.js';
import { startServer } from './servers.js';

export interface BitmapEntry {
  name: string;
  flags: string[];
  granularity: number;
}

/** Bitmaps as qemu-img info lists them: name, flags, granularity. */
export async function bitmapInfo(file: string): Promise<BitmapEntry[]> {
  const info = (await imageInfo(file)) as { 'format-specific'?: { data?: { bitmaps?: BitmapEntry[] } } };
  return info['format-specific']?.data?.bitmaps ?? [];
}

let sockets = 0;

/** The set bits of `bitmap` as [offset, length] runs, as QEMU reads them; the socket goes in `dir`. */
export async function dirtyRuns(dir: string, file: string, bitmap: string): Promise<[number, number][]> {
  const sock = path.join(dir, `nbd-${process.pid}-${sockets++}.sock`);
  const srv = await startServer('qemu-nbd', ['-k', sock, '-r', '-f', 'qcow2', '-B', bitmap, file], { path: sock });
  try {
    const out = await runOk('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:${bitmap}`]);
    return (JSON.parse(out) as { start: number; length: number; data: boolean }[]).filter((e) => !e.data).map((e) => [e.start, e.length]);
  } finally {
    await srv.stop();
  }
}
