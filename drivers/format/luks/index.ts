// The luks format (QEMU block/crypto.c over crypto/block-luks.c): a LUKS header, then
// the payload encrypted sector by sector. LUKS1 reads, writes and is created as QEMU
// does; LUKS2 headers made by cryptsetup open read-write too, and `-o luks-version=2`
// makes them (QEMU 7.2 can do neither).
import { writeEncrypted } from '../../util/write-encrypted.js';
import type { BlockNode, Creatable, CreateRequest, Extent, FormatDriver, HostCipher, ImageDescription, OpenOptions, TruncateOptions } from '../../types.js';
import { CorruptImageError, UnsupportedError, UsageError } from '../../errors.js';
import type { SectorCipher } from '../../crypto/index.js';
import { describeLuks1, HDR as LUKS1_HDR, parseLuks1Header, type Luks1Header } from '../../crypto/luks1.js';
import { luksVersion } from '../../crypto/magic.js';
import { QEMU_HASHES } from '../../crypto/hash.js';
import { QEMU_IVGENS } from '../../crypto/ivgen.js';
import { CIPHER_MODES } from '../../crypto/magic.js';
import { probe } from './probe.js';
import { sizable } from '../../resize.js';

class LuksNode implements BlockNode {
  private readonly unit: number;
  readonly encrypted = true;
  private around: HostCipher | undefined;

  constructor(
    private readonly file: BlockNode,
    private readonly payloadOffset: number,
    private diskSize: number,
    /** Undefined when opened for metadata only (no passphrase): never read then. */
    private readonly cipher: SectorCipher | undefined,
    readonly readOnly: boolean,
    /** The LUKS1 header, for tsimg info (LUKS2 headers are not described). */
    private readonly header?: Luks1Header,
    /** A LUKS2 segment of a size the header gives: the payload does not follow the file's size. */
    private readonly fixedLength = false,
  ) {
    this.unit = cipher?.sectorSize ?? 512;
  }

  get size(): number {
    return this.diskSize;
  }

  /**
   * The payload is the rest of the file (QEMU's block_crypto_co_truncate): the file is
   * sized to the payload offset plus `size`, with the preallocation asked (the file's
   * refusals are QEMU's). New sectors read as whatever zeros decrypt to, as in QEMU and
   * dm-crypt. A LUKS2 segment of fixed length would need its header rewritten: refused.
   */
  async truncate(size: number, o: TruncateOptions = {}): Promise<void> {
    const file = sizable(this.file);
    if (this.fixedLength) throw new UnsupportedError(`${this.name}: the LUKS2 segment has a fixed size in its header; resizing it is not supported`);
    if (this.unit !== 512 && size % this.unit !== 0) throw new UsageError(`${this.name}: the new size must be a multiple of the ${this.unit}-byte encryption sector`);
    await file.truncate(this.payloadOffset + size, o);
    this.diskSize = Math.ceil(size / this.unit) * this.unit;
  }

  private sectorCipher(): SectorCipher {
    if (!this.cipher) throw new UsageError(`${this.name}: the image is encrypted; give its passphrase with --secret or --secret-file`);
    return this.cipher;
  }

  get name(): string {
    return this.file.name;
  }

  /**
   * The payload is the file's bytes from payloadOffset on, sector numbers counting from
   * there: the FUSE workers can read and decrypt it themselves (fs/read-map.ts).
   */
  get hostCipher(): HostCipher | undefined {
    const fd = this.file.hostFd;
    if (fd === undefined || !this.cipher) return undefined;
    if (this.around?.fd !== fd) this.around = { fd, cipher: this.cipher, ivBase: this.payloadOffset };
    return this.around;
  }

  /** Requests arrive in whole encryption sectors (the alignment filter above). */
  get requestAlignment(): number {
    return this.unit;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    await this.file.read(this.payloadOffset + offset, dst);
    this.sectorCipher().decrypt(dst, offset / this.unit);
  }

