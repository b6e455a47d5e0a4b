// Typed errors (shared/STYLE.md): one class per kind, each with the errno that fs/
// reports to FUSE and a message a person can act on. Only fs/ turns them into errno.
import { constants } from 'node:os';

const E = constants.errno;

export class TsmountError extends Error {
  readonly errno: number = E.EIO;
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The image's metadata is inconsistent or points where it must not. */
export class CorruptImageError extends TsmountError {
  override readonly errno = E.EIO;
}

/** A feature the image uses that tsmount does not implement (yet). */
export class UnsupportedError extends TsmountError {
  override readonly errno = E.ENOTSUP;
}

/** Another process holds a lock that conflicts with ours. */
export class LockedError extends TsmountError {
  override readonly errno = E.EAGAIN;
}

export class BadPassphraseError extends TsmountError {
  override readonly errno = E.EPERM;
}

/** A write to a read-only node. */
export class ReadOnlyError extends TsmountError {
  override readonly errno = E.EROFS;
}

/** Bad user input: an option, a path, a format name. */
export class UsageError extends TsmountError {
  override readonly errno = E.EINVAL;
}

/** The file system under the image could not do what was asked (ENOSPC, EIO...). */
export class IoError extends TsmountError {
  constructor(message: string, override readonly errno: number = E.EIO) {
    super(message);
  }
}

/** The errno a FUSE reply should carry for any thrown value. */
export function errnoOf(err: unknown): number {
  if (err instanceof TsmountError) return err.errno;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === 'string' && code in E) return E[code as keyof typeof E];
  return E.EIO;
}

/** One line for a person: no stack, no class names. */
export function messageOf(err: unknown): string {
  if (err instanceof Error) return err.message.split('\n')[0] ?? String(err);
  return String(err);
}

/** A file an image names that the policy (drivers/trust.ts) does not let it open. */
export class UntrustedFileError extends TsmountError {
  override readonly errno = E.EACCES;
}
