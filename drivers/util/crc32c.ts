// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of every VHDX
// header, region table and log entry (VHDX 1.0, 2.2.2) and the iSCSI digests (RFC 7143 13.1).
const TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** Continue a CRC over more bytes; start with 0xffffffff, finish by xor with 0xffffffff. */
export function crc32cUpdate(state: number, data: Uint8Array): number {
  let c = state >>> 0;
  for (let i = 0; i < data.length; i++) c = TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** CRC-32C of `data` with the 4 bytes at `crcAt` counted as zero (where the checksum itself lives). */
export function crc32cExcluding(data: Uint8Array, crcAt: number): number {
  let c = crc32cUpdate(0xffffffff, data.subarray(0, crcAt));
  c = crc32cUpdate(c, new Uint8Array(4));
  c = crc32cUpdate(c, data.subarray(crcAt + 4));
  return (c ^ 0xffffffff) >>> 0;
}
