// The vvfat protocol for the registry (drivers/protocol/index.ts): `fat:...DIR` names
// a disk made from a directory. Loaded on first use, as the remote protocols are.
import path from 'node:path';
import type { ProtocolDriver } from '../../types.js';
import { UsageError } from '../../errors.js';
import { isVvfatSpec, parseVvfatSpec } from './spec.js';

export const vvfatProtocol: ProtocolDriver = {
  name: 'vvfat',
  claims: isVvfatSpec,
  open: async (spec, opts) => (await import('./node.js')).VvfatNode.open(spec, opts),
  resolveRelative: (base) => {
    throw new UsageError(`${base}: a virtual FAT disk names no other files`);
  },
  stem: (spec) => path.basename(path.resolve(parseVvfatSpec(spec).dir)) || 'fat',
};
