// SSH image names (qemu-block-drivers(7), "Secure Shell (ssh) disk images"):
//   ssh://[user@]server[:port]/path[?host_key_check=...]
import os from 'node:os';
import path from 'node:path';
import { UsageError } from '../../errors.js';

export const SSH_DEFAULT_PORT = 22;

export interface SshTarget {
  user: string;
  host: string;
  port: number;
  /** Absolute path on the server. */
  path: string;
  /** yes (default), no, md5:..., sha1:..., sha256:... */
  hostKeyCheck: string;
}

export function isSshSpec(spec: string): boolean {
  return /^ssh:\/\//i.test(spec);
}

/** The local user, which QEMU uses when the URI names none. */
export function localUser(): string {
  try {
    return os.userInfo().username;
  } catch {
    return process.env.USER ?? process.env.LOGNAME ?? 'root';
  }
}

function decode(s: string, spec: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new UsageError(`${spec}: bad %-escape in the ssh URI`);
  }
}

export function parseSshSpec(spec: string): SshTarget {
  const m = /^ssh:\/\/(?:([^@/?#]*)@)?(\[[^\]]+\]|[^:/?#]*)(?::([^/?#]*))?(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(spec);
  if (!m) throw new UsageError(`${spec}: expected ssh://[USER@]SERVER[:PORT]/PATH[?host_key_check=...]`);
  const host = (m[2] ?? '').replace(/^\[(.*)\]$/, '$1');
  if (!host) throw new UsageError(`${spec}: an ssh URI needs a server`);
  let port = SSH_DEFAULT_PORT;
  if (m[3] !== undefined) {
    if (!/^\d{1,5}$/.test(m[3]) || Number(m[3]) < 1 || Number(m[3]) > 65535) throw new UsageError(`${spec}: bad port '${m[3]}'`);
    port = Number(m[3]);
  }
  const p = decode(m[4] ?? '', spec);
  if (!p || p === '/') throw new UsageError(`${spec}: an ssh URI needs the image's path`);
  let hostKeyCheck = 'yes';
  for (const part of (m[5] ?? '').split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const k = decode(eq < 0 ? part : part.slice(0, eq), spec);
    // '+' is literal here (base64 fingerprints), as in QEMU's URI parser.
    const v = decode(eq < 0 ? '' : part.slice(eq + 1), spec);
    if (k !== 'host_key_check') throw new UsageError(`${spec}: unknown ssh URI parameter '${k}' (only host_key_check)`);
    hostKeyCheck = v;
  }
  const user = m[1] !== undefined && m[1] !== '' ? decode(m[1], spec) : localUser();
  return { user, host, port, path: p, hostKeyCheck };
}

/** The canonical URI of a target; it carries every option, so a backing file inherits them. */
export function formatSshUri(t: SshTarget): string {
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  const p = t.path.split('/').map(encodeURIComponent).join('/');
  const q = t.hostKeyCheck === 'yes' ? '' : `?host_key_check=${encodeURIComponent(t.hostKeyCheck).replace(/%3A/gi, ':')}`;
  return `ssh://${encodeURIComponent(t.user)}@${host}:${t.port}${p}${q}`;
}

/** A name relative to an image on the server: same server, user, port and host_key_check. */
export function resolveSshRelative(base: string, name: string): string {
  const t = parseSshSpec(base);
  const p = path.posix.isAbsolute(name) ? name : path.posix.join(path.posix.dirname(t.path), name);
  return formatSshUri({ ...t, path: p });
}

export function sshStem(spec: string): string {
  const base = path.posix.basename(parseSshSpec(spec).path);
  const dot = base.lastIndexOf('.');
  return (dot > 0 ? base.slice(0, dot) : base) || 'ssh';
}
