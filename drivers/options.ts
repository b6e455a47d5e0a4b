// Creation options as qemu-img takes them: -o key=value,key=value (",," is a comma).
import { UsageError } from './errors.js';

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

/** Split "a=1,b=x,,y" into [['a','1'], ['b','x,y']]; later -o strings add to earlier ones. */
export function parseOptionString(text: string): [string, string][] {
  const out: [string, string][] = [];
  let cur = '';
  const items: string[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (c === ',') {
      items.push(cur);
      cur = '';
    } else cur += c;
  }
  items.push(cur);
  for (const item of items) {
    if (item === '') continue;
    const eq = item.indexOf('=');
    if (eq <= 0) throw new UsageError(`option '${item}' needs a value (key=value)`);
    out.push([item.slice(0, eq), item.slice(eq + 1)]);
  }
  return out;
}

/**
 * Typed access to creation options. A driver reads what it understands; finish()
 * rejects the rest, as qemu-img does ("Invalid parameter").
 */
export class CreateOptions {
  private readonly values = new Map<string, string>();
  private readonly used = new Set<string>();

  constructor(entries: Iterable<[string, string]> = []) {
    for (const [k, v] of entries) this.values.set(k, v);
  }

  has(key: string): boolean {
    return this.values.has(key);
  }

  set(key: string, value: string): void {
    this.values.set(key, value);
  }

  string(key: string): string | undefined {
    this.used.add(key);
    return this.values.get(key);
  }

  choice<T extends string>(key: string, allowed: readonly T[]): T | undefined {
    const v = this.string(key);
    if (v === undefined) return undefined;
    if (!(allowed as readonly string[]).includes(v)) throw new UsageError(`invalid value '${v}' for ${key} (one of: ${allowed.join(', ')})`);
    return v as T;
  }

  bool(key: string): boolean | undefined {
    const v = this.string(key);
    if (v === undefined) return undefined;
    if (['on', 'yes', 'true'].includes(v)) return true;
    if (['off', 'no', 'false'].includes(v)) return false;
    throw new UsageError(`invalid value '${v}' for ${key} (on or off)`);
  }

  size(key: string): number | undefined {
    const v = this.string(key);
    return v === undefined ? undefined : parseSize(v, key);
  }

  int(key: string, min: number, max: number): number | undefined {
    const v = this.string(key);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new UsageError(`invalid value '${v}' for ${key} (an integer from ${min} to ${max})`);
    return n;
  }

  /** Keys given but never read by the driver. */
  unused(): string[] {
    return [...this.values.keys()].filter((k) => !this.used.has(k));
  }

  finish(format: string): void {
    const left = this.unused();
    if (left.length) throw new UsageError(`Invalid parameter '${left[0]}' for format ${format}`);
  }
}
