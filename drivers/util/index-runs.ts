// Runs of consecutive indices, for writing table entries that sit side by side as
// one request (qcow2's pending L1 entries, the pending entries of a paged table).

/** `items` sorted by index, cut into runs whose indices follow one another. */
export function indexRuns<T extends { index: number }>(items: T[]): T[][] {
  const sorted = [...items].sort((a, b) => a.index - b.index);
  const runs: T[][] = [];
  for (const item of sorted) {
    const run = runs[runs.length - 1];
    if (run && run[run.length - 1]!.index + 1 === item.index) run.push(item);
    else runs.push([item]);
  }
  return runs;
}
