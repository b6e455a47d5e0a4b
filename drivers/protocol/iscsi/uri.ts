// iSCSI image names and options, as QEMU takes them (qemu-block-drivers(7), "iSCSI LUNs"):
//   iscsi://[user[%password]@]host[:port]/target-iqn/lun       (port 3260 by default)
// credentials also from LIBISCSI_CHAP_USERNAME / LIBISCSI_CHAP_PASSWORD, and for mutual
// CHAP (the target proves itself too) LIBISCSI_CHAP_TARGET_USERNAME / _PASSWORD; `--iscsi
// key=value,...` and `--readconfig FILE` ([iscsi] and [iscsi "iqn..."] sections) give
// user, password (or password-secret, naming an --object secret), initiator-name and
// header-digest. Set once per process by the CLI.
import fs from 'node:fs';
import { UsageError } from '../../errors.js';
import { parseOptionString } from '../../options.js';
import { parseObjects, type QemuObjects } from '../../objects.js';
import type { DigestChoice } from './login.js';

export const ISCSI_DEFAULT_PORT = 3260;

export interface IscsiTarget {
  host: string;
  port: number;
  iqn: string;
  lun: number;
  user?: string;
  password?: string;
}

export function isIscsiSpec(spec: string): boolean {
  return /^iscsi:\/\//i.test(spec);
}

