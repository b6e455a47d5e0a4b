// NBD image names, every syntax of qemu-block-drivers(7) "NBD access":
//   nbd://host[:port]/[export]            nbd+tcp:// likewise
//   nbd+unix:///[export]?socket=PATH
//   nbd:host:port[:exportname=NAME]       nbd:unix:PATH[:exportname=NAME]
// and libnbd's TLS forms (nbd_connect_uri(3)): TLS required, never plaintext,
//   nbds://[user@]host[:port]/[export][?tls-certificates=DIR|tls-psk-file=FILE
//        &tls-hostname=NAME&tls-verify-peer=false]      nbds+unix:///[export]?socket=PATH&...
// (the user is the PSK identity). QEMU's --object tls-creds-* become these parameters,
// so a name carries its credentials to every file of the chain opened relative to it.
import os from 'node:os';
import path from 'node:path';
import { UsageError } from '../../errors.js';
import type { TlsCredsObject } from '../../objects.js';

export const NBD_DEFAULT_PORT = 10809;

export type NbdAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/** TLS for one target: x509 (a certificates folder, or the system's CAs) or PSK. */
export interface NbdTls {
  /** QEMU's and libnbd's layout: ca-cert.pem, optional client-cert.pem + client-key.pem, ca-crl.pem. */
  certificates?: string;
  /** Lines `username:hexkey` (QEMU's DIR/keys.psk, nbdkit's --tls-psk file). */
  pskFile?: string;
  /** The PSK identity (default: the local user name, as libnbd). */
  username?: string;
  /** Check the server's certificate (QEMU's verify-peer; default on). */
  verifyPeer: boolean;
  /** The name the certificate must carry (default: the URI's host; none over a unix socket). */
  hostname?: string;
}

export interface NbdTarget {
  address: NbdAddress;
  /** The export name; '' is the server's default export. */
  exportName: string;
  /** Present: TLS is required (STARTTLS before any other option). */
  tls?: NbdTls;
  /** QEMU's reconnect-delay: seconds requests wait for a lost connection to come back (default 0: one retry). */
  reconnectDelay?: number;
  /** QEMU's open-timeout: seconds the first connect keeps trying (default 0: once). */
  openTimeout?: number;
}

/** QEMU's nbd options that the URI carries as tsmount's own query keys. */
const TIMING_KEYS = ['reconnect-delay', 'open-timeout'];

/** A whole number of seconds, as QEMU's reconnect-delay and open-timeout. */
export function parseSeconds(v: string, what: string): number {
  if (!/^\d{1,9}$/.test(v)) throw new UsageError(`${what}: '${v}' is not a whole number of seconds`);
  return Number(v);
}

export function isNbdSpec(spec: string): boolean {
  return /^nbd(\+tcp|\+unix)?:|^nbds(\+tcp|\+unix)?:\/\//i.test(spec);
}

const TLS_KEYS = ['tls-certificates', 'tls-psk-file', 'tls-hostname', 'tls-verify-peer'];

/** nbds:// parameters and user name -> NbdTls; anything unknown is refused. */
function parseTls(query: Map<string, string>, user: string | undefined, spec: string): NbdTls {
  const tls: NbdTls = { verifyPeer: true };
  const certificates = query.get('tls-certificates');
  const pskFile = query.get('tls-psk-file');
  if (certificates !== undefined && pskFile !== undefined) throw new UsageError(`${spec}: give tls-certificates or tls-psk-file, not both`);
  if (certificates) tls.certificates = certificates;
  if (pskFile) {
    tls.pskFile = pskFile;
    tls.username = user || os.userInfo().username;
  } else if (user) {
    throw new UsageError(`${spec}: a user name is the TLS-PSK identity and needs tls-psk-file=FILE`);
  }
  const hostname = query.get('tls-hostname');
  if (hostname) tls.hostname = hostname;
  const verify = query.get('tls-verify-peer');
  if (verify !== undefined) {
    if (/^(false|off|no|0)$/i.test(verify)) tls.verifyPeer = false;
    else if (!/^(true|on|yes|1)$/i.test(verify)) throw new UsageError(`${spec}: tls-verify-peer must be true or false`);
  }
  return tls;
}

