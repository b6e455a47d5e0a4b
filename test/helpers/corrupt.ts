// Exercising a damaged image in-process (scripts/lib/exercise.ts, which the fuzzer
// shares) and the mutations made to it (scripts/lib/mutate.ts).
export { exercise, exerciseBounded, fileStamp, isClean, withDeadline, DEADLINE_MS, ALLOC_LIMIT } from '../../scripts/lib/exercise.js';
export { rng } from '../../scripts/lib/mutate.js';
