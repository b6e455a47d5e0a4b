// `node --import .../load-trace-register.js`: puts load-trace.ts's hook in place.
import { register } from 'node:module';

register('./load-trace.js', import.meta.url);