function decode(s: string, spec: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new UsageError(`${spec}: bad %-escape in the NBD URI`);
  }
}

function parsePort(p: string, spec: string): number {
  if (!/^\d{1,5}$/.test(p) || Number(p) < 1 || Number(p) > 65535) throw new UsageError(`${spec}: bad port '${p}'`);
  return Number(p);
}

/** Query parameters, %-decoded; '+' stays '+' as in QEMU's URI parser. */
function parseQuery(q: string, spec: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const part of q.split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const k = decode(eq < 0 ? part : part.slice(0, eq), spec);
    m.set(k, decode(eq < 0 ? '' : part.slice(eq + 1), spec));
  }
  return m;
}

export function parseNbdSpec(spec: string): NbdTarget {
  const uri = /^nbd(s)?(\+tcp|\+unix)?:\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(spec);
  if (uri) {
    const secure = !!uri[1];
    const transport = (uri[2] ?? '+tcp').toLowerCase();
    const scheme = `nbd${secure ? 's' : ''}${transport === '+unix' ? '+unix' : ''}://`;
    let authority = uri[3] ?? '';
    const at = authority.lastIndexOf('@');
    const user = at >= 0 ? decode(authority.slice(0, at), spec) : undefined;
    if (at >= 0) authority = authority.slice(at + 1);
    const exportName = decode((uri[4] ?? '').replace(/^\//, ''), spec);
    const query = parseQuery(uri[5] ?? '', spec);
    for (const k of query.keys()) {
      if (k === 'socket' && transport === '+unix') continue;
      if (TIMING_KEYS.includes(k)) continue;
      if (TLS_KEYS.includes(k) && secure) continue;
      if (TLS_KEYS.includes(k)) throw new UsageError(`${spec}: '${k}' needs TLS: use nbds${transport === '+unix' ? '+unix' : ''}://`);
      throw new UsageError(`${spec}: unknown NBD URI parameter '${k}'`);
    }
    if (!secure && user !== undefined) throw new UsageError(`${spec}: a user name is for TLS-PSK: use nbds${transport === '+unix' ? '+unix' : ''}://`);
    const tls: Partial<NbdTarget> = secure ? { tls: parseTls(query, user, spec) } : {};
    const rd = query.get('reconnect-delay');
    if (rd !== undefined) tls.reconnectDelay = parseSeconds(rd, `${spec}: reconnect-delay`);
    const ot = query.get('open-timeout');
    if (ot !== undefined) tls.openTimeout = parseSeconds(ot, `${spec}: open-timeout`);
    if (transport === '+unix') {
      if (authority) throw new UsageError(`${spec}: ${scheme} takes no host (${scheme}/EXPORT?socket=PATH)`);
      const socket = query.get('socket');
      if (!socket) throw new UsageError(`${spec}: ${scheme} needs ?socket=PATH`);
      return { address: { kind: 'unix', path: socket }, exportName, ...tls };
    }
    const hp = /^(?:\[([^\]]+)\]|([^:]*))(?::(\d*))?$/.exec(authority);
    const host = hp?.[1] ?? hp?.[2] ?? '';
    if (!hp || !host) throw new UsageError(`${spec}: an NBD URI needs a host (${scheme}HOST[:PORT]/[EXPORT])`);
    const port = hp[3] ? parsePort(hp[3], spec) : NBD_DEFAULT_PORT;
    return { address: { kind: 'tcp', host, port }, exportName, ...tls };
  }
  // The legacy syntax: ':exportname=' ends the address wherever it appears (QEMU's strstr).
  const m = /^nbd:(.*)$/i.exec(spec);
  if (!m) throw new UsageError(`${spec}: not an NBD image name`);
  let rest = m[1]!;
  let exportName = '';
  const en = rest.indexOf(':exportname=');
  if (en >= 0) {
    exportName = rest.slice(en + ':exportname='.length);
    rest = rest.slice(0, en);
  }
  if (rest.startsWith('unix:')) {
    const path = rest.slice(5);
    if (!path) throw new UsageError(`${spec}: nbd:unix: needs a socket path`);
    return { address: { kind: 'unix', path }, exportName };
  }
  const hp = /^(?:\[([^\]]+)\]|([^:]+))(?::(\d*))?$/.exec(rest);
  const host = hp?.[1] ?? hp?.[2];
  if (!hp || !host) throw new UsageError(`${spec}: expected nbd:HOST:PORT[:exportname=NAME] or nbd:unix:PATH[:exportname=NAME]`);
  const port = hp[3] ? parsePort(hp[3], spec) : NBD_DEFAULT_PORT;
  return { address: { kind: 'tcp', host, port }, exportName };
}

