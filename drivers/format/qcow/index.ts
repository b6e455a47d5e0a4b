// The qcow (version 1) driver: probe, open and create (QEMU's block/qcow.c).
import type { BlockNode, Creatable, CreateRequest, FormatDriver, OpenOptions } from '../../types.js';
import { PagedTable } from '../table-pages.js';
import { BadPassphraseError, UsageError } from '../../errors.js';
import { CRYPT, encodeHeader, HEADER_BYTES, LIMITS, parseHeader, type QcowHeader } from './header.js';
import type { QcowCipher } from './crypto.js';
import { QcowNode } from './qcow.js';
import { readHead } from '../mapped-node.js';
import { sizeWithBacking } from '../backing.js';
import { probe } from './probe.js';

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  const head = await readHead(file, HEADER_BYTES, 'qcow');
  const h = parseHeader(head, file.size, name);
  let cipher: QcowCipher | undefined;
  if (h.cryptMethod === CRYPT.aes) {
    // qcow stores nothing to check a key against: any key opens, a wrong one reads garbage.
    if (opts.secret === undefined && !opts.noIo) throw new BadPassphraseError(`${name}: the qcow image is encrypted (AES); give the key with --secret`);
    // The cipher's code loads only for an image that needs it.
    if (opts.secret !== undefined) cipher = new (await import('./crypto.js')).QcowCipher(opts.secret);
  }
  // The L1 table lies in the file (parseHeader checks); it is read a page at a time as needed.
  const l1 = new PagedTable(file, h.l1TableOffset, h.l1Size, 8, Math.floor(opts.metadataCacheBytes / 4));
  let backing: BlockNode | undefined;
  let backingName: string | undefined;
  if (h.backingFileOffset !== 0 && h.backingFileSize > 0) {
    const b = Buffer.alloc(h.backingFileSize);
    await file.read(h.backingFileOffset, b);
    backingName = b.toString('utf8');
    // Version 1 stores no backing format: it is probed.
    if (!opts.noBacking) backing = await opts.openBacking(backingName, undefined);
  }
  try {
    const node = new QcowNode({
      file,
      header: h,
      l1,
      readOnly: opts.readOnly,
      backing,
      cipher,
      metadataCacheBytes: opts.metadataCacheBytes,
      barriers: opts.cache !== 'unsafe',
    }).describedAs({ clusterSize: 2 ** h.clusterBits, dirty: false, backingFile: backingName, encrypted: h.cryptMethod === CRYPT.aes });
    if (!opts.readOnly) await node.trackTables();
    return node;
  } catch (err) {
    await backing?.close();
    throw err;
  }
}

async function create(req: CreateRequest): Promise<void> {
  const o = req.options;
  const backingFile = o.string('backing_file');
  const backingFmt = o.string('backing_fmt');
  const legacy = o.bool('encryption');
  const format = o.choice('encrypt.format', ['aes'] as const);
  o.string('encrypt.key-secret'); // createImage's: the passphrase is req.secret
  o.finish('qcow');
  if (legacy !== undefined && format !== undefined) throw new UsageError("encryption and encrypt.format may not both be given (use encrypt.format=aes)");
  const encrypted = legacy === true || format === 'aes';
  const secret = req.secret;
  if (encrypted && secret === undefined) throw new UsageError('encrypted qcow images need a key: --secret or encrypt.key-secret');
  if (backingFmt !== undefined && backingFile === undefined) throw new UsageError('backing_fmt needs a backing_file');
  const nameBytes = Buffer.from(backingFile ?? '', 'utf8');
  if (nameBytes.length > LIMITS.maxBackingNameLength) throw new UsageError('backing file name too long');

  // qcow_co_create_opts rounds the size up to a sector; qcow_co_create refuses none at all.
  const size = Math.ceil((await sizeWithBacking(req, backingFile, backingFmt, 'qcow')) / 512) * 512;
  if (size === 0) throw new UsageError(`${req.spec}: Image size is too small, cannot be zero length`);

  // QEMU's choice: with a backing file, 512-byte clusters so nothing need be copied.
  const clusterBits = backingFile !== undefined ? 9 : 12;
  const l2Bits = backingFile !== undefined ? 12 : 9;
  let headerSize = HEADER_BYTES + nameBytes.length;
  headerSize = Math.ceil(headerSize / 8) * 8;
  const l1Size = Math.ceil(size / 2 ** (clusterBits + l2Bits));
  const h: QcowHeader = {
    backingFileOffset: backingFile !== undefined ? HEADER_BYTES : 0,
    backingFileSize: nameBytes.length,
    mtime: 0,
    size,
    clusterBits,
    l2Bits,
    cryptMethod: encrypted ? CRYPT.aes : CRYPT.none,
    l1TableOffset: headerSize,
    l1Size,
  };
  const file = req.file;
  await file.write(0, encodeHeader(h));
  if (nameBytes.length) await file.write(HEADER_BYTES, nameBytes);
  // The L1 table, zeroed in whole sectors.
  const l1Bytes = Math.ceil((l1Size * 8) / 512) * 512;
  if (l1Bytes > 0) await file.write(headerSize, Buffer.alloc(l1Bytes));
  await file.flush();
}

export const qcowDriver: FormatDriver & Creatable = {
  name: 'qcow',
  probe,
  open,
  createOptions: ['backing_file', 'backing_fmt', 'encryption', 'encrypt.format', 'encrypt.key-secret'],
  create,
};
