// The vvfat protocol node: a FAT disk made from a host directory (QEMU's vvfat). Read
// only unless named fat:rw: and opened read-write; then writes land in an overlay and
// are turned back into host directory changes at flush (writeback.ts).
import type { BlockNode, Extent, ProtocolOpenOptions } from '../../types.js';
import { UsageError } from '../../errors.js';
import { FatImage } from './image.js';
import { parseVvfatSpec } from './spec.js';
import { Overlay } from './overlay.js';
import { WriteBack } from './writeback.js';
import { SECTOR } from './layout.js';

export interface VvfatOpenOptions extends ProtocolOpenOptions {
  /** Where warnings go (default: stderr as "tsmount: warning: ...", which the server logs). */
  warn?: (text: string) => void;
}

const stderrWarn = (text: string): void => {
  process.stderr.write(`tsmount: warning: ${text}\n`);
};

export class VvfatNode implements BlockNode {
  readonly size: number;
  readonly requestAlignment: number | undefined;
  private closed = false;

  private constructor(
    readonly name: string,
    private readonly image: FatImage,
    private readonly overlay: Overlay | undefined,
    private readonly writeBack: WriteBack | undefined,
  ) {
    this.size = image.size;
    // The overlay keeps whole sectors.
    this.requestAlignment = overlay ? SECTOR : undefined;
  }

  get readOnly(): boolean {
    return this.overlay === undefined;
  }

  static async open(spec: string, opts: VvfatOpenOptions): Promise<VvfatNode> {
    const parsed = parseVvfatSpec(spec);
    if (!opts.readOnly && !parsed.rw) throw new UsageError(`${spec}: a virtual FAT disk is writable only when named fat:rw:DIR`);
    const warn = opts.warn ?? stderrWarn;
    const image = new FatImage(parsed, spec, warn);
    if (opts.readOnly) return new VvfatNode(spec, image, undefined, undefined);
    const overlay = await Overlay.create(image.size);
    return new VvfatNode(spec, image, overlay, new WriteBack(image, overlay, (offset, dst) => overlay.readOver(offset, dst, (o, d) => image.read(o, d)), warn));
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    if (!this.overlay) return this.image.read(offset, dst);
    return this.overlay.readOver(offset, dst, (o, d) => this.image.read(o, d));
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    // Only reached when writable: the graph builder's read-only filter refuses the rest.
    await this.overlay!.write(offset, src);
  }

  async flush(): Promise<void> {
    await this.writeBack?.commit();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, kind: 'data' }];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.writeBack?.commit(true);
    } finally {
      await this.overlay?.close();
      await this.image.files.close();
    }
  }
}