/** QEMU's tls-creds object (and the nbd driver's tls-hostname) as the TLS of a target. */
export function nbdTlsFromObject(o: TlsCredsObject, hostname: string | undefined): NbdTls {
  const tls: NbdTls =
    o.type === 'tls-creds-psk' ? { pskFile: path.join(o.dir, 'keys.psk'), username: o.username, verifyPeer: true } : { certificates: o.dir, verifyPeer: o.verifyPeer };
  if (hostname) tls.hostname = hostname;
  return tls;
}

/** A query value that stays readable (paths keep their slashes) and parses back the same. */
function queryValue(v: string): string {
  return encodeURI(v).replace(/[?&#=+]/g, (c) => encodeURIComponent(c));
}

/** The URI form of a target (messages, and backing files resolved on the same server). */
export function formatNbdUri(t: NbdTarget): string {
  const exp = t.exportName.split('/').map(encodeURIComponent).join('/');
  const s = t.tls ? 's' : '';
  const query: string[] = [];
  const user = t.tls?.pskFile && t.tls.username ? `${encodeURIComponent(t.tls.username)}@` : '';
  if (t.address.kind === 'unix') query.push(`socket=${queryValue(t.address.path)}`);
  if (t.tls?.certificates) query.push(`tls-certificates=${queryValue(t.tls.certificates)}`);
  if (t.tls?.pskFile) query.push(`tls-psk-file=${queryValue(t.tls.pskFile)}`);
  if (t.tls?.hostname) query.push(`tls-hostname=${queryValue(t.tls.hostname)}`);
  if (t.tls && !t.tls.verifyPeer) query.push('tls-verify-peer=false');
  if (t.reconnectDelay) query.push(`reconnect-delay=${t.reconnectDelay}`);
  if (t.openTimeout) query.push(`open-timeout=${t.openTimeout}`);
  const q = query.length ? `?${query.join('&')}` : '';
  if (t.address.kind === 'unix') return `nbd${s}+unix://${user}/${exp}${q}`;
  const host = t.address.host.includes(':') ? `[${t.address.host}]` : t.address.host;
  return `nbd${s}://${user}${host}:${t.address.port}/${exp}${q}`;
}

/**
 * A backing file named relative to an NBD image: another export on the same server,
 * named as QEMU's path_combine names it (the export's directory part + the name).
 */
export function resolveNbdRelative(base: string, name: string): string {
  const t = parseNbdSpec(base);
  const slash = t.exportName.lastIndexOf('/');
  const dir = slash >= 0 ? t.exportName.slice(0, slash + 1) : '';
  const exportName = name.startsWith('/') ? name.slice(1) : dir + name;
  return formatNbdUri({ ...t, exportName });
}

/** The flat file's stem: the export's last component without extension, or 'nbd'. */
export function nbdStem(spec: string): string {
  const t = parseNbdSpec(spec);
  const last = t.exportName.split('/').filter(Boolean).pop() ?? '';
  const dot = last.lastIndexOf('.');
  return (dot > 0 ? last.slice(0, dot) : last) || 'nbd';
}

export function describeAddress(a: NbdAddress): string {
  return a.kind === 'unix' ? `unix:${a.path}` : `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}
