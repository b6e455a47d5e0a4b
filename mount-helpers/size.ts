import { UsageError } from '../drivers/errors.js';

const UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** "64M", "1G", "4096": sizes as qemu-img writes them (powers of 1024). */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgtpeb]?)(?:i?b)?$/i.exec(text.trim());
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw new UsageError(`${what}: '${text}' is not a size (e.g. 64M, 1G)`);
  const n = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(n)) throw new UsageError(`${what}: '${text}' is too large`);
  return n;
}
