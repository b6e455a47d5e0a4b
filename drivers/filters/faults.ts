// Injected I/O errors, for the fault tests only (issue 20, "Faults"): where the machine
// has no device-mapper error target, this filter over a protocol node fails requests
// as a failing disk would. It exists only when TSMOUNT_FAULTS names a control file
// (the graph builder adds it then, and never otherwise: no cost on the normal path).
// The control file is read at each request; absent or empty, nothing fails. Each line:
//   OP ERRNO [FROM [TO]]
// OP is read, write or flush; ERRNO a name (EIO, ENOSPC, ...); FROM..TO (bytes of the
// host file, TO exclusive) limits it to requests that touch that range.
import fs from 'node:fs';
import { constants as osc } from 'node:os';
import { Filter } from './filter.js';
import { IoError } from '../errors.js';
import type { BlockNode } from '../types.js';

type Op = 'read' | 'write' | 'flush';

interface Fault {
  op: Op;
  errno: number;
  name: string;
  from: number;
  to: number;
}

function faultsIn(control: string): Fault[] {
  let text: string;
  try {
    text = fs.readFileSync(control, 'utf8');
  } catch {
    return [];
  }
  const out: Fault[] = [];
  for (const line of text.split('\n')) {
    const [op, name, from, to] = line.trim().split(/\s+/);
    const errno = (osc.errno as Record<string, number>)[name ?? ''];
    if ((op !== 'read' && op !== 'write' && op !== 'flush') || errno === undefined) continue;
    out.push({ op, errno, name: name!, from: Number(from ?? 0), to: to === undefined ? Infinity : Number(to) });
  }
  return out;
}

export class FaultFilter extends Filter {
  constructor(next: BlockNode, private readonly control: string) {
    super(next);
  }

  private check(op: Op, offset: number, length: number): void {
    const f = faultsIn(this.control).find((x) => x.op === op && offset < x.to && offset + length > x.from);
    if (f) throw new IoError(`${this.name}: ${op} of ${length} bytes at ${offset} failed: ${f.name} (injected)`, f.errno);
  }

  override read(offset: number, dst: Uint8Array): Promise<void> {
    this.check('read', offset, dst.length);
    return super.read(offset, dst);
  }
  override write(offset: number, src: Uint8Array): Promise<void> {
    this.check('write', offset, src.length);
    return super.write(offset, src);
  }
  override flush(): Promise<void> {
    this.check('flush', 0, Infinity);
    return super.flush();
  }
}

/** The node, under a FaultFilter where TSMOUNT_FAULTS names a control file. */
export function withFaults(node: BlockNode): BlockNode {
  const control = process.env.TSMOUNT_FAULTS;
  return control ? new FaultFilter(node, control) : node;
}
