// A module loader hook that appends every module a process imports (its URL, one a
// line) to the file TSMOUNT_LOAD_TRACE names: what a command loads at start-up, for
// the lazy-loading tests. Registered by load-trace-register.js through --import.
import fs from 'node:fs';

type Resolved = { url: string };
type NextResolve = (specifier: string, context: unknown) => Promise<Resolved>;

export async function resolve(specifier: string, context: unknown, next: NextResolve): Promise<Resolved> {
  const r = await next(specifier, context);
  const out = process.env.TSMOUNT_LOAD_TRACE;
  if (out) fs.appendFileSync(out, `${r.url}\n`);
  return r;
}
