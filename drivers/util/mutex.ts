// One holder at a time, in arrival order. Serialises metadata changes (allocation,
// zeroing, flush) of one node; plain reads and in-place writes never take it.
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(fn);
    this.tail = result.then(
      () => undefined,
      () => undefined,
    );
    return result;
  }
}
