// Remote protocol drivers (NBD, SSH, iSCSI, GlusterFS, Sheepdog) for the registry in
// index.ts, and QEMU's --image-opts property syntax turned into an image name these
// drivers claim. What their nodes share is in remote-node.ts.
import type { ProtocolDriver } from '../types.js';
import { UsageError } from '../errors.js';
import type { GlusterVolumes } from './gluster/node.js';
import { glusterSpecFromOptions, glusterStem, isGlusterSpec, resolveGlusterRelative } from './gluster/uri.js';
// The clients themselves (ssh2 alone takes ~40 ms to load) come in on first use, so
// mounting a local image does not pay for them.
import type { SshSessions } from './ssh/node.js';
import { formatNbdUri, isNbdSpec, nbdStem, nbdTlsFromObject, NBD_DEFAULT_PORT, parseSeconds, resolveNbdRelative, type NbdTarget } from './nbd/uri.js';
import type { QemuObjects } from '../objects.js';
import { preallocateOptions, type PreallocateOptions } from '../filters/preallocate.js';
import { vvfatSpecFromOptions } from './vvfat/spec.js';
import { formatNvmeUri, nvmeTarget } from './nvme.js';
import { formatSheepdogUri, isSheepdogSpec, parseSheepdogUri } from './sheepdog/proto.js';
import { formatSshUri, isSshSpec, localUser, resolveSshRelative, sshStem, SSH_DEFAULT_PORT } from './ssh/uri.js';
import { iscsiSpecFromOptions, iscsiStem, isIscsiSpec, resolveIscsiRelative } from './iscsi/uri.js';

export const nbdProtocol: ProtocolDriver = {
  name: 'nbd',
  claims: isNbdSpec,
  open: async (spec, opts) => (await import('./nbd/node.js')).NbdNode.open(spec, { readOnly: opts.readOnly, cache: opts.cache }),
  resolveRelative: resolveNbdRelative,
  stem: nbdStem,
};

export const iscsiProtocol: ProtocolDriver = {
  name: 'iscsi',
  claims: isIscsiSpec,
  open: async (spec, opts) => (await import('./iscsi/node.js')).IscsiNode.open(spec, { readOnly: opts.readOnly, cache: opts.cache }),
  resolveRelative: resolveIscsiRelative,
  stem: iscsiStem,
};

/** The ssh driver with its sessions: nodes of one chain on one server share a connection. */
export function makeSshProtocol(given?: SshSessions): ProtocolDriver {
  let sessions = given;
  const load = async () => {
    const m = await import('./ssh/node.js');
    sessions ??= new m.SshSessions();
    return { SshNode: m.SshNode, sessions };
  };
  return {
    name: 'ssh',
    claims: isSshSpec,
    open: async (spec, opts) => {
      const { SshNode, sessions: s } = await load();
      return SshNode.open(spec, { readOnly: opts.readOnly, ignoreFlush: opts.cache === 'unsafe' }, s);
    },
    resolveRelative: resolveSshRelative,
    create: async (spec) => {
      const { SshNode, sessions: s } = await load();
      return SshNode.create(spec, s);
    },
    remove: async (spec) => {
      const { SshNode, sessions: s } = await load();
      return SshNode.remove(spec, s);
    },
    stem: sshStem,
  };
}

export const sshProtocol = makeSshProtocol();

/** The gluster driver with its volumes: nodes of one chain on one volume share a glfs instance. */
export function makeGlusterProtocol(given?: GlusterVolumes): ProtocolDriver {
  let volumes = given;
  const load = async () => {
    const m = await import('./gluster/node.js');
    volumes ??= new m.GlusterVolumes();
    return { GlusterNode: m.GlusterNode, volumes };
  };
  return {
    name: 'gluster',
    claims: isGlusterSpec,
    open: async (spec, opts) => {
      const { GlusterNode, volumes: v } = await load();
      return GlusterNode.open(spec, { readOnly: opts.readOnly, ignoreFlush: opts.cache === 'unsafe' }, v);
    },
    resolveRelative: resolveGlusterRelative,
    create: async (spec) => {
      const { GlusterNode, volumes: v } = await load();
      return GlusterNode.create(spec, v);
    },
    remove: async (spec) => {
      const { GlusterNode, volumes: v } = await load();
      return GlusterNode.remove(spec, v);
    },
    stem: glusterStem,
  };
}

export const glusterProtocol = makeGlusterProtocol();

