// The one node interface of the block graph (shared/DESIGN.md, "The block graph").
// Protocol nodes, format nodes and filters all implement BlockNode; a format driver
// turns a protocol node into a format node.
import type { ImageLock } from './protocol/lock.js';
import type { SectorCipher } from './crypto/modes.js';

/** What a range of one layer holds, as QEMU's block_status answers for its own layer. */
export type ExtentKind =
  | 'data'        // allocated in this layer
  | 'zero'        // reads as zeros, answered by this layer
  | 'unallocated'; // not in this layer: the backing node (or zeros) answers

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
  /**
   * Where this layer's own file holds the range's first byte, the rest following it
   * contiguously (qemu-img map's "offset"); absent when unknown, compressed or elsewhere.
   */
  host?: number;
  /**
   * 'data' that reads as zeros all the same: the file beneath holds a hole there, or
   * ends before it (QEMU's BDRV_BLOCK_RECURSE: a metadata-preallocated qcow2, a flat vmdk
   * extent, a fixed VHD, a static VDI; qemu-img map's "data": true with "zero": true).
   * splitByHoles (format/mapped.ts) finds them.
   */
  zeroData?: boolean;
  /**
   * A run with a `host` that a write may overwrite there and nothing else: the layer
   * would change none of its metadata for it (qcow2: a plain 'data' cluster with the
   * COPIED flag, clear of every table; raw: the file's data and its holes, 'zero'), so
   * the FUSE workers may write it with pwrite(2) (fs/read-map.ts), where the node allows
   * it (inPlaceWrites).
   */
  inPlace?: boolean;
  /**
   * 'data' in another host file of this layer than its own (a vmdk extent's file, a
   * qcow2 data file): that file's descriptor and where in it the range's first byte
   * lies, the rest following contiguously, reading it with pread(2) giving the guest
   * bytes as for `host` in hostFd; and the file's name as the image gives it (the
   * descriptor's extent name, the header's data file name), which tsimg map prints
   * after the image's folder as qemu-img map does. `host` stays absent: it is a place in
   * the layer's own file. With `inPlace`, a write may overwrite it there with pwrite(2).
   * (A qcow2 data file's zero clusters that keep their place there carry it too.)
   */
  elsewhere?: { fd: number; host: number; name: string };
  /**
   * Where this layer's own file holds the range's ciphertext, contiguously, for an
   * encrypted layer that offers hostCipher: not a place of the guest's bytes, so
   * qemu-img map's "offset" (`host`) stays absent there, as QEMU leaves it.
   */
  cipherHost?: number;
  /**
   * One whole cluster of 'data' stored compressed in this layer's own file, its stream
   * in the `length` bytes at `host` (the last of them may lie past the end of the file):
   * 'deflate-raw', a qcow2 cluster of zlib's raw deflate filling them as QEMU counts
   * them; 'vmdk-grain', a streamOptimized grain marker there and the zlib stream it
   * sizes; 'zstd', a qcow2 cluster's zstd frame at the start of them. The read map's
   * threads inflate it (fs/read-map.ts). Never merged with a
   * neighbour; absent for other codecs.
   */
  compressed?: CompressedCluster;
}

/** Where a whole compressed cluster's stream lies (Extent.compressed). */
export interface CompressedCluster {
  host: number;
  length: number;
  stream: 'deflate-raw' | 'vmdk-grain' | 'zstd';
}

/**
 * How an encrypted layer's ciphertext reads around the graph (fs/read-map.ts): the
 * bytes at a block status `cipherHost` in `fd` are whole sectors of `cipher`, sector
 * number (cipherHost - ivBase) / cipher.sectorSize.
 */
export interface HostCipher {
  readonly fd: number;
  readonly cipher: SectorCipher;
  readonly ivBase: number;
}

/** What a consistency check found, in qemu-img check's terms (ImageCheck). */
export interface CheckReport {
  /** Metadata that is wrong: data may be corrupted, or later writes may corrupt it. */
  corruptions: number;
  /** Clusters allocated and used by nothing: wasted space only. */
  leaks: number;
  /** Problems that stopped the check itself (an unreadable table). */
  checkErrors: number;
  /** One line per problem, as qemu-img check prints them. */
  messages: string[];
  totalClusters?: number;
  allocatedClusters?: number;
  fragmentedClusters?: number;
  compressedClusters?: number;
  imageEndOffset?: number;
  /**
   * Any -r runs the repair, whatever was found (QED: QEMU's check fixes whatever it
   * can under either mode, and clears the need-check flag).
   */
  repairAlways?: boolean;
}

