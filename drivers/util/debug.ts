// The `debug` package, behind its own createDebug, loaded only once debug output is on
// (DEBUG set, or createDebug.enable() from --debug): loading it costs some 25 ms, which
// every command paid at start-up for output that is off. A debugger made before then
// calls through to the real one from the moment output is on, so enabling later (a
// server's --debug) still reaches every namespace.
import { createRequire } from 'node:module';

type Real = typeof import('debug')['default'];
type RealDebugger = ReturnType<Real>;

export interface Debugger {
  (formatter: unknown, ...args: unknown[]): void;
  readonly enabled: boolean;
}

let real: Real | undefined;
let active = Boolean(process.env.DEBUG);
let log: ((...args: unknown[]) => void) | undefined;

function load(): Real {
  if (!real) {
    real = createRequire(import.meta.url)('debug') as Real;
    if (log) real.log = log;
  }
  return real;
}

function createDebug(namespace: string): Debugger {
  let d: RealDebugger | undefined;
  const get = (): RealDebugger => (d ??= load()(namespace));
  const f = (formatter: unknown, ...args: unknown[]): void => {
    if (active) get()(formatter, ...args);
  };
  Object.defineProperty(f, 'enabled', { get: () => active && get().enabled });
  return f as Debugger;
}

/** debug's enable(): turns output on for these namespaces (and loads the package). */
createDebug.enable = (namespaces: string): void => {
  active = true;
  load().enable(namespaces);
};

/** debug's log: where every line goes (fs/log.ts sends them past the syslog tee). */
Object.defineProperty(createDebug, 'log', {
  get: () => log,
  set: (fn: (...args: unknown[]) => void) => {
    log = fn;
    if (real) real.log = fn;
  },
});

export default createDebug as typeof createDebug & { log: (...args: unknown[]) => void };
