// The error that carries qemu-img's exit code, by itself: tsimg.ts needs it for every
// failure, without loading common.ts and the block graph behind it.

/** A failure with qemu-img's exit code for it (compare and check use 2, everything else 1). */
export class ExitError extends Error {
  constructor(
    message: string,
    readonly code: number,
  ) {
    super(message);
  }
}
