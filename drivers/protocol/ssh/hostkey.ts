// Checking the server's host key as QEMU's ssh driver does (host_key_check):
//   yes      known_hosts ($HOME/.ssh/known_hosts, then /etc/ssh/ssh_known_hosts), with
//            [host]:port entries for other ports and hashed |1|salt|hmac entries
//   no       no check
//   md5:HEX, sha1:HEX, sha256:HEX   the key's fingerprint (colons optional, any case);
//   sha256:BASE64                   also as ssh-keygen -l prints it (SHA256:...)
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UsageError } from '../../errors.js';

export type HostKeyPolicy =
  | { mode: 'yes' }
  | { mode: 'no' }
  | { mode: 'hash'; type: 'md5' | 'sha1' | 'sha256'; expected: Buffer; text: string };

const DIGEST_BYTES = { md5: 16, sha1: 20, sha256: 32 } as const;

export function parseHostKeyCheck(value: string, spec: string): HostKeyPolicy {
  if (value === 'yes' || value === '') return { mode: 'yes' };
  if (value === 'no') return { mode: 'no' };
  const m = /^(md5|sha1|sha256):(.+)$/i.exec(value);
  if (!m) throw new UsageError(`${spec}: host_key_check must be yes, no, md5:HASH, sha1:HASH or sha256:HASH, not '${value}'`);
  const type = m[1]!.toLowerCase() as 'md5' | 'sha1' | 'sha256';
  const raw = m[2]!;
  const hex = raw.replace(/:/g, '');
  let expected: Buffer | undefined;
  if (/^[0-9a-f]+$/i.test(hex) && hex.length === DIGEST_BYTES[type] * 2) {
    expected = Buffer.from(hex, 'hex');
  } else if (type === 'sha256' && /^[A-Za-z0-9+/]{43}=?$/.test(raw)) {
    expected = Buffer.from(raw, 'base64');
  }
  if (!expected || expected.length !== DIGEST_BYTES[type]) {
    throw new UsageError(`${spec}: host_key_check ${type}: needs ${DIGEST_BYTES[type] * 2} hex digits${type === 'sha256' ? ' or 43 base64 characters' : ''}`);
  }
  return { mode: 'hash', type, expected, text: value };
}

/** The key blob's fingerprint, for messages: SHA256:base64 as ssh-keygen -l prints it. */
export function fingerprint(key: Buffer): string {
  return `SHA256:${crypto.createHash('sha256').update(key).digest('base64').replace(/=+$/, '')}`;
}

/** The key types a known_hosts line may carry, to the host key algorithms that use them. */
const ALGORITHMS_FOR: Record<string, string[]> = {
  'ssh-ed25519': ['ssh-ed25519'],
  'ecdsa-sha2-nistp256': ['ecdsa-sha2-nistp256'],
  'ecdsa-sha2-nistp384': ['ecdsa-sha2-nistp384'],
  'ecdsa-sha2-nistp521': ['ecdsa-sha2-nistp521'],
  'ssh-rsa': ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'],
  'ssh-dss': ['ssh-dss'],
};

interface KnownHostEntry {
  keyType: string;
  key: Buffer;
  revoked: boolean;
}

export function knownHostsFiles(): string[] {
  const home = process.env.HOME || os.homedir();
  return [path.join(home, '.ssh', 'known_hosts'), '/etc/ssh/ssh_known_hosts'];
}

/** OpenSSH's wildcard patterns: * and ?. */
function globMatch(pattern: string, name: string): boolean {
  const re = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`, 'i');
  return re.test(name);
}

function hostMatches(field: string, name: string): boolean {
  if (field.startsWith('|1|')) {
    const [, , salt, hash] = field.split('|');
    if (!salt || !hash) return false;
    const mac = crypto.createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest('base64');
    return mac === hash;
  }
  let matched = false;
  for (const pat of field.split(',')) {
    if (pat.startsWith('!')) {
      if (globMatch(pat.slice(1), name)) return false;
    } else if (globMatch(pat, name)) {
      matched = true;
    }
  }
  return matched;
}

/** Every known_hosts entry for host:port ([host]:port unless the port is 22). */
export function knownHostEntries(host: string, port: number, files = knownHostsFiles()): KnownHostEntry[] {
  const name = port === 22 ? host.toLowerCase() : `[${host.toLowerCase()}]:${port}`;
  const out: KnownHostEntry[] = [];
  for (const file of files) {
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n')) {
      const f = line.trim().split(/\s+/);
      if (!f[0] || f[0].startsWith('#')) continue;
      let revoked = false;
      if (f[0].startsWith('@')) {
        // @cert-authority lines sign host certificates; plain keys never match them.
        if (f[0] === '@revoked') revoked = true;
        else continue;
        f.shift();
      }
      const [hosts, keyType, b64] = f;
      if (!hosts || !keyType || !b64 || !hostMatches(hosts, name)) continue;
      out.push({ keyType, key: Buffer.from(b64, 'base64'), revoked });
    }
  }
  return out;
}

/** Host key algorithms to offer first: the types known_hosts holds for this host. */
export function preferredAlgorithms(host: string, port: number): string[] {
  const seen = new Set<string>();
  for (const e of knownHostEntries(host, port)) if (!e.revoked) for (const a of ALGORITHMS_FOR[e.keyType] ?? []) seen.add(a);
  return [...seen];
}

/** undefined when the key is acceptable, else the one-line reason for refusing it. */
export function checkHostKey(policy: HostKeyPolicy, key: Buffer, host: string, port: number, files?: string[]): string | undefined {
  if (policy.mode === 'no') return undefined;
  if (policy.mode === 'hash') {
    const got = crypto.createHash(policy.type).update(key).digest();
    if (got.equals(policy.expected)) return undefined;
    return `the server's host key (${policy.type}:${got.toString('hex')}, ${fingerprint(key)}) does not match host_key_check=${policy.text}`;
  }
  const entries = knownHostEntries(host, port, files);
  const where = port === 22 ? host : `[${host}]:${port}`;
  if (entries.some((e) => e.revoked && e.key.equals(key))) return `the host key of ${where} is marked @revoked in known_hosts`;
  if (entries.some((e) => !e.revoked && e.key.equals(key))) return undefined;
  if (entries.some((e) => !e.revoked)) return `the host key of ${where} (${fingerprint(key)}) does not match known_hosts: refusing to connect`;
  return `no host key for ${where} in known_hosts (${fingerprint(key)}): add it, or use host_key_check=no or a fingerprint`;
}
