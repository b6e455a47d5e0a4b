// GlusterFS image names (qemu-block-drivers(7), "GlusterFS disk images"):
//   gluster[+tcp|+rdma]://[host[:port]]/volume/path      default port 24007
//   gluster+unix:///volume/path?socket=/path/to/sock
// and QEMU's option form (json:{"driver":"gluster",...} and --image-opts): volume, path,
// server.N.type=tcp|inet|unix with host/port or path (socket), debug, logfile. A name
// carries every option (tsmount's own query keys `server`, `debug`, `logfile` hold what
// a plain URI cannot), so a backing file opened relative to it keeps them.
import path from 'node:path';
import { UsageError } from '../../errors.js';

export const GLUSTER_DEFAULT_PORT = 24007;
/** QEMU's GLUSTER_DEBUG_DEFAULT and GLUSTER_DEBUG_MAX. */
export const GLUSTER_DEBUG_DEFAULT = 4;
export const GLUSTER_DEBUG_MAX = 9;
/**
 * Where libgfapi logs when no logfile is given. QEMU's default is '-' (stderr), which
 * prints several lines of libgfapi's for a mistyped volume; tsmount says what failed
 * in one line of its own, and libgfapi's log is there for the asking (logfile=-).
 */
export const GLUSTER_LOGFILE_DEFAULT = '/dev/null';

export type GlusterServer = { type: 'tcp'; host: string; port: number } | { type: 'unix'; socket: string };

export interface GlusterTarget {
  /** Tried in order by libgfapi until one answers. */
  servers: GlusterServer[];
  volume: string;
  /** Inside the volume, with a leading '/'. */
  path: string;
  debug: number;
  logfile: string;
  /** A '+rdma' URI was given: libgfapi is asked for tcp instead (as QEMU does), with a warning. */
  rdma?: boolean;
}

export function isGlusterSpec(spec: string): boolean {
  return /^gluster(\+tcp|\+unix|\+rdma)?:\/\//i.test(spec);
}

function decode(s: string, spec: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new UsageError(`${spec}: bad %-escape in the gluster URI`);
  }
}

function parsePort(p: string, spec: string): number {
  if (!/^\d{1,5}$/.test(p) || Number(p) < 1 || Number(p) > 65535) throw new UsageError(`${spec}: bad port '${p}'`);
  return Number(p);
}

function parseDebug(v: string, spec: string): number {
  // QEMU clamps out-of-range levels to 0..9.
  if (!/^-?\d+$/.test(v)) throw new UsageError(`${spec}: debug must be an integer (0 to ${GLUSTER_DEBUG_MAX})`);
  return Math.min(GLUSTER_DEBUG_MAX, Math.max(0, Number(v)));
}

/** `/volume/path/in/volume` -> volume and path, as QEMU's parse_volume_options. */
function splitVolumePath(p: string, spec: string): { volume: string; path: string } {
  const m = /^\/*([^/]+)\/+(.+)$/.exec(p);
  if (!m) throw new UsageError(`${spec}: expected /VOLUME/PATH after the server`);
  return { volume: m[1]!, path: `/${m[2]!}` };
}

/** One `server=` value of the canonical form: tcp:HOST:PORT or unix:PATH. */
function parseServerParam(v: string, spec: string): GlusterServer {
  if (v.startsWith('unix:') && v.length > 5) return { type: 'unix', socket: v.slice(5) };
  const m = /^tcp:(\[[^\]]+\]|[^:]+)(?::(\d+))?$/.exec(v);
  if (!m) throw new UsageError(`${spec}: bad server '${v}' (tcp:HOST[:PORT] or unix:PATH)`);
  return { type: 'tcp', host: m[1]!.replace(/^\[(.*)\]$/, '$1'), port: m[2] ? parsePort(m[2], spec) : GLUSTER_DEFAULT_PORT };
}

