// The shared read map's memory layout, and the two sides of its seqlock: the main
// thread (fs/read-map.ts) is the only writer, the FUSE worker threads
// (fs/fuse-worker.ts) only read. Pure: no imports, so a worker loads nothing else.
//
// One map per flat file: a SharedArrayBuffer of Int32 words, a header, then a table of
// entries indexed by granule number modulo the capacity (a newer entry overwrites the
// one in its slot). An entry says how one whole granule of the flat file reads: as
// zeros (fd -1) or as the bytes at `host` in host descriptor `fd`, contiguous, or as
// ciphertext there that cipher number `cipher` of the map decrypts (fs/read-map.ts
// ciphers: the thread that reads it was given the cipher with the map), or as one
// compressed cluster as large as the granule (its stream: STREAM_*) there.
// Each entry has a sequence word, odd while the writer changes the entry: a reader
// takes the entry only if the word was even and the same before and after it read the
// other words. Atomics order the words, so a reader never sees half an entry.
//
// Writes in place: an entry may also say a WRITE of its granule can go straight to
// `host` (F_IN_PLACE: the format changes nothing for it, fs/read-map.ts says when), as
// long as the table's epoch is still the one the entry was published in. A worker
// announces its write (H_WRITES_IN_FLIGHT) before it looks, and writes only
// while the main thread changes nothing of the file (H_CHANGING): each side stores its
// word, then reads the other's, so one of them always sees the other (fs/read-map.ts
// beginWrite waits for the workers' writes to end).

/**
 * The unit of the map at most: 64 KiB of the flat file (a qcow2 cluster, a vmdk grain).
 * A file whose clusters are smaller (qcow's 4 KiB, qcow2 made with a small cluster_size)
 * gets a finer map, down to MIN_GRANULE_SHIFT (newTable): a granule is served from the
 * map only when it is one run in one host file, and such clusters seldom lie together.
 */
export const GRANULE_SHIFT = 16;
export const GRANULE = 1 << GRANULE_SHIFT;
/** The finest map: a page (what a READ of the page cache asks for). */
export const MIN_GRANULE_SHIFT = 12;
/**
 * What one walk of the chain publishes (fs/read-map.ts): a miss publishes its window and
 * the next, and a thread that served a READ from the map asks for the window one
 * WINDOW past it when the map lacks it (fuse-worker.ts), so a sequential reader finds
 * the map filled before it gets there.
 */
export const WINDOW = 64 * 1024 * 1024;
/** The file a map holds without a collision, whatever its granule: 64Ki x 64 KiB, or 1Mi x 4 KiB. */
const COVERAGE = 2 ** 32;

const H_SIZE_LO = 0;
const H_SIZE_HI = 1;
/** Reads the workers answered, for the counters (their bytes: servedBytes). */
export const H_READS = 2;
/** Of those, the reads answered by splice(2) (TSMOUNT_FUSE_SPLICE). */
export const H_SPLICED = 4;
/** Writes the workers wrote in place (their bytes: writtenBytes). */
export const H_WRITES = 8;
/** Workers' writes in flight: between announcing one and answering it. */
export const H_WRITES_IN_FLIGHT = 9;
/** Main-thread changes (write, zero, resize) of the file in flight: no worker writes meanwhile. */
export const H_CHANGING = 10;
/** Entries published in another epoch are not written in place (a change moved clusters). */
export const H_EPOCH = 11;
/** 1 while workers may write at all (cleared after a failed change: the image may be marked corrupt). */
export const H_WRITABLE = 12;
/** Set by a worker's write, taken by the main thread's next flush (fs/flatfs.ts). */
export const H_DIRTY = 13;
/** The granule's shift and the number of entries: set by newTable, never changed. */
const H_SHIFT = 16;
const H_CAPACITY = 17;
const HEADER_WORDS = 18;
/** The bytes of those reads, exact: an int64 over header words 6 and 7. */
const B_BYTES = 3;
/** The bytes the workers wrote, over header words 14 and 15. */
const B_WRITTEN = 7;
const bytesViews = new WeakMap<Int32Array, BigInt64Array>();

function bytesView(t: Int32Array): BigInt64Array {
  let v = bytesViews.get(t);
  if (!v) bytesViews.set(t, (v = new BigInt64Array(t.buffer, 0, HEADER_WORDS / 2)));
  return v;
}

