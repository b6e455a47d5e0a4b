// Turning writes through a fat:rw: disk back into changes of the host directory.
import type { FatImage } from './image.js';
import type { Overlay } from './overlay.js';

export class WriteBack {
  constructor(
    private readonly image: FatImage,
    private readonly overlay: Overlay,
    private readonly readDisk: (offset: number, dst: Uint8Array) => Promise<void>,
    private readonly warn: (text: string) => void,
  ) {}

  async commit(): Promise<void> {
    void this.image;
    void this.overlay;
    void this.readDisk;
    void this.warn;
  }
}
