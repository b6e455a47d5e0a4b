// Typed errors (shared/STYLE.md): one class per kind, each with the errno that fs/
// reports to FUSE and a message a person can act on. Only fs/ turns them into errno.
import { constants } from 'node:os';

const E = constants.errno;

/**
 * The base of every error the project throws. The errno is fixed when the error is
 * made: each kind has its own (`defaultErrno`), and a caller that knows better (a
 * system call's errno, a wrapped cause's) passes it.
 */
export class TsmountError extends Error {
  static readonly defaultErrno: number = E.EIO;
  readonly errno: number;
  constructor(message: string, errno?: number, options?: ErrorOptions) {
    // One line, whatever an image or a server put into the message (a name, a createType):
    // control characters are shown escaped, never as line breaks.
    super(oneLine(message), options);
    this.name = new.target.name;
    this.errno = errno ?? (new.target as typeof TsmountError).defaultErrno;
  }

  /** The same kind of error with a message that says more (which image, which file); this one is its cause. */
  withMessage(message: string): TsmountError {
    const Kind = this.constructor as new (message: string, errno?: number, options?: ErrorOptions) => TsmountError;
    return new Kind(message, this.errno, { cause: this });
  }
}

/** `text` with control characters escaped (\n, \x1b...): what a one-line message may quote. */
export function oneLine(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\x00-\x1f\x7f]/g, (c) => (c === '\n' ? '\\n' : c === '\t' ? ' ' : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`));
}

/** The image's metadata is inconsistent or points where it must not. */
export class CorruptImageError extends TsmountError {}

/** A backing chain that loops or is deeper than any real one. */
export class BackingChainError extends CorruptImageError {}

/** A feature the image uses that tsmount does not implement (yet). */
export class UnsupportedError extends TsmountError {
  static override readonly defaultErrno: number = E.ENOTSUP;
}

/** Another process holds a lock that conflicts with ours. */
export class LockedError extends TsmountError {
  static override readonly defaultErrno: number = E.EAGAIN;
}

export class BadPassphraseError extends TsmountError {
  static override readonly defaultErrno: number = E.EPERM;
}

/** A write to a read-only node. */
export class ReadOnlyError extends TsmountError {
  static override readonly defaultErrno: number = E.EROFS;
}

/** Bad user input: an option, a path, a format name. */
export class UsageError extends TsmountError {
  static override readonly defaultErrno: number = E.EINVAL;
}

/** The file system under the image could not do what was asked (ENOSPC, EIO...). */
export class IoError extends TsmountError {}

/** A system call failed; errno is the C errno, so callers can tell EAGAIN from EINVAL. */
export class SysError extends TsmountError {
  constructor(readonly call: string, errno: number) {
    super(`${call} failed: errno ${errno}`, errno);
  }
}

/**
 * An operation the caller may not do here, with the errno it comes to (ENOENT for a
 * name that is not in the mount, ENOTDIR, EPERM, EINVAL for a bad mount option...).
 */
export class ErrnoError extends TsmountError {
  constructor(message: string, errno: number) {
    super(message, errno);
  }
}

/** A remote server broke its protocol: the connection's state is unknown from here on. */
export class ProtocolError extends TsmountError {}

/** A remote server refused what we asked (no such export, TLS required...): a person's error. */
export class RefusedError extends TsmountError {
  static override readonly defaultErrno: number = E.ECONNREFUSED;
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