export function parseIscsiSpec(spec: string): IscsiTarget {
  const m = /^iscsi:\/\/(?:([^@/]*)@)?(\[[0-9a-f:.]+\]|[^/:[\]]+)(?::([^/]*))?\/([^/]+)\/([^/?#]+)$/i.exec(spec);
  if (!m) throw new UsageError(`${redact(spec)}: not an iSCSI URL (iscsi://[user[%password]@]host[:port]/target-iqn/lun)`);
  const [, userinfo, hostPart, portText, iqnText, lunText] = m;
  let port = ISCSI_DEFAULT_PORT;
  if (portText !== undefined) {
    if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) throw new UsageError(`${redact(spec)}: bad port '${portText}'`);
    port = Number(portText);
  }
  if (!/^\d{1,5}$/.test(lunText!) || Number(lunText) > 16383) throw new UsageError(`${redact(spec)}: bad LUN '${lunText}' (0 to 16383)`);
  let iqn: string;
  try {
    iqn = decodeURIComponent(iqnText!);
  } catch {
    throw new UsageError(`${redact(spec)}: bad %-escape in the target name`);
  }
  const t: IscsiTarget = { host: hostPart!.replace(/^\[|\]$/g, ''), port, iqn, lun: Number(lunText) };
  if (userinfo !== undefined && userinfo !== '') {
    // libiscsi's form: the password follows the first '%' (not a %-escape).
    const pct = userinfo.indexOf('%');
    t.user = pct < 0 ? userinfo : userinfo.slice(0, pct);
    if (pct >= 0) t.password = userinfo.slice(pct + 1);
  }
  return t;
}

/** The URL without its password, for messages. */
export function redact(spec: string): string {
  return spec.replace(/^(iscsi:\/\/[^@/%]*)%[^@/]*@/i, '$1%***@');
}

/** The flat file's stem: the target name's last part and the LUN (`disk1-lun1`). */
export function iscsiStem(spec: string): string {
  try {
    const t = parseIscsiSpec(spec);
    const tail = t.iqn.split(/[:]/).pop()!.replace(/[^A-Za-z0-9._-]/g, '_') || 'iscsi';
    return `${tail}-lun${t.lun}`;
  } catch {
    return 'iscsi';
  }
}

/** Backing files named relative to an iSCSI LUN cannot be found: QEMU says the same. */
export function resolveIscsiRelative(base: string, name: string): string {
  if (isIscsiSpec(name)) return name;
  throw new UsageError(`${redact(base)}: a backing file '${name}' relative to an iSCSI LUN (give it as an iscsi:// URL)`);
}

// --- options: --iscsi and --readconfig ---------------------------------------------

export interface IscsiSettings {
  user?: string;
  password?: string;
  initiatorName?: string;
  headerDigest?: DigestChoice;
}

const KEYS = new Set(['user', 'password', 'password-secret', 'initiator-name', 'header-digest', 'timeout']);
const DIGESTS = ['CRC32C', 'CRC32C-NONE', 'NONE-CRC32C', 'NONE'] as const;

/** QEMU's password-secret=ID: the CHAP password held by the --object secret of that id. */
function secretPassword(id: string, objects: QemuObjects, where: string): string {
  const o = objects.get(id);
  if (!o) throw new UsageError(`${where}: iscsi password-secret=${id}: no --object with id '${id}'`);
  if (o.type !== 'secret') throw new UsageError(`${where}: iscsi password-secret=${id}: '${id}' is not a secret object`);
  return o.data;
}

function settingsFrom(entries: [string, string][], where: string, objects: QemuObjects = new Map()): IscsiSettings {
  const s: IscsiSettings = {};
  const keys = new Set(entries.map(([k]) => k));
  // As QEMU's apply_chap: one of the two, never both.
  if (keys.has('password') && keys.has('password-secret')) throw new UsageError(`${where}: 'password' and 'password-secret' properties are mutually exclusive`);
  for (const [k, v] of entries) {
    if (!KEYS.has(k)) throw new UsageError(`${where}: unknown iSCSI option '${k}' (user, password, password-secret, initiator-name, header-digest)`);
    if (k === 'user') s.user = v;
    else if (k === 'password') s.password = v;
    else if (k === 'password-secret') s.password = secretPassword(v, objects, where);
    else if (k === 'initiator-name') s.initiatorName = v;
    else if (k === 'header-digest') {
      const d = v.toUpperCase();
      if (!(DIGESTS as readonly string[]).includes(d)) throw new UsageError(`${where}: header-digest must be one of ${DIGESTS.join(', ')}`);
      s.headerDigest = d as DigestChoice;
    }
  }
  return s;
}

/** `--iscsi user=u,password=p|password-secret=ID,initiator-name=iqn...,header-digest=CRC32C` */
export function parseIscsiOption(text: string, objects?: QemuObjects): IscsiSettings {
  return settingsFrom(parseOptionString(text), '--iscsi', objects);
}

/**
 * QEMU's -readconfig file: `[group "id"]` sections of `key = "value"` lines. The
 * iSCSI sections, by id ('' for a plain `[iscsi]`); other groups are skipped.
 */
export function parseReadconfig(text: string, file: string, objects?: QemuObjects): Map<string, IscsiSettings> {
  const out = new Map<string, IscsiSettings>();
  let current: [string, string][] | undefined;
  let id = '';
  const close = (): void => {
    if (current) out.set(id, { ...out.get(id), ...settingsFrom(current, `${file} [iscsi${id ? ` "${id}"` : ''}]`, objects) });
  };
  const lines = text.split(/\r?\n/);
  lines.forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const sec = /^\[\s*([A-Za-z0-9_-]+)\s*(?:"([^"]*)")?\s*\]$/.exec(line);
    if (sec) {
      close();
      current = sec[1] === 'iscsi' ? [] : undefined;
      id = sec[2] ?? '';
      return;
    }
    const kv = /^([A-Za-z0-9_.-]+)\s*=\s*"((?:[^"\\]|\\.)*)"$/.exec(line);
    if (!kv) throw new UsageError(`${file}:${i + 1}: not a section or key = "value" line`);
    current?.push([kv[1]!, kv[2]!.replace(/\\(.)/g, '$1')]);
  });
  close();
  return out;
}

let cliSettings: IscsiSettings = {};
let fileSettings = new Map<string, IscsiSettings>();

/**
 * The CLI's --iscsi and --readconfig, for every iSCSI node this process opens; their
 * password-secret=ID names one of the --object secrets.
 */
