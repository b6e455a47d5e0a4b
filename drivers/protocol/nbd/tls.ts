// TLS credentials for the NBD client, read once per node (every connection and every
// reconnect reuses them), and TLS failures said in one line. Node's own TLS is the
// transport: x509 in QEMU's and libnbd's folder layout, or PSK through pskCallback
// (OpenSSL's PSK suites interoperate with gnutls, which qemu-nbd and nbdkit use).
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type tls from 'node:tls';
import { UsageError } from '../../errors.js';
import type { NbdAddress, NbdTls } from './uri.js';

/** Certificates, keys and PSK files are small; a larger file is not one of them. */
const MAX_CREDENTIAL_FILE = 1 << 20;

export interface TlsSetup {
  /** Options for tls.connect, all but the socket. */
  options: tls.ConnectionOptions;
  /** The credentials in words, for messages: "the CA in DIR/ca-cert.pem", "PSK user alice". */
  what: string;
  /** The name the server's certificate is checked against, if any. */
  hostname?: string;
  /** Whether we present a certificate of our own (messages: a server that wants one). */
  clientCert: boolean;
}

async function readCredential(file: string, name: string, required: boolean): Promise<Buffer | undefined> {
  let fh: fs.FileHandle | undefined;
  try {
    fh = await fs.open(file, 'r');
    const st = await fh.stat();
    if (!st.isFile()) throw new UsageError(`${name}: ${file} is not a file`);
    if (st.size > MAX_CREDENTIAL_FILE) throw new UsageError(`${name}: ${file} is too large for a TLS credential (${st.size} bytes)`);
    return await fh.readFile();
  } catch (err) {
    if (err instanceof UsageError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !required) return undefined;
    throw new UsageError(`${name}: cannot read ${file}: ${code === 'ENOENT' ? 'no such file' : (code ?? String(err))}`);
  } finally {
    await fh?.close();
  }
}

/** The key for `username` in a keys.psk file (lines `username:hexkey`, as QEMU and nbdkit read them). */
export function pskKeyFor(text: string, username: string, file: string, name: string): Buffer {
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0 || line.slice(0, colon) !== username) continue;
    const hex = line.slice(colon + 1).trim();
    if (!/^([0-9a-f]{2})+$/i.test(hex)) throw new UsageError(`${name}: ${file}: the key of '${username}' is not hex digits`);
    return Buffer.from(hex, 'hex');
  }
  throw new UsageError(`${name}: ${file} has no key for user '${username}'`);
}

/** Read what `t` names and turn it into tls.connect options; one-line UsageError on bad files. */
export async function loadTls(t: NbdTls, address: NbdAddress, name: string): Promise<TlsSetup> {
  // QEMU checks the name only over TCP unless tls-hostname is given; so do we.
  const hostname = t.hostname ?? (address.kind === 'tcp' ? address.host : undefined);
  const options: tls.ConnectionOptions = { minVersion: 'TLSv1.2' };
  if (hostname !== undefined) {
    options.host = hostname;
    // SNI carries names, never addresses (RFC 6066); Node warns on an address.
    if (!net.isIP(hostname)) options.servername = hostname;
  }
  if (t.pskFile) {
    const text = (await readCredential(t.pskFile, name, true))!.toString('utf8');
    const username = t.username ?? '';
    const psk = pskKeyFor(text, username, t.pskFile, name);
    options.pskCallback = () => ({ psk, identity: username });
    // PSK suites are off in OpenSSL's default list; TLS 1.3 uses the PSK with its own suites.
    options.ciphers = 'PSK';
    options.checkServerIdentity = () => undefined;
    return { options, what: `PSK user '${username}' from ${t.pskFile}`, clientCert: false };
  }
  let what = "the system's CAs";
  let clientCert = false;
  if (t.certificates) {
    const dir = t.certificates;
    const caFile = path.join(dir, 'ca-cert.pem');
    // The CA is what the server's certificate is checked against: required unless nothing is checked.
    const ca = await readCredential(caFile, name, t.verifyPeer);
    if (ca) options.ca = ca;
    const crl = await readCredential(path.join(dir, 'ca-crl.pem'), name, false);
    if (crl) options.crl = crl;
    const cert = await readCredential(path.join(dir, 'client-cert.pem'), name, false);
    const key = await readCredential(path.join(dir, 'client-key.pem'), name, false);
    if (!cert !== !key) throw new UsageError(`${name}: ${dir} has ${cert ? 'client-cert.pem but no client-key.pem' : 'client-key.pem but no client-cert.pem'}`);
    if (cert && key) {
      options.cert = cert;
      options.key = key;
      clientCert = true;
    }
    what = `the CA in ${caFile}`;
  }
  if (!t.verifyPeer) {
    options.rejectUnauthorized = false;
    what = 'no check of the server (verify-peer off)';
  }
  if (hostname === undefined) options.checkServerIdentity = () => undefined;
  return { options, what, hostname, clientCert };
}

/** OpenSSL verification codes that mean "not signed by a CA we trust". */
const UNTRUSTED = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_SIGNATURE_FAILURE',
  'CERT_UNTRUSTED',
]);

/** Why the TLS handshake failed, in words a person can act on. */
export function describeTlsFailure(err: Error | undefined, setup: TlsSetup): string {
  const code = (err as NodeJS.ErrnoException | undefined)?.code ?? '';
  const detail = err?.message ? ` (${err.message})` : '';
  if (UNTRUSTED.has(code)) return `the server's certificate is not signed by ${setup.what}${detail}`;
  if (code === 'CERT_HAS_EXPIRED') return `the server's certificate has expired${detail}`;
  if (code === 'CERT_NOT_YET_VALID') return `the server's certificate is not valid yet${detail}`;
  if (code === 'CERT_REVOKED') return `the server's certificate is revoked${detail}`;
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return `the server's certificate is not for '${setup.hostname}' (set tls-hostname to the name it carries)${detail}`;
  if (/CERTIFICATE_REQUIRED/.test(code)) return `the server requires a client certificate (client-cert.pem and client-key.pem in the credentials folder)`;
  if (/ALERT_(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|UNSUPPORTED_CERTIFICATE|ACCESS_DENIED)/.test(code)) return `the server refused our client certificate${detail}`;
  if (/ALERT_(DECRYPT_ERROR|BAD_RECORD_MAC|UNKNOWN_PSK_IDENTITY)/.test(code) && setup.options.pskCallback) return `the server refused the PSK (wrong key or user name)${detail}`;
  // gnutls servers often just hang up on bad credentials, without an alert.
  if (!code || code === 'ECONNRESET' || code === 'EPIPE') {
    if (setup.options.pskCallback) return 'the server ended the TLS handshake: wrong PSK key or user name?';
    if (!setup.clientCert) return 'the server ended the TLS handshake: does it require a client certificate (client-cert.pem and client-key.pem)?';
    return 'the server ended the TLS handshake: does it trust our client certificate?';
  }
  return err?.message ?? code;
}