/**
 * What a repair fixed, when the repair counts it itself (qemu-img's leaks_fixed,
 * corruptions_fixed): a fix can uncover more to fix in the same pass (a dropped
 * entry leaves its cluster leaked, and the cut that frees it), which the difference
 * of two checks does not see.
 */
export interface RepairFixed {
  leaks: number;
  corruptions: number;
}

/** One internal snapshot as qemu-img info lists it. */
export interface SnapshotDescription {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** Absent in snapshots written before QEMU recorded it. */
  icount?: number;
}

/**
 * What one layer says of itself beyond its size, as qemu-img info shows it (QEMU's
 * bdrv_get_info and ImageInfoSpecific). Every field is optional: a format leaves out
 * what QEMU's driver leaves out.
 */
export interface ImageDescription {
  clusterSize?: number;
  /** Absent where the format has no such flag (qemu-img info then omits dirty-flag). */
  dirty?: boolean;
  /** The backing file as the image names it, and its format when recorded. */
  backingFile?: string;
  backingFormat?: string;
  /** Other files that hold this layer (VMDK extents), by name: qemu-img info's actual-size counts them. */
  otherFiles?: string[];
  /** Encrypted, known from the header even when opened without the passphrase. */
  encrypted?: boolean;
  snapshots?: SnapshotDescription[];
  /**
   * qemu-img info's "format-specific": { type, data } with QEMU's key names. A
   * "filename" in it (a vmdk extent's) is given from the image's folder, or absolute:
   * tsimg info puts the folder of the image's name as typed in front (path_combine).
   */
  formatSpecific?: { type: string; data: Record<string, unknown> };
  /**
   * Persistent dirty bitmaps (qcow2 v3): present, possibly empty, where the layer can
   * hold them; each bitmap covers the layer's virtual size (qemu-img measure sizes them).
   */
  bitmaps?: { name: string; granularity: number; flags: string[] }[];
}

/** How the node above wants writes and flushes treated (QEMU's cache modes). */
export type CacheMode = 'writeback' | 'writethrough' | 'none' | 'directsync' | 'unsafe';

/** How a resize allocates the new area (qemu-img resize --preallocation). */
export const PREALLOCATION_MODES = ['off', 'metadata', 'falloc', 'full'] as const;
export type Preallocation = (typeof PREALLOCATION_MODES)[number];

/** What a resize asks of a node besides the size (QEMU's bdrv_co_truncate arguments). */
export interface TruncateOptions {
  /** Growing only: allocate the new area (metadata: tables only; falloc: the host space too; full: zeros written). */
  prealloc?: Preallocation;
  /**
   * Growing only: the new area must read as zeros although the backing file reaches
   * into it (QEMU's BDRV_REQ_ZERO_WRITE); a node that cannot make it so refuses.
   */
  zeroNew?: boolean;
}

/** Every cache mode, in the order QEMU documents them (tsmount --cache, tsimg convert -t). */
export const CACHE_MODES: readonly CacheMode[] = ['writeback', 'writethrough', 'none', 'directsync', 'unsafe'];

/** How zero() goes about it. */
export interface ZeroOptions {
  /**
   * Make the range read as zeros whatever backing file the image has next: a node that
   * leaves alone what its current backing file already shows as zeros (past its end)
   * marks it zero too. rebase sets it, before the backing file changes.
   */
  ignoreBacking?: boolean;
  /**
   * With `unmap`: a write of zeros that may unmap (QEMU's write_zeroes with
   * BDRV_REQ_MAY_UNMAP, as qemu-img convert writes a source's zeros into a target that
   * does not read as zeros), not a discard: qcow2 v3 marks unallocated clusters zero
   * too, as a write of zeros does, and frees allocated ones. Other formats take it as unmap.
   */
  writeZeroes?: boolean;
}

/** An internal snapshot as a read-only node: its ID and name (qcow2's), and what it reads. */
export interface SnapshotView {
  name: string;
  id: string;
  node: BlockNode;
}

