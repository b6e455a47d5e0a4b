// What tsimg check collects, bounded: a hostile table can name millions of bad
// entries, each counted, but only the first MAX_CHECK_MESSAGES are kept as lines.
import type { CheckReport } from '../types.js';

export const MAX_CHECK_MESSAGES = 100_000;

export function emptyReport(): CheckReport {
  return { corruptions: 0, leaks: 0, checkErrors: 0, messages: [] };
}

/** Count one corruption; keep its line while there is room, then one line saying how many were left out. */
export function addCorruption(report: CheckReport, message: string): void {
  report.corruptions++;
  addMessage(report, message);
}

export function addMessage(report: CheckReport, message: string): void {
  const n = report.messages.length;
  if (n < MAX_CHECK_MESSAGES) report.messages.push(message);
  else if (n === MAX_CHECK_MESSAGES) report.messages.push('(further problems counted but not listed)');
}
