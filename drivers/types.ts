// The one node interface of the block graph (shared/DESIGN.md, "The block graph").
// Protocol nodes, format nodes and filters all implement BlockNode; a format driver
// turns a protocol node into a format node.

/** What a range of one layer holds, as QEMU's block_status answers for its own layer. */
export type ExtentKind =
  | 'data'        // allocated in this layer
  | 'zero'        // reads as zeros, answered by this layer
  | 'unallocated'; // not in this layer: the backing node (or zeros) answers

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
}

/** How the node above wants writes and flushes treated (QEMU's cache modes). */
export type CacheMode = 'writeback' | 'writethrough' | 'none' | 'directsync' | 'unsafe';

export interface BlockNode {
  /** Bytes; always < 2^53. */
  readonly size: number;
  readonly readOnly: boolean;
  /** A short description for messages: the file name, or the URI. */
  readonly name: string;
  /**
   * Fill dst with the bytes at [offset, offset + dst.length). Callers keep requests
   * inside [0, size); a node never re-checks bounds its caller already checked.
   */
  read(offset: number, dst: Uint8Array): Promise<void>;
  write(offset: number, src: Uint8Array): Promise<void>;
  /** Make [offset, offset+length) read as zeros; unmap lets the node deallocate. */
  zero?(offset: number, length: number, unmap: boolean): Promise<void>;
  /** Everything written so far is durable when this resolves. */
  flush(): Promise<void>;
  /** Allocation status of this layer only; the result covers [offset, offset+length). */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** Change the size; only protocol nodes and formats that can grow implement it. */
  truncate?(size: number): Promise<void>;
  close(): Promise<void>;
}

export interface OpenOptions {
  readOnly: boolean;
  cache: CacheMode;
  /** Bytes of metadata cache a format node may use. */
  metadataCacheBytes: number;
  /** Opens a backing file by name, relative names resolved against the overlay. */
  openBacking(name: string, format: string | undefined, from: BlockNode): Promise<BlockNode>;
  /** Skip backing files entirely (qemu-img info's view). */
  noBacking?: boolean;
}

export interface FormatDriver {
  /** QEMU's driver name. */
  readonly name: string;
  /** How sure the driver is that this is its format, 0..100 (QEMU's bdrv_probe). */
  probe(head: Uint8Array, filename: string): number;
  open(file: BlockNode, opts: OpenOptions): Promise<BlockNode>;
}

/** A format node's view of its own backing chain, for messages and locking. */
export interface HasBacking {
  readonly backing: BlockNode | undefined;
}

/** 2^53: the largest size any node may claim, so every offset is an exact number. */
export const MAX_NODE_SIZE = Number.MAX_SAFE_INTEGER + 1;