export interface BlockNode {
  /** Bytes; always < 2^53. */
  readonly size: number;
  readonly readOnly: boolean;
  /** A short description for messages: the file name, or the URI. */
  readonly name: string;
  /**
   * The node decrypts what it reads (LUKS, qcow2 and qcow encryption): its bytes are
   * plaintext that only those who can read the image should see (fs/access.ts).
   */
  readonly encrypted?: boolean;
  /**
   * Fill dst with the bytes at [offset, offset + dst.length). Callers keep requests
   * inside [0, size); a node never re-checks bounds its caller already checked.
   */
  read(offset: number, dst: Uint8Array): Promise<void>;
  /**
   * Write src at offset. Once the promise resolves src is the caller's again (it may be
   * reused for another write: util/write-encrypted.ts); a node that needs the bytes
   * later keeps a copy.
   */
  write(offset: number, src: Uint8Array): Promise<void>;
  /**
   * Write `parts` laid end to end from `offset` as one request (pwritev): a format
   * puts new data between the old bytes of a cluster's head and tail without copying
   * it into one buffer. Only nodes that write a host file themselves offer it; filters
   * do not forward it (a filter that changes writes would be gone around), so a caller
   * falls back to one buffer and write() where it is missing.
   */
  writev?(offset: number, parts: Uint8Array[]): Promise<void>;
  /**
   * Make [offset, offset + length) read as zeros, allocated as a write of zeros would
   * leave it (the file grows to cover it), without writing them: QEMU's write_zeroes with
   * BDRV_REQ_NO_FALLBACK, which qcow2 uses for the untouched part of a new cluster
   * (handle_alloc_space). False, with nothing done, where this node cannot do it so;
   * the caller writes the zeros. Offered as writev is, by nodes that write a host file
   * themselves; filters do not forward it.
   */
  allocateZeros?(offset: number, length: number): Promise<boolean>;
  /** Make [offset, offset+length) read as zeros; unmap lets the node deallocate. */
  zero?(offset: number, length: number, unmap: boolean, o?: ZeroOptions): Promise<void>;
  /**
   * Give [offset, offset + length) back to the storage beneath (QEMU's pdiscard: a hole
   * punched, BLKDISCARD): what the range reads afterwards is not promised. False where
   * nothing was done. qcow2 gives back the clusters a guest's unmap freed; offered, as
   * allocateZeros, by nodes that reach a host file themselves, and not forwarded by filters.
   */
  discard?(offset: number, length: number): Promise<boolean>;
  /** Everything written so far is durable when this resolves. */
  flush(): Promise<void>;
  /** Allocation status of this layer only; the result covers [offset, offset+length). */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /**
   * Change the size; only protocol nodes and formats that can resize implement it.
   * Callers go through drivers/resize.ts resizeNode, which works out `zeroNew`.
   */
  truncate?(size: number, o?: TruncateOptions): Promise<void>;
  /**
   * Read-only views of the image's internal snapshots (qcow2), which fs/ shows as
   * <stem>@<name>.raw; owned by this node (closing them is a no-op).
   */
  snapshots?(): SnapshotView[];
  /** The next layer of a backing chain: what 'unallocated' extents of this node read from. */
  readonly backing?: BlockNode | undefined;
  /** The QEMU-compatible lock on the file under this node (the file protocol's). */
  readonly imageLock?: ImageLock | undefined;
  /** Bytes the file takes on its disk (st_blocks), where the protocol knows (the file protocol). */
  allocatedBytes?(): Promise<number>;
  /**
   * Requests must start and end on multiples of this many bytes (a sector-based
   * format, an NBD export's minimum block). The graph builder puts the alignment
   * filter over such a node once; nobody else looks at it.
   */
  readonly requestAlignment?: number | undefined;
  /** A VMDK's content ID, which an overlay records as its parentCID. */
  readonly vmdkCid?: number | undefined;
  /** A VHDX's DataWriteGuid (lowercase, no braces) and logical sector size, which a differencing child checks. */
  readonly vhdxIdentity?: { readonly dataWriteGuid: string; readonly logicalSectorSize: number } | undefined;
  /**
   * The node makes its bytes a whole chunk of this many at a time (a compressed
   * block): reading any byte of a chunk costs the whole chunk. The graph builder then
   * caches this node's data in chunks, so a sequential read decodes each chunk once.
   */
  readonly chunkSize?: number | undefined;
  /**
   * A removable medium's change count (a CD-ROM or floppy drive under the file
   * protocol): bumped at each insertion, removal or change, so nobody may keep its
   * bytes across one. The graph builder gives such a node no data cache.
   */
  readonly mediumGeneration?: number | undefined;
  /**
   * A host file descriptor whose bytes are exactly this node's at the same offsets,
   * with nothing in between that must see the I/O (a raw image on a local file): the
   * FUSE layer may hand it to the kernel (FUSE passthrough), and then reads and writes
   * of the flat file never reach tsmount. Filters do not forward it unless they
   * change nothing a request sees.
   */
  readonly passthroughFd?: number | undefined;
  /**
   * Compressed writes (qemu-img convert -c, QEMU's bdrv_co_pwritev_compressed): the
   * cluster size they work in, present exactly when writeCompressed is.
   */
  readonly compressedClusterSize?: number | undefined;
  /**
   * Write one whole cluster compressed: `offset` a multiple of compressedClusterSize,
   * `data` that many bytes (less only for the last cluster of the disk). A cluster that
   * does not shrink is written as write() would; onto one already allocated, qcow2
   * refuses (IoError, as QEMU's EIO) and qcow writes plain.
   */
  writeCompressed?(offset: number, data: Uint8Array): Promise<void>;
  /**
   * The host file descriptor that this layer's block status `host` offsets refer to
   * (its own image file), where reading those bytes with pread(2) gives exactly the
   * guest data: no encryption, no O_DIRECT, no removable medium. The FUSE layer's
   * worker threads read plain data runs from it themselves (fs/read-map.ts). Filters
   * forward it only where they change nothing a reader sees; anything unsure leaves
   * it undefined.
   */
  readonly hostFd?: number | undefined;
  /**
   * An encrypted layer's hostFd: its block status gives `cipherHost` where reading
   * those bytes with pread(2) and decrypting them with this gives exactly the guest
   * data. Filters forward it where they forward hostFd; anything unsure leaves it out.
   */
  readonly hostCipher?: HostCipher | undefined;
  /**
   * Writes of ranges whose block status says `inPlace` may go around the graph, with
   * pwrite(2) to hostFd (the FUSE workers, fs/read-map.ts), or for an encrypted layer
   * encrypted with hostCipher's cipher and written at `cipherHost`: nothing in or above this
   * node must see them. Formats say so where an overwrite in place needs nothing of
   * them (after whatever the first write must do); filters only where they change
   * nothing a write sees, and the cluster cache only in a cache mode that does not
   * flush each write (it drops its data when told: dropCachedData).
   */
  readonly inPlaceWrites?: boolean | undefined;
  /**
   * Where whoever writes around this node (inPlaceWrites) records what it wrote: one bit
   * per 2^granuleBits bytes, set with Atomics.or (qcow2's persistent bitmaps fold it in).
   * Every filter that forwards inPlaceWrites forwards this too.
   */
  readonly writeLog?: WriteLog | undefined;
  /**
   * Bumped whenever host space this layer allocates or frees may change what a range
   * writable in place is (qcow2: a refcount changed, except for the data clusters a write
   * allocated): it may since have become something else, a table say, so the FUSE layer
   * asks block status again before writing around the graph. Absent: the layer never
   * moves data (raw).
   */
  readonly layoutGeneration?: number | undefined;
  /**
   * Bumped at every allocation or free of host space, data clusters included (a hint:
   * the FUSE layer does not refresh its map after a write that allocated, which is
   * seldom overwritten next). Absent: the layer never allocates.
   */
  readonly allocationGeneration?: number | undefined;
  /**
   * The span one allocation maps at once, aligned to it (a cluster, a block): a write
   * that allocates may change what block status says of the rest of its unit (a hint
   * for the FUSE layer's map: it walks those granules again). Absent: only what a write
   * writes changes.
   */
  readonly allocationUnit?: number | undefined;
  /** Forget every cached byte of guest data (the FUSE workers wrote around the graph). */
  dropCachedData?(): void;
  /** What the format says of this layer (tsimg info); formats only. */
  describe?(): ImageDescription;
  /** A consistency check of this layer's metadata, changing nothing (tsimg check). */
  checkMetadata?(): Promise<CheckReport>;
  /**
   * Repair what checkMetadata finds (tsimg check -r): 'leaks' frees what nothing uses,
   * 'all' also raises counts that are too low; writable nodes only, and nothing may be
   * written through the node afterwards (close it and open again).
   */
  repairMetadata?(mode: 'leaks' | 'all'): Promise<RepairFixed | void>;
  /** Create, delete and revert to internal snapshots (tsimg snapshot); writable qcow2 nodes, and Sheepdog VDIs (create only). */
  readonly snapshotControl?: SnapshotControl | undefined;
  /** Persistent dirty bitmaps changed (tsimg bitmap); the active writable node only (qcow2). */
  readonly bitmapControl?: BitmapControl | undefined;
  /** One persistent dirty bitmap's bits as the image holds them (tsimg bitmap --merge -b: its source). */
  readBitmap?(name: string): Promise<BitmapBits>;
  /** Make every cluster of this layer unallocated, so it reads its backing file (tsimg commit). */
  makeEmpty?(): Promise<void>;
  /** Rewrite the header's backing file name and format (tsimg rebase, amend); nothing else changes. */
  setBacking?(file: string | undefined, format: string | undefined): Promise<void>;
  /** Change header options in place (tsimg amend -o), as QEMU's bdrv_amend_options. */
  amend?(options: import('./options.js').CreateOptions): Promise<void>;
  close(): Promise<void>;
}

