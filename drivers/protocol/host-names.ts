// Host drive names of other systems (qemu-block-drivers(7), "Using host drives"):
// Windows' `\\.\PhysicalDriveN` and `\\.\X:` and drive letters (`d:`), macOS's
// `/dev/diskN`, `/dev/rdiskN` and its `/dev/cdrom` alias (found through IOKit there).
// They are parsed, so the user hears what was understood, and refused on Linux with
// one line: a port would open them here (see README, "Host drives").
import fs from 'node:fs';
import type { ProtocolDriver } from '../types.js';
import { UnsupportedError } from '../errors.js';

export type ForeignHostName =
  | { system: 'windows'; kind: 'physical-drive'; index: number }
  | { system: 'windows'; kind: 'drive-letter'; letter: string }
  | { system: 'macos'; kind: 'disk'; index: number; raw: boolean; slice?: number };

/** What a foreign host drive name names, or undefined for any other name. */
export function parseForeignHostName(spec: string): ForeignHostName | undefined {
  const pd = /^\\\\\.\\PhysicalDrive(\d+)$/i.exec(spec);
  if (pd) return { system: 'windows', kind: 'physical-drive', index: Number(pd[1]) };
  const letter = /^(?:\\\\\.\\)?([a-z]):$/i.exec(spec);
  if (letter) return { system: 'windows', kind: 'drive-letter', letter: letter[1]!.toUpperCase() };
  const disk = /^\/dev\/(r?)disk(\d+)(?:s(\d+))?$/.exec(spec);
  if (disk) return { system: 'macos', kind: 'disk', index: Number(disk[2]), raw: disk[1] === 'r', ...(disk[3] !== undefined ? { slice: Number(disk[3]) } : {}) };
  return undefined;
}

function describe(n: ForeignHostName): string {
  if (n.kind === 'physical-drive') return `Windows physical drive ${n.index}`;
  if (n.kind === 'drive-letter') return `Windows drive ${n.letter}:`;
  return `macOS ${n.raw ? 'raw ' : ''}disk ${n.index}${n.slice !== undefined ? ` slice ${n.slice}` : ''}`;
}

/**
 * Claims the Windows names always, and the macOS ones where no such file exists here
 * (a Linux /dev/disk... that exists is an ordinary device).
 */
export const foreignHostProtocol: ProtocolDriver = {
  name: 'host_device',
  claims: (spec) => {
    const n = parseForeignHostName(spec);
    return n !== undefined && (n.system === 'windows' || (process.platform !== 'darwin' && !fs.existsSync(spec)));
  },
  open: async (spec) => {
    const n = parseForeignHostName(spec)!;
    throw new UnsupportedError(`${spec}: ${describe(n)}: host drives by ${n.system === 'windows' ? 'Windows' : 'macOS'} names are not supported on this platform (${process.platform})`);
  },
  resolveRelative: (_base, name) => name,
  stem: (spec) => {
    const n = parseForeignHostName(spec);
    if (n?.kind === 'physical-drive') return `PhysicalDrive${n.index}`;
    if (n?.kind === 'drive-letter') return n.letter;
    return spec.replace(/^.*\//, '') || 'disk';
  },
};
