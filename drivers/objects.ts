// QEMU's --object, for the objects tsmount and tsimg take (qemu-img's spelling):
//   --object tls-creds-x509,id=ID,dir=DIR[,endpoint=client][,verify-peer=on|off]
//   --object tls-creds-psk,id=ID,dir=DIR[,endpoint=client][,username=NAME]
//   --object secret,id=ID,data=TEXT|file=FILE[,format=raw|base64]
// Images name them by id (the nbd driver's tls-creds=ID, the iscsi driver's
// password-secret=ID, luks's key-secret=ID, qcow2's encrypt.key-secret=ID). The type may also be given
// as qom-type=TYPE; ',,' is a comma, as in every QEMU option list.
import { UsageError } from './errors.js';
import { parseOptionString } from './options.js';
import fs from 'node:fs';

export interface TlsCredsObject {
  type: 'tls-creds-x509' | 'tls-creds-psk';
  id: string;
  /** x509: ca-cert.pem, client-cert.pem, client-key.pem; psk: keys.psk. */
  dir: string;
  /** x509: check the server's certificate (QEMU's default: on). */
  verifyPeer: boolean;
  /** psk: the identity (QEMU's default: qemu). */
  username: string;
}

/** QEMU's secret object: a passphrase, given inline or in a file. */
export interface SecretObject {
  type: 'secret';
  id: string;
  /** The passphrase, decoded (format=base64) and read (file=). */
  data: string;
}

export type QemuObject = TlsCredsObject | SecretObject;

/** The objects by id. */
export type QemuObjects = ReadonlyMap<string, QemuObject>;

const TYPES: readonly string[] = ['tls-creds-x509', 'tls-creds-psk'] satisfies TlsCredsObject['type'][];
const isTlsCreds = (t: string): t is TlsCredsObject['type'] => TYPES.includes(t);

function onOff(v: string, what: string): boolean {
  if (/^(on|yes|true)$/.test(v)) return true;
  if (/^(off|no|false)$/.test(v)) return false;
  throw new UsageError(`--object: ${what} must be on or off, not '${v}'`);
}

/** One --object value. */
export function parseObject(text: string): QemuObject {
  const comma = text.indexOf(',');
  const first = comma < 0 ? text : text.slice(0, comma);
  // The type comes first, bare (QEMU's implied qom-type), or as qom-type= anywhere.
  const bare = first.includes('=') ? undefined : first;
  const props = new Map<string, string>();
  for (const [k, v] of parseOptionString(bare === undefined ? text : text.slice(first.length + 1))) {
    if (props.has(k)) throw new UsageError(`--object: '${k}' given twice`);
    props.set(k, v);
  }
  const take = (k: string): string | undefined => {
    const v = props.get(k);
    props.delete(k);
    return v;
  };
  const type = bare ?? take('qom-type');
  if (!type) throw new UsageError(`--object: '${text}' names no object type`);
  if (!isTlsCreds(type) && type !== 'secret') throw new UsageError(`--object: type '${type}' is not supported here (only secret, tls-creds-x509, tls-creds-psk)`);
  const id = take('id');
  if (!id) throw new UsageError(`--object ${type}: id=ID is required`);
  if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) throw new UsageError(`--object ${type}: '${id}' is not a valid id`);
  const rest = (): void => {
    const k = [...props.keys()][0];
    if (k !== undefined) throw new UsageError(`--object ${type},id=${id}: property '${k}' is not supported`);
  };
  if (type === 'secret') {
    const data = take('data');
    const file = take('file');
    const format = take('format') ?? 'raw';
    if ((data === undefined) === (file === undefined)) throw new UsageError(`--object secret,id=${id}: give data=TEXT or file=FILE (one of them)`);
    if (format !== 'raw' && format !== 'base64') throw new UsageError(`--object secret,id=${id}: format must be raw or base64, not '${format}'`);
    if (props.has('keyid') || props.has('iv')) throw new UsageError(`--object secret,id=${id}: encrypted secrets (keyid=, iv=) are not supported`);
    rest();
    // The file is read whole, as QEMU's secret object reads it (a trailing newline is part of the key).
    const text = data ?? readSecretFile(file!);
    if (format === 'raw') return { type, id, data: text };
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text.trim())) throw new UsageError(`--object secret,id=${id}: the data is not base64`);
    return { type, id, data: Buffer.from(text.trim(), 'base64').toString('utf8') };
  }
  const dir = take('dir');
  if (!dir) throw new UsageError(`--object ${type},id=${id}: dir=DIR is required`);
  const endpoint = take('endpoint') ?? 'client';
  if (endpoint !== 'client') throw new UsageError(`--object ${type},id=${id}: endpoint must be client (tsmount is an NBD client)`);
  const verifyPeer = onOff(take('verify-peer') ?? 'on', 'verify-peer');
  const username = type === 'tls-creds-psk' ? (take('username') ?? 'qemu') : 'qemu';
  // QEMU checks its own client certificate before use; Node's TLS does the same when loading it.
  take('sanity-check');
  rest();
  return { type, id, dir, verifyPeer, username };
}

/** Every --object given; an id given twice is refused, as QEMU does. */
export function parseObjects(texts: readonly string[]): QemuObjects {
  const out = new Map<string, QemuObject>();
  for (const t of texts) {
    const o = parseObject(t);
    if (out.has(o.id)) throw new UsageError(`--object: id '${o.id}' given twice`);
    out.set(o.id, o);
  }
  return out;
}

/**
 * The passphrase in `file`, every byte of it, as QEMU's `secret` object with `file=`
 * reads it (g_file_get_contents, nothing stripped): a file written by `echo pass`
 * holds "pass\n", and an image made by qemu-img from that file has "pass\n" as its
 * key. Use `printf %s pass` (or `echo -n`) for a key without the newline.
 */
export function readSecretFile(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    throw new UsageError(`${file}: cannot read the secret file`);
  }
}
