// Certificates for the TLS tests, made by openssl at test time in QEMU's folder layout
// (qemu-nbd and nbdkit read the server side, tsmount the client side). Extensions are
// the ones QEMU's own sanity check (and gnutls) insist on.
import fs from 'node:fs';
import path from 'node:path';
import { runOk } from './qemu.js';

export interface TestPki {
  /** ca-cert.pem, server-cert.pem, server-key.pem: for qemu-nbd endpoint=server and nbdkit --tls-certificates. */
  server: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem. */
  client: string;
  /** ca-cert.pem only: a client without a certificate of its own. */
  clientNoCert: string;
  /** ca-cert.pem of another CA, with a client certificate from it. */
  wrongCa: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  await runOk('openssl', args, { cwd });
}

async function makeCa(dir: string, name: string): Promise<void> {
  await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}-cert.pem`, '-days', '2', '-subj', `/CN=${name}`, '-extensions', 'v3', '-config', await caConfig(dir, name)], dir);
}

async function caConfig(dir: string, name: string): Promise<string> {
  const f = path.join(dir, `${name}.cnf`);
  fs.writeFileSync(f, '[req]\ndistinguished_name=dn\n[dn]\n[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n');
  return f;
}

/** A key and a certificate signed by `ca` (server: serverAuth with names; client: clientAuth). */
async function makeLeaf(dir: string, ca: string, name: string, role: 'server' | 'client'): Promise<void> {
  const ext = path.join(dir, `${name}.ext`);
  const eku = role === 'server' ? 'serverAuth' : 'clientAuth';
  const san = role === 'server' ? 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' : '';
  fs.writeFileSync(ext, `basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=${eku}\n${san}`);
  await openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${role === 'server' ? 'localhost' : 'tsmount-client'}`], dir);
  await openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}-cert.pem`, '-CAkey', `${ca}-key.pem`, '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2', '-extfile', ext], dir);
}

/** Two CAs, a server and clients, in folders as QEMU reads them. */
export async function makePki(root: string): Promise<TestPki> {
  const work = path.join(root, 'pki-work');
  fs.mkdirSync(work, { recursive: true });
  await makeCa(work, 'ca');
  await makeCa(work, 'other-ca');
  await makeLeaf(work, 'ca', 'server', 'server');
  await makeLeaf(work, 'ca', 'client', 'client');
  await makeLeaf(work, 'other-ca', 'other-client', 'client');
  const layout = (name: string, files: Record<string, string>): string => {
    const d = path.join(root, name);
    fs.mkdirSync(d, { recursive: true });
    for (const [to, from] of Object.entries(files)) fs.copyFileSync(path.join(work, from), path.join(d, to));
    // gnutls and QEMU want the keys private.
    for (const f of fs.readdirSync(d)) if (f.endsWith('-key.pem')) fs.chmodSync(path.join(d, f), 0o600);
    return d;
  };
  return {
    server: layout('server', { 'ca-cert.pem': 'ca-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' }),
    client: layout('client', { 'ca-cert.pem': 'ca-cert.pem', 'client-cert.pem': 'client-cert.pem', 'client-key.pem': 'client-key.pem' }),
    clientNoCert: layout('client-nocert', { 'ca-cert.pem': 'ca-cert.pem' }),
    wrongCa: layout('wrong-ca', { 'ca-cert.pem': 'other-ca-cert.pem', 'client-cert.pem': 'other-client-cert.pem', 'client-key.pem': 'other-client-key.pem' }),
  };
}

/** A keys.psk folder (QEMU's tls-creds-psk layout; also nbdkit's --tls-psk file). */
export function makePsk(root: string, user: string, hexKey: string): string {
  const d = path.join(root, `psk-${user}`);
  fs.mkdirSync(d, { recursive: true });
  fs.writeFileSync(path.join(d, 'keys.psk'), `someone-else:${'00'.repeat(32)}\n${user}:${hexKey}\n`, { mode: 0o600 });
  return d;
}