/** A thread answered a READ of `bytes` from the map (`spliced`: by splice(2)): count it. */
export function countServed(t: Int32Array, bytes: number, spliced: boolean): void {
  Atomics.add(t, H_READS, 1);
  if (spliced) Atomics.add(t, H_SPLICED, 1);
  Atomics.add(bytesView(t), B_BYTES, BigInt(bytes));
}

/** A worker wrote `bytes` in place: count it, and mark the file for the next flush. */
export function countWritten(t: Int32Array, bytes: number): void {
  Atomics.add(t, H_WRITES, 1);
  Atomics.add(bytesView(t), B_WRITTEN, BigInt(bytes));
  Atomics.store(t, H_DIRTY, 1);
}

/** The bytes the workers wrote in place. */
export function writtenBytes(t: Int32Array): number {
  return Number(Atomics.load(bytesView(t), B_WRITTEN));
}

/** The bytes of the READs answered from the map. */
export function servedBytes(t: Int32Array): number {
  return Number(Atomics.load(bytesView(t), B_BYTES));
}

const E_SEQ = 0;
/** The granule's number plus one, over two words (0: no entry): one word would take granule 2^32 for granule 0 (at 256 TiB; at 16 TiB with 4 KiB granules). */
const E_KEY_LO = 1;
const E_KEY_HI = 2;
const E_FD = 3;
const E_HOST_LO = 4;
const E_HOST_HI = 5;
/** The epoch the entry was published in, shifted left once; bit 0: F_IN_PLACE. */
const E_FLAGS = 6;
/**
 * 0: the bytes are the guest's; n > 0: ciphertext of the map's cipher n; n < 0: the
 * granule is one compressed cluster, its stream (of the kind E_FLAGS names: STREAM_*)
 * in the -n bytes at `host` (read-map-runs.ts inflates it; never written in place).
 */
const E_CIPHER = 7;
const ENTRY_WORDS = 8;
/** A WRITE of the granule may go straight to `host` (while the epoch holds). */
const F_IN_PLACE = 1;

/** A compressed granule's stream (in E_FLAGS, shifted left once): raw deflate of exactly its bytes (qcow2). */
export const STREAM_DEFLATE_RAW = 1;
/** A VMDK grain: a marker (lba u64, size u32), then a zlib stream of `size` bytes (streamOptimized). */
export const STREAM_VMDK_GRAIN = 2;
/** A zstd frame, then whatever is left of its last sector (qcow2 compression_type=zstd). */
export const STREAM_ZSTD = 3;

const TWO32 = 0x1_0000_0000;

/**
 * A map of granules of 2^shift bytes (MIN_GRANULE_SHIFT..GRANULE_SHIFT), with as many
 * entries as cover COVERAGE bytes (32 MiB of shared memory for 4 KiB granules, touched
 * only as entries are published).
 */
export function newTable(shift = GRANULE_SHIFT): Int32Array {
  if (!Number.isInteger(shift) || shift < MIN_GRANULE_SHIFT || shift > GRANULE_SHIFT) throw new RangeError(`read map granule shift ${shift}`);
  const capacity = COVERAGE / 2 ** shift;
  const t = new Int32Array(new SharedArrayBuffer((HEADER_WORDS + capacity * ENTRY_WORDS) * 4));
  t[H_SHIFT] = shift;
  t[H_CAPACITY] = capacity;
  return t;
}

/** The map's granule in bytes. */
export function granuleOf(t: Int32Array): number {
  return 2 ** t[H_SHIFT]!;
}

/** The map's number of entries (a change of more granules than this forgets them all). */
export function capacityOf(t: Int32Array): number {
  return t[H_CAPACITY]!;
}

export function setTableSize(t: Int32Array, size: number): void {
  Atomics.store(t, H_SIZE_LO, size % TWO32 | 0);
  Atomics.store(t, H_SIZE_HI, Math.floor(size / TWO32));
}

export function tableSize(t: Int32Array): number {
  return (Atomics.load(t, H_SIZE_LO) >>> 0) + (Atomics.load(t, H_SIZE_HI) >>> 0) * TWO32;
}

function base(t: Int32Array, granule: number): number {
  return HEADER_WORDS + (granule % t[H_CAPACITY]!) * ENTRY_WORDS;
}

function keyLo(g: number): number {
  return (g + 1) % TWO32 | 0;
}

function keyHi(g: number): number {
  return Math.floor((g + 1) / TWO32);
}