/** Sheepdog VDIs (drivers/protocol/sheepdog/): raw volumes with a size, snapshots and clones of their own. */
export const sheepdogProtocol: ProtocolDriver = {
  name: 'sheepdog',
  claims: isSheepdogSpec,
  open: async (spec, opts) =>
    (await import('./sheepdog/node.js')).SheepdogNode.open(spec, { readOnly: opts.readOnly, direct: opts.cache === 'none' || opts.cache === 'directsync', ignoreFlush: opts.cache === 'unsafe' }),
  resolveRelative: (base, name) => {
    // A bare name next to a VDI is another VDI on the same sheep.
    if (isSheepdogSpec(name)) return name;
    const t = parseSheepdogUri(base);
    return formatSheepdogUri({ ...t, vdi: name, tag: '', snapId: 0 });
  },
  create: async (spec) => {
    throw new UsageError(`${spec}: a Sheepdog VDI is a raw volume of its own: create it with -f raw and a size`);
  },
  createVolume: async (spec, size, backing) => (await import('./sheepdog/node.js')).createVdi(spec, size, backing),
  stem: (spec) => {
    try {
      const t = parseSheepdogUri(spec);
      return `${t.vdi.replace(/\//g, '_')}${t.tag ? `@${t.tag}` : t.snapId ? `@${t.snapId}` : ''}`;
    } catch {
      return 'sheepdog';
    }
  },
};

/** QEMU's option list: key=value pairs split at commas, ',,' standing for a comma. */
export function parseOptionList(text: string): Map<string, string> {
  const out = new Map<string, string>();
  let i = 0;
  while (i < text.length) {
    let item = '';
    for (; i < text.length; i++) {
      if (text[i] === ',') {
        if (text[i + 1] === ',') {
          item += ',';
          i++;
          continue;
        }
        break;
      }
      item += text[i];
    }
    i++;
    if (!item) continue;
    const eq = item.indexOf('=');
    if (eq <= 0) throw new UsageError(`--image-opts: '${item}' is not key=value`);
    const k = item.slice(0, eq);
    if (out.has(k)) throw new UsageError(`--image-opts: '${k}' given twice`);
    out.set(k, item.slice(eq + 1));
  }
  return out;
}

const PROTOCOL_DRIVERS = new Set(['file', 'host_device', 'host_cdrom', 'nbd', 'ssh', 'gluster', 'iscsi', 'nvme', 'sheepdog']);

/**
 * `driver=qcow2,file.driver=ssh,file.host=...,file.path=...` -> an image name and a
 * format. The options become part of the name (a URI), so every file of the chain
 * opened relative to it keeps them.
 */
export function imageOptsToSpec(text: string, objects: QemuObjects = new Map()): ImageOptsSpec {
  return optionsToSpec(parseOptionList(text), objects);
}

/**
 * QEMU's `json:{...}` image name: the same options as --image-opts, nested; flattened
 * to dotted keys (`{"file":{"server":{"host":"h"}}}` is file.server.host=h).
 */
export function jsonToSpec(text: string, objects: QemuObjects = new Map()): ImageOptsSpec {
  let tree: unknown;
  try {
    tree = JSON.parse(text.replace(/^json:/, ''));
  } catch (err) {
    throw new UsageError(`json: image name: ${err instanceof Error ? err.message : String(err)}`);
  }
  const o = new Map<string, string>();
  const walk = (v: unknown, key: string): void => {
    if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') o.set(key, String(v));
    // A list (gluster's "server": [...]) is QEMU's key.0, key.1, ...
    else if (Array.isArray(v)) v.forEach((x, i) => walk(x, `${key}.${i}`));
    else if (v !== null && typeof v === 'object' && !Array.isArray(v)) for (const [k, x] of Object.entries(v)) walk(x, key ? `${key}.${k}` : k);
    else throw new UsageError(`json: image name: '${key}' is not a string, number, boolean or object`);
  };
  if (tree === null || typeof tree !== 'object' || Array.isArray(tree)) throw new UsageError('json: image name: expected an object');
  walk(tree, '');
  return optionsToSpec(o, objects);
}

/** An image name with its options folded in, its format, and the passphrase a key-secret named. */
export interface ImageOptsSpec {
  spec: string;
  format: string | undefined;
  /** Present only when the options name a secret object (luks key-secret, qcow/qcow2 encrypt.key-secret). */
  secret?: string;
  /** Present only when the options put QEMU's preallocate filter over the image's file. */
  preallocate?: PreallocateOptions;
}

