// Starting the detached server process. Mount time is two Node start-ups (the
// command, then the server), so the command starts the server first, before it loads
// or parses anything (tsmount.ts), and the two load their modules side by side on the
// two cores. The server does nothing until the command, having checked the command
// line, sends it what to mount on the ready channel (serve.ts); a command that turns
// out not to start a server (an error, --help, -u, --foreground) kills it unused.
//
// Only node: modules here: this file loads before anything else in the command.
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** The ready channel's descriptor in the server. */
export const READY_FD = 3;

/** The server's entry (CommonJS: tsmount-server.cts says why). */
export const SERVER_ENTRY = fileURLToPath(new URL('./tsmount-server.cjs', import.meta.url));

/**
 * Whether the command line (after -o expansion) can start a detached server, so that
 * starting one before parsing is likely not wasted. Only a guess, to save the work:
 * the command decides after parsing, and kills a server it does not use. A --log file
 * is opened by the command and becomes the server's stderr, so with --log the server
 * is started after parsing.
 */
export function mayStartServer(args: readonly string[]): boolean {
  const never = new Set(['-u', '--unmount', '--foreground', '--list', '-h', '--help', '-V', '--version']);
  for (const a of args) {
    if (a === '--') break;
    if (never.has(a) || a.startsWith('--log')) return false;
    // Short flags run together (-uV): leave those to the parser.
    if (/^-[A-Za-z]{2,}$/.test(a)) return false;
  }
  return args.filter((a) => !a.startsWith('-')).length >= 2;
}

/**
 * Start a server in its own session, waiting on the ready channel. `shown` goes on its
 * command line for ps and pgrep (images and mountpoint), without passphrases.
 * `logFd` (--log) becomes its stdout and stderr; otherwise stderr is a pipe to us
 * until the mount is ready, so a crash at startup still explains itself.
 */
export function startServer(shown: readonly string[], logFd?: number): ChildProcess {
  const args = [...process.execArgv, SERVER_ENTRY, String(process.pid), '--', ...withoutSecrets(shown)];
  return spawn(process.execPath, args, { detached: true, stdio: ['ignore', logFd ?? 'ignore', logFd ?? 'pipe', 'pipe'] });
}

function withoutSecrets(args: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--secret') {
      i++;
      continue;
    }
    if (!a.startsWith('--secret=')) out.push(a);
  }
  return out;
}