/** What tsimg bitmap does to a layer's persistent dirty bitmaps (qemu-img bitmap; qcow2's bitmap.ts). */
export interface BitmapControl {
  /** A new enabled, empty bitmap; `granularity` in bytes (default: the cluster size within 4 KiB..64 KiB). */
  add(name: string, granularity?: number): Promise<void>;
  remove(name: string): Promise<void>;
  clear(name: string): Promise<void>;
  enable(name: string): Promise<void>;
  disable(name: string): Promise<void>;
  /** Set in `target` every granule `source` has set: a bitmap of this image, or of `from`. */
  merge(target: string, source: string, from?: BlockNode): Promise<void>;
}

/** A bitmap over a node's bytes, shared with the threads that write around it (BlockNode.writeLog). */
export interface WriteLog {
  words: Int32Array;
  granuleBits: number;
}

/** One bitmap's bits. */
export interface BitmapBits {
  /** The disk size the bitmap covers. */
  size: number;
  granularityBits: number;
  /** LSB first, one bit per granule. */
  data: Buffer;
}

/** What tsimg snapshot does to a layer's internal snapshots (QEMU's bdrv_snapshot_*). */
export interface SnapshotControl {
  create(name: string): Promise<void>;
  /** By ID first, then by name, as qemu-img finds a snapshot. */
  remove(idOrName: string): Promise<void>;
  apply(idOrName: string): Promise<void>;
}