  write(offset: number, src: Uint8Array): Promise<void> {
    return writeEncrypted(this.sectorCipher(), src, offset / this.unit, (buf) => this.file.write(this.payloadOffset + offset, buf));
  }

  flush(): Promise<void> {
    return this.file.flush();
  }

  /** block_crypto_get_info: no cluster size, never dirty; the LUKS1 header's fields. */
  describe(): ImageDescription {
    const d: ImageDescription = { dirty: false, encrypted: true };
    if (this.header) d.formatSpecific = { type: 'luks', data: describeLuks1(this.header) };
    return d;
  }

  /**
   * Overwrites need nothing of the format (no header, no table): the FUSE workers may
   * encrypt them and write them around this node (fs/read-map-runs.ts writeInPlace).
   */
  get inPlaceWrites(): boolean {
    return !this.readOnly && this.hostCipher !== undefined && this.file.inPlaceWrites === true;
  }

  /** Ciphertext is never zeros: everything is data, as QEMU reports it. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!this.hostCipher) return [{ offset, length, kind: 'data' }];
    return [{ offset, length, kind: 'data', cipherHost: this.payloadOffset + offset, ...(this.inPlaceWrites ? { inPlace: true } : {}) }];
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

/** The LUKS1 header of `file`, or undefined for another version. */
async function luks1Header(file: BlockNode): Promise<Luks1Header | undefined> {
  const head = new Uint8Array(Math.min(LUKS1_HDR.size, file.size));
  await file.read(0, head);
  return luksVersion(head) === 1 ? parseLuks1Header(head, file.size, file.name) : undefined;
}

/**
 * Metadata only, without the passphrase (tsimg info): the size from a LUKS1 header.
 * The node is never read: the graph builder refuses data requests on such an open.
 */
async function openHeaderOnly(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const h = await luks1Header(file);
  if (!h) throw new UsageError(`${file.name}: the image is encrypted; give its passphrase with --secret or --secret-file`);
  if (h.payloadOffset > file.size) throw new CorruptImageError(`${file.name}: LUKS payload offset ${h.payloadOffset} lies past the end of the file`);
  return new LuksNode(file, h.payloadOffset, Math.ceil((file.size - h.payloadOffset) / 512) * 512, undefined, true, h);
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  if (opts.secret === undefined && opts.noIo) return openHeaderOnly(file, opts);
  if (opts.secret === undefined) throw new UsageError(`${name}: the image is encrypted; give its passphrase with --secret or --secret-file`);
  const { unlockLuks } = await import('../../crypto/index.js');
  const v = await unlockLuks(file, opts.secret);
  if (v.payloadOffset > file.size) throw new CorruptImageError(`${name}: LUKS payload offset ${v.payloadOffset} lies past the end of the file`);
  const available = file.size - v.payloadOffset;
  const size = v.payloadLength === undefined ? available : Math.min(v.payloadLength, available);
  if (v.payloadLength !== undefined && v.payloadLength > available) {
    throw new CorruptImageError(`${name}: LUKS2 segment of ${v.payloadLength} bytes runs past the end of the file`);
  }
  // LUKS2 devices hold whole encryption sectors only. A LUKS1 payload that ends inside a
  // sector (a truncated file) counts the sector whole, as QEMU does (its disk is whole
  // 512-byte sectors, rounded up): the file reads as zeros past its end, and the cipher
  // is only ever given whole sectors.
  const usable = v.version === 2 ? size - (size % v.sectorSize) : Math.ceil(size / v.sectorSize) * v.sectorSize;
  const node = new LuksNode(file, v.payloadOffset, usable, v.sectorCipher, opts.readOnly || file.readOnly, v.version === 1 ? await luks1Header(file) : undefined, v.payloadLength !== undefined);
  return node;
}

const CIPHER_ALGS = [
  'aes-128', 'aes-192', 'aes-256',
  'serpent-128', 'serpent-192', 'serpent-256',
  'twofish-128', 'twofish-192', 'twofish-256',
  'cast5-128',
] as const;

const LUKS2_KDFS = ['argon2id', 'argon2i', 'pbkdf2'] as const;
/** Options only a LUKS2 header has (cryptsetup's --pbkdf, --pbkdf-memory, --pbkdf-parallel, --sector-size). */
const LUKS2_ONLY = ['pbkdf', 'pbkdf-memory', 'pbkdf-parallel', 'sector-size'] as const;

async function create(req: CreateRequest): Promise<void> {
  const o = req.options;
  o.string('key-secret'); // createImage's: the passphrase is req.secret
  const version = o.choice('luks-version', ['1', '2'] as const) ?? '1';
  const alg = o.choice('cipher-alg', CIPHER_ALGS) ?? 'aes-256';
  const mode = o.choice('cipher-mode', CIPHER_MODES) ?? 'xts';
  const ivgen = o.choice('ivgen-alg', QEMU_IVGENS) ?? 'plain64';
  let ivHash: string | undefined = o.choice('ivgen-hash-alg', QEMU_HASHES);
  const hash = o.choice('hash-alg', QEMU_HASHES) ?? 'sha256';
  const iterTime = o.int('iter-time', 1, 2 ** 31 - 1) ?? 2000;
  const kdf = o.choice('pbkdf', LUKS2_KDFS) ?? 'argon2id';
  // cryptsetup's default is up to 1 GiB, lowered by its benchmark; 64 MiB keeps a WebAssembly argon2 quick.
  const memoryKiB = o.int('pbkdf-memory', 32, 1024 * 1024) ?? 64 * 1024;
  const parallel = o.int('pbkdf-parallel', 1, 4) ?? 4;
  const sectorSize = Number(o.choice('sector-size', ['512', '4096'] as const) ?? '512');
  if (version === '1') {
    const given = LUKS2_ONLY.find((k) => o.has(k));
    if (given) throw new UsageError(`${req.spec}: ${given} needs luks-version=2`);
  }
  o.finish('luks');
  const secret = req.secret;
  if (secret === undefined) throw new UsageError(`${req.spec}: Parameter 'key-secret' is required for cipher (or give --secret)`);
  if (req.size === undefined) throw new UsageError(`${req.spec}: luks images need a size`);
  if (ivgen === 'essiv' && ivHash === undefined) ivHash = 'sha256';
  const [family, bits] = alg.split('-') as [string, string];
  const passphrase = Buffer.from(secret, 'utf8');
  const crypto = await import('../../crypto/index.js');
  let made: { header: Uint8Array; payloadOffset: number };
  let size = req.size;
  if (version === '2') {
    if (memoryKiB < 8 * parallel) throw new UsageError(`${req.spec}: pbkdf-memory must be at least 8 KiB per pbkdf-parallel lane`);
    const keyBytes = (Number(bits) / 8) * (mode === 'xts' ? 2 : 1);
    const spec = { cipher: family, mode, ivgen, ivHash: ivgen === 'essiv' ? ivHash : undefined };
    made = await crypto.createLuks2({ spec, keyBytes, hash, kdf, iterTimeMs: iterTime, memoryKiB, parallel, sectorSize, passphrase }, req.spec);
    // A LUKS2 device holds whole encryption sectors.
    size = Math.ceil(size / sectorSize) * sectorSize;
  } else {
    made = await crypto.createLuks1({ cipher: family, cipherKeyBytes: Number(bits) / 8, mode, ivgen, ivHash, hash, iterTimeMs: iterTime, passphrase }, req.spec);
  }
  const file = req.file;
  if (!file.truncate) throw new UsageError(`${req.spec}: this protocol cannot be sized`);
  await file.truncate(made.payloadOffset + size);
  await file.write(0, made.header);
  await file.flush();
}

export const luksDriver: FormatDriver & Creatable = {
  name: 'luks',
  probe,
  open,
  createOptions: ['key-secret', 'cipher-alg', 'cipher-mode', 'ivgen-alg', 'ivgen-hash-alg', 'hash-alg', 'iter-time', 'luks-version', ...LUKS2_ONLY],
  create,
};
