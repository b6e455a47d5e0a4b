// Every tsmount option spelled as `-o key[=value]`, as /etc/fstab and mount(8) give
// them: the command line is rewritten into tsmount's own flags before it is parsed,
// so both spellings go through the same checks. The options mount(8) passes to every
// helper (and mount.fuse3 ignores) are accepted and dropped; the rest stay `-o`
// options for fs/access.ts and the FUSE layer.

/** `-o key` -> flag. */
const FLAGS: Record<string, string> = {
  'force-share': '--force-share',
  'share-rw': '--share-rw',
  partitions: '--partitions',
  snapshot: '--snapshot',
  layers: '--layers',
  confine: '--confine',
  'trust-image-paths': '--trust-image-paths',
  debug: '--debug',
  preallocate: '--preallocate',
};

/** `-o key=value` -> `--flag value`. */
const VALUED: Record<string, string> = {
  cache: '--cache',
  'cache-size': '--cache-size',
  locking: '--locking',
  'secret-file': '--secret-file',
  format: '--format',
  overlay: '--overlay',
  log: '--log',
  readconfig: '--readconfig',
  'prealloc-size': '--prealloc-size',
  'prealloc-align': '--prealloc-align',
};

/**
 * What mount(8) hands every helper and means nothing to a FUSE server (mount.fuse3
 * drops the same): tsmount mounts are always nosuid,nodev, and the rest are fstab's.
 */
const IGNORED = new Set(['defaults', 'dev', 'nodev', 'suid', 'nosuid', 'auto', 'noauto', 'user', 'nouser', 'users', 'owner', 'group', 'nofail', '_netdev', 'loop']);

function ignored(key: string): boolean {
  return IGNORED.has(key) || key.startsWith('x-') || key === 'comment';
}

/** Rewrite `-o` options in `args` (argv without node and script) into tsmount's flags. */
export function expandMountOptions(args: string[]): string[] {
  const out: string[] = [];
  // rw and ro: the last one said wins, as with mount(8).
  let rw: boolean | undefined;
  const take = (list: string): void => {
    const kept: string[] = [];
    for (const o of list.split(',').filter(Boolean)) {
      const eq = o.indexOf('=');
      const key = eq < 0 ? o : o.slice(0, eq);
      const value = eq < 0 ? undefined : o.slice(eq + 1);
      if (key === 'rw' && value === undefined) rw = true;
      else if (key === 'ro' && value === undefined) rw = false;
      else if (FLAGS[key] !== undefined && value === undefined) out.push(FLAGS[key]);
      else if (VALUED[key] !== undefined && value !== undefined) out.push(`${VALUED[key]}=${value}`);
      else if (!ignored(key)) kept.push(o);
    }
    if (kept.length > 0) out.push('-o', kept.join(','));
  };
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      out.push(...args.slice(i));
      break;
    }
    if ((a === '-o' || a === '--option') && i + 1 < args.length) take(args[++i]!);
    else if (a.startsWith('--option=')) take(a.slice('--option='.length));
    else if (/^-o./.test(a)) take(a.slice(2));
    else out.push(a);
  }
  if (rw === true && !out.includes('--rw')) out.push('--rw');
  return rw === false ? out.filter((a) => a !== '--rw') : out;
}
