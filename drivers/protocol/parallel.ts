// Spreading a request over several connections (NBD's multi-conn, parallel SFTP reads).

/** Run fn over items with at most `limit` in flight; rejects with the first failure after all settle. */
export async function inParallel<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let firstError: unknown;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const item = items[next++]!;
      try {
        await fn(item);
      } catch (err) {
        firstError ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (firstError !== undefined) throw firstError;
}

/** [offset, length) cut into [offset, length] pieces of at most `piece` bytes. */
export function pieces(offset: number, length: number, piece: number): [number, number][] {
  const out: [number, number][] = [];
  for (let o = offset; o < offset + length; o += piece) out.push([o, Math.min(piece, offset + length - o)]);
  return out;
}
