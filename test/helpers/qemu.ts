// The oracle's runners live with the scripts (the benchmarks use them too); tests import them from here.
export * from '../../scripts/lib/qemu.js';
