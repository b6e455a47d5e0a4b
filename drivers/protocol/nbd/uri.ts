// NBD image names, every syntax of qemu-block-drivers(7) "NBD access":
//   nbd://host[:port]/[export]            nbd+tcp:// likewise
//   nbd+unix:///[export]?socket=PATH
//   nbd:host:port[:exportname=NAME]       nbd:unix:PATH[:exportname=NAME]
import { UsageError } from '../../errors.js';

export const NBD_DEFAULT_PORT = 10809;

export type NbdAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface NbdTarget {
  address: NbdAddress;
  /** The export name; '' is the server's default export. */
  exportName: string;
}

export function isNbdSpec(spec: string): boolean {
  return /^nbd(\+tcp|\+unix)?:/i.test(spec);
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
  const uri = /^nbd(\+tcp|\+unix)?:\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(spec);
  if (uri) {
    const transport = (uri[1] ?? '+tcp').toLowerCase();
    const authority = uri[2] ?? '';
    const exportName = decode((uri[3] ?? '').replace(/^\//, ''), spec);
    const query = parseQuery(uri[4] ?? '', spec);
    if (transport === '+unix') {
      if (authority) throw new UsageError(`${spec}: nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)`);
      const socket = query.get('socket');
      if (!socket) throw new UsageError(`${spec}: nbd+unix:// needs ?socket=PATH`);
      for (const k of query.keys()) if (k !== 'socket') throw new UsageError(`${spec}: unknown NBD URI parameter '${k}'`);
      return { address: { kind: 'unix', path: socket }, exportName };
    }
    if (query.size) throw new UsageError(`${spec}: nbd:// takes no parameters`);
    const hp = /^(?:\[([^\]]+)\]|([^:]*))(?::(\d*))?$/.exec(authority);
    const host = hp?.[1] ?? hp?.[2] ?? '';
    if (!hp || !host) throw new UsageError(`${spec}: an NBD URI needs a host (nbd://HOST[:PORT]/[EXPORT])`);
    const port = hp[3] ? parsePort(hp[3], spec) : NBD_DEFAULT_PORT;
    return { address: { kind: 'tcp', host, port }, exportName };
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

/** The URI form of a target (messages, and backing files resolved on the same server). */
export function formatNbdUri(t: NbdTarget): string {
  const exp = t.exportName.split('/').map(encodeURIComponent).join('/');
  if (t.address.kind === 'unix') return `nbd+unix:///${exp}?socket=${encodeURI(t.address.path)}`;
  const host = t.address.host.includes(':') ? `[${t.address.host}]` : t.address.host;
  return `nbd://${host}:${t.address.port}/${exp}`;
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
  return formatNbdUri({ address: t.address, exportName });
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