/**
 * Writer only: publish granule `g` as zeros (fd < 0) or as `host` in `fd` (`inPlace`:
 * writable there too), or as ciphertext there of the map's cipher number `cipher`
 * (writable too with `inPlace`: encrypted by the writing thread), or with `cipher` -n
 * as one compressed cluster, a stream of kind `stream` (STREAM_*) in the n bytes at
 * `host` (inPlace false).
 */
export function publish(t: Int32Array, g: number, fd: number, host: number, inPlace = false, cipher = 0, stream = 0): void {
  const b = base(t, g);
  const seq = Atomics.load(t, b + E_SEQ);
  Atomics.store(t, b + E_SEQ, seq + 1);
  Atomics.store(t, b + E_KEY_LO, keyLo(g));
  Atomics.store(t, b + E_KEY_HI, keyHi(g));
  Atomics.store(t, b + E_FD, fd);
  Atomics.store(t, b + E_HOST_LO, host % TWO32 | 0);
  Atomics.store(t, b + E_HOST_HI, Math.floor(host / TWO32));
  // Ciphertext too: a writer thread encrypts it with its own copy of the cipher (read-map-runs.ts writeInPlace).
  Atomics.store(t, b + E_FLAGS, cipher < 0 ? stream << 1 : inPlace && fd >= 0 ? ((Atomics.load(t, H_EPOCH) << 1) | F_IN_PLACE) : 0);
  Atomics.store(t, b + E_CIPHER, fd >= 0 ? cipher : 0);
  Atomics.store(t, b + E_SEQ, seq + 2);
}

/** Writer only: forget granule `g` if its slot holds it. */
export function invalidate(t: Int32Array, g: number): void {
  const b = base(t, g);
  if (Atomics.load(t, b + E_KEY_LO) !== keyLo(g) || Atomics.load(t, b + E_KEY_HI) !== keyHi(g)) return;
  const seq = Atomics.load(t, b + E_SEQ);
  Atomics.store(t, b + E_SEQ, seq + 1);
  Atomics.store(t, b + E_KEY_LO, 0);
  Atomics.store(t, b + E_KEY_HI, 0);
  Atomics.store(t, b + E_SEQ, seq + 2);
}

/** Writer only: forget every entry. */
export function invalidateAll(t: Int32Array): void {
  const capacity = t[H_CAPACITY]!;
  for (let i = 0; i < capacity; i++) {
    const b = HEADER_WORDS + i * ENTRY_WORDS;
    if (Atomics.load(t, b + E_KEY_LO) === 0 && Atomics.load(t, b + E_KEY_HI) === 0) continue;
    const seq = Atomics.load(t, b + E_SEQ);
    Atomics.store(t, b + E_SEQ, seq + 1);
    Atomics.store(t, b + E_KEY_LO, 0);
    Atomics.store(t, b + E_KEY_HI, 0);
    Atomics.store(t, b + E_SEQ, seq + 2);
  }
}

/** Writer only: no entry published so far may be written in place any more (reads still may). */
export function newEpoch(t: Int32Array): void {
  // 30 bits of epoch: a wrap would need a billion changes that moved clusters meanwhile.
  Atomics.store(t, H_EPOCH, (Atomics.load(t, H_EPOCH) + 1) & 0x3fffffff);
}

/**
 * Reader: granule `g`'s entry into out ([fd, host, writable in place, cipher, stream]: the
 * last STREAM_* for a compressed granule, else 0); false if the
 * map does not hold it (never published, overwritten, invalidated, or being changed
 * right now).
 */
export function lookup(t: Int32Array, g: number, out: number[]): boolean {
  const b = base(t, g);
  const s1 = Atomics.load(t, b + E_SEQ);
  if (s1 & 1) return false;
  if (Atomics.load(t, b + E_KEY_LO) !== keyLo(g) || Atomics.load(t, b + E_KEY_HI) !== keyHi(g)) return false;
  const fd = Atomics.load(t, b + E_FD);
  const host = (Atomics.load(t, b + E_HOST_LO) >>> 0) + (Atomics.load(t, b + E_HOST_HI) >>> 0) * TWO32;
  const flags = Atomics.load(t, b + E_FLAGS);
  const cipher = Atomics.load(t, b + E_CIPHER);
  if (Atomics.load(t, b + E_SEQ) !== s1) return false;
  out[0] = fd;
  out[1] = host;
  out[2] = cipher >= 0 && flags & F_IN_PLACE && flags >>> 1 === Atomics.load(t, H_EPOCH) ? 1 : 0;
  out[3] = cipher;
  out[4] = cipher < 0 ? flags >>> 1 : 0;
  return true;
}