function optionsToSpec(o: Map<string, string>, objects: QemuObjects): ImageOptsSpec {
  const driver = o.get('driver');
  if (!driver) throw new UsageError(`--image-opts: 'driver' is required`);
  o.delete('driver');
  // The passphrase of an encrypted format is a secret object named by id; the format
  // of qcow2's encryption is read from its header, so encrypt.format adds nothing.
  const secretKey = driver === 'luks' ? 'key-secret' : driver === 'qcow2' || driver === 'qcow' ? 'encrypt.key-secret' : undefined;
  let secret: string | undefined;
  if (secretKey !== undefined && o.has(secretKey)) {
    const id = o.get(secretKey)!;
    o.delete(secretKey);
    const obj = objects.get(id);
    if (obj?.type !== 'secret') throw new UsageError(`--image-opts: ${secretKey}=${id}: no --object secret with id '${id}'`);
    secret = obj.data;
  }
  if (driver !== 'luks') o.delete('encrypt.format');
  const withSecret = (r: ImageOptsSpec): ImageOptsSpec => (secret === undefined ? r : { ...r, secret });
  // QEMU's vvfat is a protocol whose options make up its fat: name.
  if (driver === 'vvfat') return withSecret({ spec: vvfatSpecFromOptions(o), format: 'raw' });
  let format: string | undefined;
  let prefix = '';
  let preallocate: PreallocateOptions | undefined;
  // QEMU's preallocate filter between the format and its file (file.driver=preallocate,
  // the file then file.file), or alone over a file as the disk (driver=preallocate).
  const takeFilter = (at: string): void => {
    const given = { size: o.get(`${at}prealloc-size`), align: o.get(`${at}prealloc-align`) };
    o.delete(`${at}prealloc-size`);
    o.delete(`${at}prealloc-align`);
    preallocate = preallocateOptions(given, '--image-opts: preallocate');
  };
  const withOptions = (r: { spec: string; format: string | undefined }): ImageOptsSpec => withSecret(preallocate ? { ...r, preallocate } : r);
  if (PROTOCOL_DRIVERS.has(driver)) {
    // A protocol node alone: its bytes are the disk.
    format = 'raw';
    o.set('driver', driver);
  } else {
    if (driver === 'preallocate') {
      format = 'raw';
      takeFilter('');
    } else {
      format = driver;
      if (o.get('file.driver') === 'preallocate') {
        o.delete('file.driver');
        takeFilter('file.');
        prefix = 'file.';
      }
    }
    prefix += 'file.';
    // A plain `file=NAME` is QEMU's shorthand for a file by name.
    const plainKey = prefix.slice(0, -1);
    const plain = o.get(plainKey);
    if (plain !== undefined) {
      o.delete(plainKey);
      if (o.size) throw new UsageError(`--image-opts: unsupported option '${[...o.keys()][0]}'`);
      return withOptions({ spec: plain, format });
    }
  }
  const take = (k: string): string | undefined => {
    const v = o.get(prefix + k);
    o.delete(prefix + k);
    return v;
  };
  const proto = take('driver');
  let spec: string;
  switch (proto) {
    case 'ssh': {
      const host = take('host') ?? take('server.host');
      const path = take('path');
      if (!host || !path) throw new UsageError(`--image-opts: ssh needs ${prefix}host and ${prefix}path`);
      const port = Number(take('port') ?? take('server.port') ?? SSH_DEFAULT_PORT);
      if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError(`--image-opts: bad ssh port`);
      spec = formatSshUri({ user: take('user') ?? localUser(), host, port, path: path.startsWith('/') ? path : `/${path}`, hostKeyCheck: take('host_key_check') ?? sshHostKeyCheck(take) });
      break;
    }
    case 'nbd': {
      const type = take('server.type') ?? (o.has(`${prefix}server.path`) ? 'unix' : 'inet');
      const exportName = take('export') ?? '';
      let t: NbdTarget;
      if (type === 'unix') {
        const p = take('server.path') ?? take('path');
        if (!p) throw new UsageError(`--image-opts: nbd over unix needs ${prefix}server.path`);
        t = { address: { kind: 'unix', path: p }, exportName };
      } else if (type === 'inet') {
        const host = take('server.host') ?? take('host');
        if (!host) throw new UsageError(`--image-opts: nbd needs ${prefix}server.host`);
        const port = Number(take('server.port') ?? take('port') ?? NBD_DEFAULT_PORT);
        if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError(`--image-opts: bad nbd port`);
        t = { address: { kind: 'tcp', host, port }, exportName };
      } else {
        throw new UsageError(`--image-opts: unsupported nbd server.type '${type}'`);
      }
      const credsId = take('tls-creds');
      const tlsHostname = take('tls-hostname');
      if (credsId !== undefined) {
        const creds = objects.get(credsId);
        if (!creds) throw new UsageError(`--image-opts: tls-creds=${credsId}: no --object with id '${credsId}'`);
        if (creds.type === 'secret') throw new UsageError(`--image-opts: tls-creds=${credsId}: '${credsId}' is a secret, not TLS credentials`);
        t.tls = nbdTlsFromObject(creds, tlsHostname);
      } else if (tlsHostname !== undefined) {
        throw new UsageError(`--image-opts: ${prefix}tls-hostname needs ${prefix}tls-creds`);
      }
      const rd = take('reconnect-delay');
      if (rd !== undefined) t.reconnectDelay = parseSeconds(rd, `--image-opts: ${prefix}reconnect-delay`);
      const ot = take('open-timeout');
      if (ot !== undefined) t.openTimeout = parseSeconds(ot, `--image-opts: ${prefix}open-timeout`);
      spec = formatNbdUri(t);
      break;
    }
    case 'gluster':
      spec = glusterSpecFromOptions(take, (k) => o.has(prefix + k));
      break;
    case 'sheepdog': {
      // QEMU's BlockdevOptionsSheepdog: server.{type,host,port,path}, vdi, snap-id, tag.
      const vdi = take('vdi');
      if (!vdi) throw new UsageError(`--image-opts: sheepdog needs ${prefix}vdi`);
      const type = take('server.type') ?? (o.has(`${prefix}server.path`) ? 'unix' : 'inet');
      const snap = take('snap-id');
      const tag = take('tag') ?? '';
      let address: import('./sheepdog/proto.js').SheepdogTarget['address'];
      if (type === 'unix') {
        const p = take('server.path');
        if (!p) throw new UsageError(`--image-opts: sheepdog over unix needs ${prefix}server.path`);
        address = { kind: 'unix', path: p };
      } else {
        const port = Number(take('server.port') ?? 7000);
        if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError(`--image-opts: bad sheepdog port`);
        address = { kind: 'tcp', host: take('server.host') ?? 'localhost', port };
      }
      const snapId = snap === undefined ? 0 : Number(snap);
      if (!Number.isInteger(snapId) || snapId < 0 || snapId > 0xffffffff) throw new UsageError(`--image-opts: bad sheepdog snap-id '${snap}'`);
      spec = formatSheepdogUri({ address, vdi, tag, snapId });
      break;
    }
    case 'iscsi':
      spec = iscsiSpecFromOptions(take, objects);
      break;
    case 'nvme': {
      const device = take('device');
      if (!device) throw new UsageError(`--image-opts: nvme needs ${prefix}device=DOMAIN:BUS:SLOT.FUNC`);
      spec = formatNvmeUri(nvmeTarget(device, take('namespace') ?? '1', '--image-opts'));
      break;
    }
    case 'file':
    case 'host_device':
    case 'host_cdrom':
    case undefined: {
      const f = take('filename');
      if (!f) throw new UsageError(`--image-opts: ${prefix}filename is required`);
      spec = f.includes(':') ? `file:${f}` : f;
      break;
    }
    default:
      throw new UsageError(`--image-opts: protocol driver '${proto}' is not supported here`);
  }
  // Options that change nothing here: a node's name, and QEMU's choice of I/O engine.
  for (const k of [...o.keys()]) if (/^(?:.*\.)?node-name$|^auto-read-only$|^(?:file\.)?aio$/.test(k)) o.delete(k);
  if (o.size) throw new UsageError(`--image-opts: unsupported option '${[...o.keys()][0]}'`);
  return withOptions({ spec, format });
}

/**
 * QEMU's structured host key check of the ssh driver (host-key-check.mode=none|hash|
 * known_hosts, .type=md5|sha1|sha256, .hash=HEX) as the legacy host_key_check string.
 */
function sshHostKeyCheck(take: (k: string) => string | undefined): string {
  const mode = take('host-key-check.mode');
  const type = take('host-key-check.type');
  const hash = take('host-key-check.hash');
  if (mode === undefined || mode === 'known_hosts') {
    if (type !== undefined || hash !== undefined) throw new UsageError(`--image-opts: ssh host-key-check.type and .hash need host-key-check.mode=hash`);
    return 'yes';
  }
  if (mode === 'none') return 'no';
  if (mode !== 'hash') throw new UsageError(`--image-opts: ssh host-key-check.mode must be none, hash or known_hosts, not '${mode}'`);
  if (!type || !hash) throw new UsageError(`--image-opts: ssh host-key-check.mode=hash needs host-key-check.type and host-key-check.hash`);
  return `${type}:${hash}`;
}