export function parseGlusterSpec(spec: string): GlusterTarget {
  const m = /^gluster(?:\+(tcp|unix|rdma))?:\/\/(\[[^\]]*\]|[^:/?#]*)(?::([^/?#]*))?(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(spec);
  if (!m) throw new UsageError(`${spec}: expected gluster[+tcp|+unix|+rdma]://[SERVER[:PORT]]/VOLUME/PATH[?socket=...]`);
  const transport = (m[1] ?? 'tcp').toLowerCase();
  const host = decode((m[2] ?? '').replace(/^\[(.*)\]$/, '$1'), spec);
  const { volume, path: p } = splitVolumePath(decode(m[4] ?? '', spec), spec);
  const extra: GlusterServer[] = [];
  let socket: string | undefined;
  let debug = GLUSTER_DEBUG_DEFAULT;
  let logfile = GLUSTER_LOGFILE_DEFAULT;
  for (const part of (m[5] ?? '').split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const k = decode(eq < 0 ? part : part.slice(0, eq), spec);
    const v = decode(eq < 0 ? '' : part.slice(eq + 1), spec);
    if (k === 'socket') socket = v;
    else if (k === 'server') extra.push(parseServerParam(v, spec));
    else if (k === 'debug') debug = parseDebug(v, spec);
    else if (k === 'logfile') logfile = v;
    else throw new UsageError(`${spec}: unknown gluster URI parameter '${k}'`);
  }
  let first: GlusterServer;
  if (transport === 'unix') {
    if (host || m[3] !== undefined) throw new UsageError(`${spec}: a gluster+unix URI names no server or port, only ?socket=PATH`);
    if (!socket) throw new UsageError(`${spec}: gluster+unix needs ?socket=PATH`);
    first = { type: 'unix', socket };
  } else {
    if (socket !== undefined) throw new UsageError(`${spec}: ?socket= is only for gluster+unix`);
    first = { type: 'tcp', host: host || 'localhost', port: m[3] !== undefined && m[3] !== '' ? parsePort(m[3], spec) : GLUSTER_DEFAULT_PORT };
  }
  const t: GlusterTarget = { servers: [first, ...extra], volume, path: p, debug, logfile };
  if (transport === 'rdma') t.rdma = true;
  return t;
}

function hostPort(s: { host: string; port: number }): string {
  return `${s.host.includes(':') ? `[${s.host}]` : s.host}:${s.port}`;
}

const enc = (s: string): string => encodeURIComponent(s).replace(/%2F/gi, '/').replace(/%3A/gi, ':');

/** The canonical name of a target: QEMU's URI where that says it all, tsmount's query keys for the rest. */
export function formatGlusterUri(t: GlusterTarget): string {
  const [first, ...rest] = t.servers;
  if (!first) throw new UsageError(`gluster: no server`);
  const q: string[] = [];
  let head: string;
  if (first.type === 'unix') {
    head = `gluster+unix://`;
    q.push(`socket=${enc(first.socket)}`);
  } else {
    head = `gluster://${hostPort(first)}`;
  }
  for (const s of rest) q.push(`server=${s.type === 'unix' ? `unix:${enc(s.socket)}` : `tcp:${enc(hostPort(s))}`}`);
  if (t.debug !== GLUSTER_DEBUG_DEFAULT) q.push(`debug=${t.debug}`);
  if (t.logfile !== GLUSTER_LOGFILE_DEFAULT) q.push(`logfile=${enc(t.logfile)}`);
  const p = `/${encodeURIComponent(t.volume)}${t.path.split('/').map(encodeURIComponent).join('/')}`;
  return `${head}${p}${q.length ? `?${q.join('&')}` : ''}`;
}

/**
 * QEMU's gluster options (the keys under `prefix`, taken out of `o`): volume, path,
 * server.N.{type,host,port,path,socket}, debug, logfile -> the canonical URI.
 */
export function glusterSpecFromOptions(take: (k: string) => string | undefined, has: (k: string) => boolean): string {
  const volume = take('volume');
  const p = take('path');
  if (!volume || !p) throw new UsageError(`--image-opts: gluster needs volume and path`);
  const servers: GlusterServer[] = [];
  for (let i = 0; has(`server.${i}.type`) || has(`server.${i}.host`) || has(`server.${i}.path`) || has(`server.${i}.socket`); i++) {
    const type = (take(`server.${i}.type`) ?? (has(`server.${i}.path`) || has(`server.${i}.socket`) ? 'unix' : 'tcp')).toLowerCase();
    if (type === 'unix') {
      const sock = take(`server.${i}.path`) ?? take(`server.${i}.socket`);
      if (!sock) throw new UsageError(`--image-opts: gluster server.${i} of type unix needs path`);
      servers.push({ type: 'unix', socket: sock });
    } else if (type === 'tcp' || type === 'inet') {
      const host = take(`server.${i}.host`);
      if (!host) throw new UsageError(`--image-opts: gluster server.${i} needs host`);
      const port = take(`server.${i}.port`);
      servers.push({ type: 'tcp', host, port: port === undefined ? GLUSTER_DEFAULT_PORT : parsePort(port, '--image-opts: gluster') });
    } else {
      throw new UsageError(`--image-opts: gluster server.${i}.type must be tcp or unix, not '${type}'`);
    }
  }
  if (!servers.length) throw new UsageError(`--image-opts: gluster needs at least one server (server.0.host=...)`);
  const debug = take('debug');
  return formatGlusterUri({
    servers,
    volume,
    path: p.startsWith('/') ? p : `/${p}`,
    debug: debug === undefined ? GLUSTER_DEBUG_DEFAULT : parseDebug(debug, '--image-opts: gluster'),
    logfile: take('logfile') ?? GLUSTER_LOGFILE_DEFAULT,
  });
}

/** A name relative to an image on the volume: same servers, volume and options. */
export function resolveGlusterRelative(base: string, name: string): string {
  const t = parseGlusterSpec(base);
  const p = path.posix.isAbsolute(name) ? name : path.posix.join(path.posix.dirname(t.path), name);
  return formatGlusterUri({ ...t, path: path.posix.normalize(p) });
}

export function glusterStem(spec: string): string {
  const base = path.posix.basename(parseGlusterSpec(spec).path);
  const dot = base.lastIndexOf('.');
  return (dot > 0 ? base.slice(0, dot) : base) || 'gluster';
}

/** For messages: where libgfapi looked. */
export function describeServers(t: GlusterTarget): string {
  return t.servers.map((s) => (s.type === 'unix' ? `unix:${s.socket}` : hostPort(s))).join(', ');
}