export interface OpenOptions {
  readOnly: boolean;
  cache: CacheMode;
  /** Bytes of metadata cache a format node may use. */
  metadataCacheBytes: number;
  /** Opens a backing file by name, relative names resolved against the overlay, on its protocol. */
  openBacking(name: string, format: string | undefined): Promise<BlockNode>;
  /**
   * Opens a plain file (a qcow2 external data file) by name, relative names resolved
   * against the image, on its protocol, read-only when the image is. `role` names it
   * in messages ('extent', 'data file'); local files pass drivers/trust.ts first.
   */
  openFile?(name: string, role?: string): Promise<BlockNode>;
  /** Passphrase for encrypted images. */
  secret?: string;
  /** Skip backing files entirely (qemu-img info's view). */
  noBacking?: boolean;
  /**
   * Metadata only (qemu-img info's BDRV_O_NO_IO): an encrypted image opens without its
   * passphrase, and the node refuses to read or write its data.
   */
  noIo?: boolean;
  /**
   * Opened to be checked and repaired (tsimg check -r; QEMU's BDRV_O_CHECK): a format
   * that refuses a dirty image read/write, or repairs it on open, leaves that to
   * repairMetadata.
   */
  check?: boolean;
}

export interface FormatDriver {
  /** QEMU's driver name. */
  readonly name: string;
  /**
   * How sure the driver is that this is its format, 0..100 (QEMU's bdrv_probe), from
   * the file's first bytes and, for a driver with `tailBytes`, its last ones.
   */
  probe(head: Uint8Array, filename: string, tail?: Uint8Array): number;
  /** Bytes at the end of the file the probe needs too (a header kept at the end). */
  readonly tailBytes?: number;
  open(file: BlockNode, opts: OpenOptions): Promise<BlockNode>;
}

