// What the read map's tests share: the map's ciphers as a reading thread makes them.
import { makeSectorCipher } from '../../drivers/crypto/modes.js';
import type { ReadMap } from '../../fs/read-map.js';
import type { RunCipher } from '../../fs/read-map-runs.js';

/** The map's ciphers as a worker makes them from what it is given (fuse-worker.ts, ThreadCiphers), by the map's number. */
export function threadCiphers(map: ReadMap): (RunCipher | undefined)[] {
  return [undefined, ...(map.share().ciphers ?? []).map((c) => ({ cipher: makeSectorCipher(structuredClone(c.spec)), ivBase: c.ivBase }))];
}
