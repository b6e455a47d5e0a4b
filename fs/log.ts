// Where the server's messages go. Always stderr: the terminal in --foreground, the
// --log file, or the starting command until the mount is ready (then a closed pipe,
// harmlessly). A detached server without --log also sends them to syslog, as daemons
// do: an RFC 3164 datagram (facility daemon, tag tsmount[PID]) on /dev/log, which the
// journal or rsyslog reads (`journalctl -t tsmount`, /var/log/syslog). The socket is
// opened before anything is mounted: the serving process never spawns `logger`.
// Debug output (the `debug` package's namespaces tsmount:fuse, tsmount:qcow2,
// tsmount:nbd, ...; enabled by DEBUG=... or --debug) goes to stderr too, so into the
// --log file, never to syslog.
import util from 'node:util';
import createDebug from '../drivers/util/debug.js';
import { closeFd, connectDatagram, sendDatagram } from '../drivers/util/sys.js';

const debug = createDebug('tsmount:log');

export type Severity = 'err' | 'warning' | 'info';
const SEVERITY: Record<Severity, number> = { err: 3, warning: 4, info: 6 };
const FACILITY_DAEMON = 3;
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

let syslogPath: string | undefined;
let syslogFd: number | undefined;

/** The socket syslog listens on; TSMOUNT_SYSLOG_SOCKET points elsewhere (tests). */
export function syslogSocket(): string {
  return process.env.TSMOUNT_SYSLOG_SOCKET || '/dev/log';
}

/** The real stderr write: log() uses it, so the tee below never sends a line twice. */
const writeStderr = process.stderr.write.bind(process.stderr);

// debug's lines ("2026-12-02T21:00:00.000Z tsmount:fuse request 2: LOOKUP ...") go
// where the server's messages go, past the syslog tee.
createDebug.log = (...args: unknown[]): void => void writeStderr(`${util.format(...args)}\n`);

/** The namespaces --debug turns on: every tsmount one, besides whatever DEBUG names. */
export const DEBUG_ALL = 'tsmount:*';

/** Turn on debug output for tsmount's namespaces (--debug, -o debug), keeping DEBUG's. */
export function enableDebug(): void {
  createDebug.enable([process.env.DEBUG, DEBUG_ALL].filter(Boolean).join(','));
}

/**
 * Send messages to syslog from now on; without a syslog socket, they go nowhere more.
 * Lines other modules write to stderr as "tsmount: ..." (lock warnings, NBD
 * reconnects) go there too; DEBUG output does not.
 */
export function openSyslog(): void {
  syslogPath = syslogSocket();
  connect();
  const tee = (chunk: string | Uint8Array, encoding?: BufferEncoding | ((err?: Error | null) => void), cb?: (err?: Error | null) => void): boolean => {
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    for (const line of text.split('\n')) if (line.startsWith('tsmount: ')) toSyslog('warning', nameOnce(line.slice(9)));
    return typeof encoding === 'function' ? writeStderr(chunk, encoding) : writeStderr(chunk, encoding, cb);
  };
  process.stderr.write = tee;
}

function connect(): boolean {
  if (syslogPath === undefined) return false;
  try {
    syslogFd = connectDatagram(syslogPath);
    return true;
  } catch (err) {
    debug('syslog socket %s: %s', syslogPath, (err as Error).message);
    syslogFd = undefined;
    return false;
  }
}

/** "Dec  2 13:02:01", local time, as syslog(3) writes it. */
function timestamp(d: Date): string {
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${MONTHS[d.getMonth()]} ${String(d.getDate()).padStart(2, ' ')} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function toSyslog(severity: Severity, msg: string): void {
  if (syslogPath === undefined) return;
  const line = Buffer.from(`<${FACILITY_DAEMON * 8 + SEVERITY[severity]}>${timestamp(new Date())} tsmount[${process.pid}]: ${msg}`);
  // A restarted syslog daemon has a new socket: connect again once.
  for (let attempt = 0; attempt < 2; attempt++) {
    if (syslogFd === undefined && (attempt > 0 || !connect())) return;
    try {
      sendDatagram(syslogFd!, line);
      return;
    } catch {
      closeFd(syslogFd!);
      syslogFd = undefined;
    }
  }
}

/**
 * "IMAGE: read at 0+4096: IMAGE: L2 entry past the end" says the image twice: a
 * reason that names the image again loses its own copy of the name.
 */
export function nameOnce(msg: string): string {
  const m = /^([^:]+): /.exec(msg);
  if (!m) return msg;
  const name = m[1]!;
  const rest = msg.slice(m[0].length);
  const again = `: ${name}: `;
  const i = rest.indexOf(again);
  return i < 0 ? msg : `${name}: ${rest.slice(0, i)}: ${rest.slice(i + again.length)}`;
}

/** One message, one line: stderr (as "tsmount: MSG") and, when open, syslog. */
export function log(severity: Severity, msg: string): void {
  const text = nameOnce(msg).replace(/\n/g, ' ');
  writeStderr(`tsmount: ${text}\n`);
  toSyslog(severity, text);
}
