// The version both commands print (--version): the package's, read from package.json
// beside dist/ (or the source tree).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export function packageVersion(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const p of [path.join(here, '../../package.json'), path.join(here, '../package.json')]) {
    try {
      const v = (JSON.parse(fs.readFileSync(p, 'utf8')) as { name?: string; version?: string });
      if (v.name === 'tsmount' && v.version) return v.version;
    } catch {
      // try the next place
    }
  }
  return 'unknown';
}
