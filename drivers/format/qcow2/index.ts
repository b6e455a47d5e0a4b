// qcow2 (docs/interop/qcow2.txt). Placeholder until the driver lands.
import type { FormatDriver } from '../../types.js';
import { UnsupportedError } from '../../errors.js';

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  probe: (head) => (head.length >= 8 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb && head[7]! >= 2 ? 100 : 0),
  open: async () => {
    throw new UnsupportedError('qcow2 is not implemented yet');
  },
};