/** 2^53: the largest size any node may claim, so every offset is an exact number. */
export const MAX_NODE_SIZE = Number.MAX_SAFE_INTEGER + 1;

/** What a protocol node is opened with; protocols that cannot lock ignore `lock`. */
export interface ProtocolOpenOptions {
  readOnly: boolean;
  lock?: import('./protocol/lock.js').LockRequest;
  cache: CacheMode;
  /**
   * false: under cache=unsafe, close leaves what was written to the host's writeback
   * instead of syncing it, as QEMU's unsafe mode never syncs (tsimg convert's default
   * -t unsafe, as qemu-img's). Local files honour it; remote protocols sync at close.
   * Absent: a writable image is synced at close whatever the cache mode.
   */
  syncOnClose?: boolean;
}

/**
 * Where bytes live: a local file, NBD, SSH... A spec is what the user typed (a path,
 * a URI); each protocol claims the specs it understands, the file protocol the rest.
 */
/**
 * What QEMU's file protocol (file-posix raw_co_create) sets on a file it creates, from
 * qemu-img create's protocol options, whatever the format: the btrfs NOCOW attribute
 * (`nocow`) and the XFS extent size hint (`extent_size_hint`, 1 MiB unless given).
 */
export interface FileAttributes {
  nocow: boolean;
  extentSizeHint: number;
  /** The hint was given: a file system that refuses it is then warned about, as QEMU does. */
  hintGiven: boolean;
}

export interface ProtocolDriver {
  readonly name: string;
  claims(spec: string): boolean;
  open(spec: string, opts: ProtocolOpenOptions): Promise<BlockNode>;
  /** `name` (a backing file, an extent) relative to `base`, on the same protocol and with its options. */
  resolveRelative(base: string, name: string): string;
  /**
   * Make an empty object to create an image in (tsimg create); open it with open().
   * `attrs`: what QEMU's file protocol sets on a new file; others ignore them.
   */
  create?(spec: string, attrs?: FileAttributes): Promise<void>;
  /**
   * A protocol whose objects are volumes with a size of their own (a Sheepdog VDI):
   * make one of `size` bytes, or a clone of the snapshot `backing` names, instead of
   * create() and a raw format. Returns the size made.
   */
  createVolume?(spec: string, size: number | undefined, backing: string | undefined): Promise<number>;
  /** Remove what create() made, when creating the image failed. */
  remove?(spec: string): Promise<void>;
  /** The stem of the flat file name for this spec (`disk` for .../disk.qcow2). */
  stem?(spec: string): string;
}

/** What `tsimg create` hands a format driver. */
export interface CreateRequest {
  /** The spec of the image to create; its protocol object exists and is empty. */
  spec: string;
  /** The image's protocol node, opened read-write. */
  file: BlockNode;
  /** Virtual size; undefined when not given (then a backing file's size). */
  size: number | undefined;
  options: import('./options.js').CreateOptions;
  /** Passphrase from --secret/--secret-file or key-secret. */
  secret: string | undefined;
  /** Create another object (an extent, a data file) beside the image and open it read-write. */
  createFile(name: string): Promise<BlockNode>;
  /** A name relative to the image, as backing names are resolved. */
  resolve(name: string): string;
  /** Open an image read-only (to size or probe a backing file); returns the node and its format. */
  openImage(spec: string, format?: string): Promise<{ node: BlockNode; format: string }>;
}

export interface Creatable {
  /** Option names that create() accepts, as qemu-block-drivers(7) lists them. */
  readonly createOptions: readonly string[];
  /** The value each option takes when not given, where there is one (tsimg create -o help). */
  readonly createDefaults?: Readonly<Record<string, string>>;
  create(req: CreateRequest): Promise<void>;
}
