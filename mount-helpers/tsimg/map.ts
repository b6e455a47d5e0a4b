// tsimg map: where each run of the disk comes from, through the backing chain, with
// qemu-img map's JSON fields. The walk is fs/extents.ts's (chainExtents), the one that
// answers SEEK_DATA for a mount: each layer's own block status, 'unallocated' asking
// the layer below.
import type { BlockNode } from '../../drivers/types.js';
import { chainExtents, type ChainRun } from '../../fs/extents.js';
import { openForRead, print, type OpenCli } from './common.js';
import { pathCombine } from '../../drivers/protocol/index.js';

export interface MapCli extends OpenCli {
  output: string;
}

/** One entry of qemu-img map --output json (MapEntry). */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** Block status is asked in windows that grow, as fs/extents.ts's seek does. */
const FIRST_WINDOW = 64 << 20;
const MAX_WINDOW = 2 ** 34;

/** The runs of the whole disk, merged across windows. */
export async function mapRuns(node: BlockNode): Promise<ChainRun[]> {
  const out: ChainRun[] = [];
  let window = FIRST_WINDOW;
  for (let pos = 0; pos < node.size; pos += window, window = Math.min(window * 2, MAX_WINDOW)) {
    window = Math.min(window, node.size - pos);
    await chainExtents(node, pos, window, { strict: true, elsewhere: true }, out);
  }
  return out;
}

export function mapEntry(r: ChainRun): MapEntry {
  const e: MapEntry = { start: r.offset, length: r.length, depth: r.depth, present: r.kind !== 'unallocated', zero: r.kind !== 'data' || r.zeroData === true, data: r.kind === 'data' };
  // In the layer's own file, or in another of its files (a vmdk extent, a qcow2 data file).
  const offset = r.host ?? r.elsewhere?.host;
  if (offset !== undefined) e.offset = offset;
  return e;
}

/** Each layer's file name as qemu-img map prints it: the image as given, then the backing names as they resolve. */
function layerNames(spec: string, node: BlockNode): string[] {
  const names: string[] = [];
  let name = spec;
  for (let n: BlockNode | undefined = node; n; n = n.backing) {
    names.push(name);
    const b = n.describe?.().backingFile;
    name = b === undefined ? (n.backing?.name ?? '') : pathCombine(name, b);
  }
  return names;
}

function hex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

const SVG_WIDTH = 1000;
const ROW = 28;
const LABEL = 260;
const COLOURS = { data: '#3465a4', compressed: '#75507b', zero: '#edd400' } as const;

function xmlEscape(t: string): string {
  return t.replace(/[<>&"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/**
 * The map as a picture: one row per layer of the chain, each run drawn where it lies
 * on the disk (data, data with no place of its own in the file such as compressed
 * clusters, zeros); what a layer leaves to the one below is the grey background.
 */
export function mapSvg(runs: ChainRun[], names: string[], size: number): string {
  const layers = Math.max(1, names.length);
  const height = ROW * layers + 60;
  const x = (off: number): number => LABEL + (off / Math.max(1, size)) * (SVG_WIDTH - LABEL - 10);
  let out = `<svg xmlns="http://www.w3.org/2000/svg" width="${SVG_WIDTH}" height="${height}" font-family="sans-serif" font-size="12">\n`;
  for (let d = 0; d < layers; d++) {
    const y = 10 + d * ROW;
    out += `<text x="4" y="${y + 16}">${xmlEscape(`${d}: ${names[d] ?? ''}`)}</text>\n`;
    out += `<rect x="${LABEL}" y="${y}" width="${SVG_WIDTH - LABEL - 10}" height="${ROW - 6}" fill="#d3d7cf"/>\n`;
  }
  for (const r of runs) {
    if (r.kind === 'unallocated') continue;
    const colour = r.kind === 'zero' ? COLOURS.zero : r.host === undefined && r.elsewhere === undefined ? COLOURS.compressed : COLOURS.data;
    const y = 10 + Math.min(r.depth, layers - 1) * ROW;
    const w = Math.max(0.5, x(r.offset + r.length) - x(r.offset));
    out += `<rect x="${x(r.offset).toFixed(2)}" y="${y}" width="${w.toFixed(2)}" height="${ROW - 6}" fill="${colour}"><title>${r.kind} ${r.offset}+${r.length}</title></rect>\n`;
  }
  const ly = 10 + layers * ROW + 20;
  const legend: [string, string][] = [['data', COLOURS.data], ['data without a place of its own (compressed, encrypted)', COLOURS.compressed], ['zero', COLOURS.zero], ['unallocated (the layer below)', '#d3d7cf']];
  let lx = 4;
  for (const [label, colour] of legend) {
    out += `<rect x="${lx}" y="${ly - 10}" width="12" height="12" fill="${colour}"/><text x="${lx + 16}" y="${ly}">${xmlEscape(label)}</text>\n`;
    lx += 24 + label.length * 6.5;
  }
  return `${out}</svg>\n`;
}

export async function map(spec: string, o: MapCli): Promise<void> {
  if (o.output !== 'json' && o.output !== 'human' && o.output !== 'svg') throw new Error(`--output must be human, json or svg, not '${o.output}'`);
  const node = await openForRead(spec, o);
  try {
    const runs = await mapRuns(node);
    if (o.output === 'svg') {
      print(mapSvg(runs, layerNames(spec, node), node.size));
      return;
    }
    if (o.output === 'json') {
      // qemu-img map's own layout: one entry a line, inside one array.
      const lines = runs.map((r) => {
        const e = mapEntry(r);
        return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${e.offset !== undefined ? `, "offset": ${e.offset}` : ''}}`;
      });
      print(`[${lines.join(',\n')}]\n`);
      return;
    }
    // The human form lists where data lives, file by file; data with no one place cannot be listed.
    const names = layerNames(spec, node);
    let out = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;
    for (const r of runs) {
      // qemu-img lists data that is not known to read as zeros.
      if (r.kind !== 'data' || r.zeroData) continue;
      const layer = names[r.depth] ?? '';
      // Another file of the layer: named as the image names it, after the layer's folder (QEMU's path_combine).
      const at = r.host !== undefined ? { host: r.host, file: layer } : r.elsewhere && { host: r.elsewhere.host, file: pathCombine(layer, r.elsewhere.name) };
      if (!at) throw new Error(`${spec}: file contains external, encrypted or compressed clusters`);
      out += `${hex(r.offset).padEnd(16)}${hex(r.length).padEnd(16)}${hex(at.host).padEnd(16)}${at.file}\n`;
    }
    print(out);
  } finally {
    await node.close();
  }
}
