// tsmount --list: the tsmount mounts this user can see, from the kernel's mount table,
// with what each server published in its state file (fs/mounts.ts, fs/status.ts): the
// image chains, read-only or not, the pid, the files, and the counters.
import { listMounts } from '../fs/mounts.js';
import type { MountDetails } from '../fs/status.js';

export interface ListedMount {
  mountpoint: string;
  source: string;
  /** 0 when no live server names this mount (its state file is gone or stale). */
  pid: number;
  images: string[];
  readOnly: boolean | undefined;
  chains?: MountDetails['chains'];
  files?: MountDetails['files'];
  overlay?: string;
  counters?: MountDetails['counters'];
  updated?: string;
}

export function listed(): ListedMount[] {
  return listMounts().map((m) => {
    const d = m.state?.details;
    return {
      mountpoint: m.mountpoint,
      source: m.source,
      pid: m.pid,
      images: m.state?.images ?? [],
      readOnly: m.state ? !m.state.rw : undefined,
      ...(d ? { chains: d.chains, files: d.files, overlay: d.overlay, counters: d.counters, updated: d.updated } : {}),
    };
  });
}

function human(m: ListedMount): string {
  const lines = [`${m.mountpoint}: ${m.readOnly === undefined ? 'state unknown' : m.readOnly ? 'read-only' : 'read-write'}, server pid ${m.pid || 'unknown'}`];
  const chains = m.chains ?? m.images.map((i) => [{ file: i, format: '?' }]);
  if (chains.length === 0) lines.push(`  source ${m.source}`);
  for (const chain of chains) lines.push(`  image ${chain.map((l) => `${l.file} (${l.format})`).join(' <- ')}`);
  if (m.overlay) lines.push(`  overlay ${m.overlay}`);
  for (const f of m.files ?? []) {
    const p = f.partition;
    lines.push(`  file ${f.name}${f.writable ? '' : ' (read-only)'}${p ? `: partition ${p.number} (${p.scheme}${p.name ? `, '${p.name}'` : ''})` : ''}`);
  }
  const c = m.counters;
  if (c) {
    lines.push(`  reads ${c.reads} (${c.bytesRead} bytes), writes ${c.writes} (${c.bytesWritten} bytes), in flight ${c.inFlight}, errors ${c.errors}, cache hits ${c.cacheHits}, misses ${c.cacheMisses}`);
    if (c.workerReads || c.handedOver !== undefined) {
      // Of the counts above, what the FUSE worker threads did themselves, and what went to the JS thread.
      const parts = [`reads ${c.workerReads ?? 0}${c.splicedReads ? ` (${c.splicedReads} spliced)` : ''}`, `writes in place ${c.workerWrites ?? 0}`];
      if (c.handedOver !== undefined) parts.push(`requests handed to the main thread ${c.handedOver}`, `read by its spin instead ${c.spinTakes ?? 0}`, `parked for a writer ${c.writerParks ?? 0} times`);
      lines.push(`  FUSE workers: ${parts.join(', ')}`);
    }
  }
  return lines.join('\n');
}

export async function listCommand(json: boolean): Promise<string> {
  const mounts = listed();
  if (json) return `${JSON.stringify(mounts, null, 2)}\n`;
  return mounts.length === 0 ? 'no tsmount mounts\n' : `${mounts.map(human).join('\n')}\n`;
}