export function configureIscsi(opts: { iscsi?: string[]; readconfig?: string[]; object?: string[] }): void {
  const objects = opts.object?.length ? parseObjects(opts.object) : undefined;
  cliSettings = {};
  for (const o of opts.iscsi ?? []) cliSettings = { ...cliSettings, ...parseIscsiOption(o, objects) };
  fileSettings = new Map();
  for (const f of opts.readconfig ?? []) {
    let text: string;
    try {
      text = fs.readFileSync(f, 'utf8');
    } catch (err) {
      throw new UsageError(`--readconfig ${f}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    for (const [k, v] of parseReadconfig(text, f, objects)) fileSettings.set(k, { ...fileSettings.get(k), ...v });
  }
}

/**
 * QEMU's `driver=iscsi` options (BlockdevOptionsIscsi: transport, portal, target, lun,
 * user, initiator-name, header-digest, timeout) -> the iscsi:// URL; the login settings
 * they give are kept for that target, as a `[iscsi "iqn"]` section of --readconfig would.
 */
export function iscsiSpecFromOptions(take: (k: string) => string | undefined, objects: QemuObjects = new Map()): string {
  const transport = take('transport') ?? 'tcp';
  if (transport !== 'tcp') throw new UsageError(`--image-opts: iSCSI transport '${transport}' is not supported (only tcp)`);
  const portal = take('portal');
  const target = take('target');
  if (!portal || !target) throw new UsageError(`--image-opts: iscsi needs portal=HOST[:PORT] and target=IQN`);
  const lun = take('lun') ?? '0';
  const user = take('user');
  const entries: [string, string][] = [];
  const secretId = take('password-secret');
  if (secretId !== undefined) {
    // QEMU's password-secret: the CHAP password from a secret object, for this user.
    const password = secretPassword(secretId, objects, '--image-opts');
    if (user === undefined) throw new UsageError(`--image-opts: iscsi password-secret needs user=`);
    entries.push(['user', user], ['password', password]);
  }
  for (const k of ['initiator-name', 'header-digest', 'timeout']) {
    const v = take(k);
    if (v !== undefined) entries.push([k, v]);
  }
  const spec = `iscsi://${user ? `${encodeURIComponent(user)}@` : ''}${portal}/${target}/${lun}`;
  const t = parseIscsiSpec(spec);
  if (entries.length) fileSettings.set(t.iqn, { ...fileSettings.get(t.iqn), ...settingsFrom(entries, '--image-opts') });
  return spec;
}

/** QEMU's default initiator name (block/iscsi.c, get_initiator_name): no VM UUID here. */
export const DEFAULT_INITIATOR_NAME = 'iqn.2008-11.org.linux-kvm';

export interface ResolvedLogin {
  user?: string;
  password?: string;
  /** Mutual CHAP (libiscsi's LIBISCSI_CHAP_TARGET_*): the target proves it knows these. */
  targetUser?: string;
  targetPassword?: string;
  initiatorName: string;
  headerDigest: DigestChoice;
}

/**
 * What one target logs in with. As QEMU: the target's own section, else the plain
 * [iscsi] one, and --iscsi over both; the URL's user unless an option names one; the
 * LIBISCSI_CHAP_* variables where nothing else does (libiscsi's iscsi_parse_full_url).
 */
export function loginSettings(t: IscsiTarget, env: NodeJS.ProcessEnv = process.env): ResolvedLogin {
  const o: IscsiSettings = { ...(fileSettings.get(t.iqn) ?? fileSettings.get('')), ...definedOnly(cliSettings) };
  let user = t.user;
  let password = t.password;
  if (user === undefined && env.LIBISCSI_CHAP_USERNAME) {
    user = env.LIBISCSI_CHAP_USERNAME;
    password = env.LIBISCSI_CHAP_PASSWORD;
  }
  if (o.user !== undefined) {
    user = o.user;
    password = o.password;
  }
  // The target authenticates itself only inside a CHAP exchange the initiator started.
  const targetUser = user !== undefined ? env.LIBISCSI_CHAP_TARGET_USERNAME || undefined : undefined;
  return {
    user,
    password: user !== undefined ? (password ?? '') : undefined,
    ...(targetUser !== undefined ? { targetUser, targetPassword: env.LIBISCSI_CHAP_TARGET_PASSWORD ?? '' } : {}),
    initiatorName: o.initiatorName ?? DEFAULT_INITIATOR_NAME,
    headerDigest: o.headerDigest ?? 'NONE-CRC32C',
  };
}

function definedOnly(s: IscsiSettings): IscsiSettings {
  return Object.fromEntries(Object.entries(s).filter(([, v]) => v !== undefined)) as IscsiSettings;
}
