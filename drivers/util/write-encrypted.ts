// The ciphertext of a write, in buffers kept from one write to the next. Here, not in
// drivers/crypto/, and importing no cipher code (types only): qcow2 and luks import it
// at load, and an unencrypted image loads nothing of crypto/ (format-registry.test.ts).
import type { SectorCipher } from '../crypto/modes.js';

/** Buffers kept for writeEncrypted(), at most SPARE_COUNT of at most SPARE_MAX bytes. */
const spares: Uint8Array[] = [];
const SPARE_COUNT = 4;
const SPARE_MAX = 4 * 1024 * 1024;

/**
 * Encrypt a copy of `src` (whole sectors from `firstSector`) and hand it to `write`.
 * The copy is made in a buffer kept from an earlier write: a fresh 1 MiB Uint8Array is a
 * new mapping the CPU faults in page by page (0.18 ms per MiB here, a fifth of a LUKS
 * write's time on the JS thread). The buffer is kept again once `write` has resolved: a
 * node's write() is done with its buffer then (drivers/types.ts).
 */
export async function writeEncrypted(cipher: SectorCipher, src: Uint8Array, firstSector: number, write: (ciphertext: Uint8Array) => Promise<void>): Promise<void> {
  // The smallest that fits.
  let at = -1;
  for (let i = 0; i < spares.length; i++) if (spares[i]!.length >= src.length && (at < 0 || spares[i]!.length < spares[at]!.length)) at = i;
  const whole = at >= 0 ? spares.splice(at, 1)[0]! : new Uint8Array(Math.max(src.length, 64 * 1024));
  const buf = whole.subarray(0, src.length);
  buf.set(src);
  cipher.encrypt(buf, firstSector);
  await write(buf);
  // Not after a failure: a remote node's socket might still be sending it.
  keep(whole);
}

/** The largest buffers are kept: small writes first (a file system's metadata) must not crowd out the 1 MiB ones after. */
function keep(buf: Uint8Array): void {
  if (buf.length > SPARE_MAX) return;
  if (spares.length < SPARE_COUNT) return void spares.push(buf);
  let smallest = 0;
  for (let i = 1; i < spares.length; i++) if (spares[i]!.length < spares[smallest]!.length) smallest = i;
  if (spares[smallest]!.length < buf.length) spares[smallest] = buf;
}
