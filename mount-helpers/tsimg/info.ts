// tsimg info: what qemu-img info shows, with its JSON keys. Each layer is opened by
// itself, without its backing file and without its data (OpenOptions.noBacking and
// noIo, qemu-img's BDRV_O_NO_BACKING | BDRV_O_NO_IO), so an image whose backing file
// is missing, or one encrypted and opened without its passphrase, still shows.
import type { BlockNode, ImageDescription } from '../../drivers/types.js';
import { formatOf, openImage } from '../../drivers/open.js';
import { pathCombine } from '../../drivers/protocol/index.js';
import { allocatedOnDisk, print, readOnlyOptions, type OpenCli } from './common.js';

export interface InfoCli extends OpenCli {
  output: string;
  backingChain?: boolean;
}

/** One layer as qemu-img info --output json prints it (ImageInfo), keys in its order. */
export type InfoJson = Record<string, unknown>;

/** `data` with each "filename" in it taken from the folder of `spec` (ImageDescription.formatSpecific). */
function fromFolderOf(spec: string, data: unknown): unknown {
  if (Array.isArray(data)) return data.map((v) => fromFolderOf(spec, v));
  if (data === null || typeof data !== 'object') return data;
  return Object.fromEntries(Object.entries(data).map(([k, v]) => [k, k === 'filename' && typeof v === 'string' ? pathCombine(spec, v) : fromFolderOf(spec, v)]));
}

function layerJson(spec: string, node: BlockNode): InfoJson {
  const d: ImageDescription = node.describe?.() ?? {};
  const out: InfoJson = {};
  if (d.backingFile !== undefined && d.backingFormat !== undefined) out['backing-filename-format'] = d.backingFormat;
  if (d.snapshots && d.snapshots.length > 0) {
    out.snapshots = d.snapshots.map((s) => ({
      ...(s.icount !== undefined ? { icount: s.icount } : {}),
      'vm-clock-nsec': s.vmClockNsec % 1e9,
      name: s.name,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
      id: s.id,
      'vm-state-size': s.vmStateSize,
    }));
  }
  out['virtual-size'] = node.size;
  out.filename = spec;
  if (d.clusterSize !== undefined) out['cluster-size'] = d.clusterSize;
  out.format = formatOf(node) ?? 'unknown';
  let actual = allocatedOnDisk(spec);
  for (const f of d.otherFiles ?? []) if (actual !== undefined) actual += allocatedOnDisk(f) ?? 0;
  if (actual !== undefined) out['actual-size'] = actual;
  if (d.formatSpecific) out['format-specific'] = { ...d.formatSpecific, data: fromFolderOf(spec, d.formatSpecific.data) as Record<string, unknown> };
  if (d.encrypted || node.encrypted) out.encrypted = true;
  if (d.backingFile !== undefined) {
    out['full-backing-filename'] = pathCombine(spec, d.backingFile);
    out['backing-filename'] = d.backingFile;
  }
  if (d.dirty !== undefined) out['dirty-flag'] = d.dirty;
  return out;
}

/**
 * The JSON of `spec` and, with `chain`, of every layer under it. Alone, the image opens
 * without its backing file; the chain opens as one graph, so every backing file passes
 * the named-file guard (drivers/trust.ts) as it would for a mount.
 */
export async function infoJson(spec: string, o: OpenCli, chain: boolean): Promise<InfoJson[]> {
  const node = await openImage(spec, readOnlyOptions(o, { noBacking: !chain, noIo: true }));
  try {
    const layers: InfoJson[] = [];
    let name = spec;
    for (let n: BlockNode | undefined = node; n; n = chain ? n.backing : undefined) {
      layers.push(layerJson(name, n));
      const backingFile = n.describe?.().backingFile;
      name = backingFile === undefined ? (n.backing?.name ?? '') : pathCombine(name, backingFile);
    }
    return layers;
  } finally {
    await node.close();
  }
}

