// Cipher specifications as LUKS stores them: a family ("aes") and a mode string
// ("xts-plain64", "cbc-essiv:sha256", "ecb"), or LUKS2's one string "aes-xts-plain64".
import { isCipherFamily } from './cipher.js';
import { isHash } from './hash.js';
import { IVGENS, type IvGenName } from './ivgen.js';
import { CIPHER_MODES, type CipherMode } from './modes.js';

export interface CipherSpec {
  cipher: string;
  mode: CipherMode;
  ivgen: IvGenName;
  ivHash?: string;
}

/** Parse "xts-plain64" / "cbc-essiv:sha256" / "ecb"; returns a reason string when it cannot. */
export function parseModeSpec(cipher: string, modeSpec: string): CipherSpec | string {
  if (!isCipherFamily(cipher)) return `cipher ${cipher}`;
  const dash = modeSpec.indexOf('-');
  const mode = dash < 0 ? modeSpec : modeSpec.slice(0, dash);
  if (!(CIPHER_MODES as readonly string[]).includes(mode)) return `cipher mode ${mode}`;
  const ivPart = dash < 0 ? 'null' : modeSpec.slice(dash + 1);
  const colon = ivPart.indexOf(':');
  const ivgen = colon < 0 ? ivPart : ivPart.slice(0, colon);
  const ivHash = colon < 0 ? undefined : ivPart.slice(colon + 1);
  if (!(IVGENS as readonly string[]).includes(ivgen)) return `IV generator ${ivgen}`;
  if (ivgen === 'essiv' && (ivHash === undefined || !isHash(ivHash))) return `essiv hash ${ivHash ?? '(none)'}`;
  if (mode !== 'ecb' && ivgen === 'null' && dash < 0) return `cipher mode ${modeSpec} without an IV generator`;
  // dm-crypt ignores a hash given to plain/plain64, and so does QEMU.
  return { cipher, mode: mode as CipherMode, ivgen: ivgen as IvGenName, ivHash: ivgen === 'essiv' ? ivHash : undefined };
}

/** LUKS2's "aes-xts-plain64": the family is everything before the first dash. */
export function parseLuks2Encryption(enc: string): CipherSpec | string {
  const dash = enc.indexOf('-');
  if (dash < 0) return `encryption ${enc}`;
  return parseModeSpec(enc.slice(0, dash), enc.slice(dash + 1));
}

export function modeSpecString(s: CipherSpec): string {
  if (s.mode === 'ecb' && s.ivgen === 'null') return 'ecb';
  return `${s.mode}-${s.ivgen}${s.ivHash ? `:${s.ivHash}` : ''}`;
}
