// What format probing and option checking need to know of LUKS, without loading the
// ciphers (the cipher tables take ~35 ms to load: only encrypted images pay that).
export const LUKS_MAGIC = Uint8Array.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]); // "LUKS\xba\xbe"

export type CipherMode = 'xts' | 'cbc' | 'ecb' | 'ctr';
export const CIPHER_MODES: readonly CipherMode[] = ['xts', 'cbc', 'ecb', 'ctr'];

/** 1 or 2 when `head` starts with a LUKS header of that version, else 0. */
export function luksVersion(head: Uint8Array): 0 | 1 | 2 {
  if (head.length < 8 || !LUKS_MAGIC.every((m, i) => head[i] === m)) return 0;
  const v = (head[6]! << 8) | head[7]!;
  return v === 1 ? 1 : v === 2 ? 2 : 0;
}