/** QEMU's size_to_str: "%0.3g" of the largest binary unit. */
export function humanSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${Number(v.toPrecision(3))} ${units[i]}`;
}

function humanTree(value: unknown, indent: string): string {
  if (Array.isArray(value)) return value.map((v, i) => `${indent}[${i}]:\n${humanTree(v, `${indent}    `)}`).join('');
  if (value !== null && typeof value === 'object') {
    return Object.entries(value as Record<string, unknown>)
      .map(([k, v]) => (v !== null && typeof v === 'object' ? `${indent}${k.replace(/-/g, ' ')}:\n${humanTree(v, `${indent}    `)}` : `${indent}${k.replace(/-/g, ' ')}: ${String(v)}\n`))
      .join('');
  }
  return `${indent}${String(value)}\n`;
}

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + ' '.repeat(n - s.length);
}

/** qemu-img's snapshot table (bdrv_snapshot_dump): `info` and `snapshot -l` print it. */
export function snapshotList(snaps: Record<string, number | string>[]): string {
  let out = '';
  out += 'Snapshot list:\n';
  out += `${pad('ID', 10)}${pad('TAG', 18)}${pad('VM SIZE', 23)}${pad('DATE', 9)}${pad('VM CLOCK', 13)}ICOUNT\n`;
  for (const s of snaps) {
    const date = new Date((s['date-sec'] as number) * 1000);
    const p2 = (n: number): string => String(n).padStart(2, '0');
    const when = `${date.getFullYear()}-${p2(date.getMonth() + 1)}-${p2(date.getDate())} ${p2(date.getHours())}:${p2(date.getMinutes())}:${p2(date.getSeconds())}`;
    const sec = s['vm-clock-sec'] as number;
    const clock = `${p2(Math.floor(sec / 3600))}:${p2(Math.floor(sec / 60) % 60)}:${p2(sec % 60)}.${String(Math.floor((s['vm-clock-nsec'] as number) / 1e6)).padStart(3, '0')}`;
    out += `${pad(String(s.id), 10)}${pad(String(s.name), 18)}${humanSize(s['vm-state-size'] as number).padStart(7)}${when.padStart(20)}${clock.padStart(13)}${String(s.icount ?? '').padStart(11)}\n`;
  }
  return out;
}

/** qemu-img info's human output (bdrv_image_info_dump). */
export function humanInfo(j: InfoJson): string {
  const lines = [`image: ${String(j.filename)}`, `file format: ${String(j.format)}`, `virtual size: ${humanSize(j['virtual-size'] as number)} (${String(j['virtual-size'])} bytes)`];
  lines.push(`disk size: ${j['actual-size'] === undefined ? 'unavailable' : humanSize(j['actual-size'] as number)}`);
  if (j['cluster-size'] !== undefined) lines.push(`cluster_size: ${String(j['cluster-size'])}`);
  if (j.encrypted) lines.push('encrypted: yes');
  if (j['dirty-flag'] === true) lines.push('cleanly shut down: no');
  if (j['backing-filename'] !== undefined) {
    const full = j['full-backing-filename'];
    lines.push(`backing file: ${String(j['backing-filename'])}${full !== j['backing-filename'] ? ` (actual path: ${String(full)})` : ''}`);
    if (j['backing-filename-format'] !== undefined) lines.push(`backing file format: ${String(j['backing-filename-format'])}`);
  }
  let out = `${lines.join('\n')}\n`;
  const snaps = j.snapshots as Record<string, number | string>[] | undefined;
  if (snaps) out += snapshotList(snaps);
  const fs = j['format-specific'] as { data: Record<string, unknown> } | undefined;
  if (fs) out += `Format specific information:\n${humanTree(fs.data, '    ')}`;
  return out;
}

export async function info(spec: string, o: InfoCli): Promise<void> {
  if (o.output !== 'json' && o.output !== 'human') throw new Error(`--output must be human or json, not '${o.output}'`);
  const layers = await infoJson(spec, o, o.backingChain === true);
  if (o.output === 'json') {
    print(`${JSON.stringify(o.backingChain ? layers : layers[0], null, 4)}\n`);
    return;
  }
  print(layers.map(humanInfo).join('\n'));
}
