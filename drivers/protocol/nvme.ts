// NVMe disks by PCI address (qemu-block-drivers(7), "NVMe disk images"):
// `nvme://DOMAIN:BUS:SLOT.FUNC/NAMESPACE` and --image-opts driver=nvme,device=,namespace=.
// QEMU drives such a controller itself through vfio-pci; tsmount has no userspace NVMe
// driver, so it opens a controller the kernel's nvme driver owns through the namespace's
// block device, found in sysfs, and refuses one bound to vfio-pci (README, "NVMe").
import fs from 'node:fs';
import path from 'node:path';
import type { ProtocolDriver } from '../types.js';
import { UnsupportedError, UsageError } from '../errors.js';
import { FileNode, fileOpenOptions } from './file.js';

export interface NvmeTarget {
  /** The PCI address, DOMAIN:BUS:SLOT.FUNC, lower case. */
  device: string;
  namespace: number;
}

const PCI_ADDRESS = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$/i;

export function isNvmeSpec(spec: string): boolean {
  return /^nvme:/i.test(spec);
}

/** Parse `nvme://0000:01:00.0/1`; one clear line for anything else. */
export function parseNvmeUri(spec: string): NvmeTarget {
  const m = /^nvme:\/\/([^/]*)\/(.*)$/i.exec(spec);
  if (!m) throw new UsageError(`${spec}: expected nvme://DOMAIN:BUS:SLOT.FUNC/NAMESPACE (e.g. nvme://0000:01:00.0/1)`);
  return nvmeTarget(m[1]!, m[2]!, spec);
}

export function nvmeTarget(device: string, namespace: string, what: string): NvmeTarget {
  if (!PCI_ADDRESS.test(device)) throw new UsageError(`${what}: '${device}' is not a PCI address (DOMAIN:BUS:SLOT.FUNC, e.g. 0000:01:00.0)`);
  if (!/^\d{1,10}$/.test(namespace) || Number(namespace) < 1 || Number(namespace) > 0xfffffffe) throw new UsageError(`${what}: '${namespace}' is not an NVMe namespace number (1 and up)`);
  return { device: device.toLowerCase(), namespace: Number(namespace) };
}

export function formatNvmeUri(t: NvmeTarget): string {
  return `nvme://${t.device}/${t.namespace}`;
}

/**
 * The block device of a namespace, from sysfs (`sysfsRoot` is /sys but for tests):
 * /sys/bus/pci/devices/ADDR/driver names the driver; under nvme, the controller
 * ADDR/nvme/nvmeX lists its namespaces as nvmeXnN (nsid in their `nsid` file), whose
 * block device is /dev/nvmeXnN. Throws one line naming what was asked for.
 */
export function resolveNvme(t: NvmeTarget, sysfsRoot = '/sys', devRoot = '/dev'): string {
  const what = formatNvmeUri(t);
  const dev = path.join(sysfsRoot, 'bus/pci/devices', t.device);
  if (!fs.existsSync(dev)) throw new UsageError(`${what}: no PCI device ${t.device}`);
  let driver: string;
  try {
    driver = path.basename(fs.readlinkSync(path.join(dev, 'driver')));
  } catch {
    throw new UsageError(`${what}: PCI device ${t.device} is bound to no driver (bind it to the kernel's nvme driver)`);
  }
  if (driver === 'vfio-pci') {
    throw new UnsupportedError(
      `${what}: ${t.device} is bound to vfio-pci, which needs a userspace NVMe driver that tsmount does not have; bind it to the kernel's nvme driver instead`,
    );
  }
  if (driver !== 'nvme') throw new UsageError(`${what}: PCI device ${t.device} is bound to '${driver}', not to nvme`);
  const controllers = listDir(path.join(dev, 'nvme')).filter((c) => /^nvme\d+$/.test(c));
  if (controllers.length === 0) throw new UsageError(`${what}: ${t.device} has no NVMe controller in sysfs (still probing?)`);
  const found: number[] = [];
  for (const c of controllers) {
    for (const ns of listDir(path.join(dev, 'nvme', c))) {
      const m = /^nvme\d+n(\d+)$/.exec(ns);
      if (!m) continue;
      const nsid = readNumber(path.join(dev, 'nvme', c, ns, 'nsid')) ?? Number(m[1]);
      found.push(nsid);
      if (nsid === t.namespace) return path.join(devRoot, ns);
    }
  }
  const list = found.length ? `it has ${found.sort((a, b) => a - b).join(', ')}` : 'it has none the kernel shows (a multipath namespace is opened by its /dev/nvmeXnN name)';
  throw new UsageError(`${what}: namespace ${t.namespace} not found on ${t.device} (${list})`);
}

function listDir(p: string): string[] {
  try {
    return fs.readdirSync(p);
  } catch {
    return [];
  }
}

function readNumber(p: string): number | undefined {
  try {
    const n = Number(fs.readFileSync(p, 'utf8').trim());
    return Number.isInteger(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

/** The nvme protocol over a sysfs tree (the real /sys, or a test's). */
export function makeNvmeProtocol(sysfsRoot = '/sys', devRoot = '/dev'): ProtocolDriver {
  return {
    name: 'nvme',
    claims: isNvmeSpec,
    open: async (spec, opts) => {
      const device = resolveNvme(parseNvmeUri(spec), sysfsRoot, devRoot);
      return FileNode.open(device, fileOpenOptions(opts));
    },
    resolveRelative: (_base, name) => name,
    stem: (spec) => {
      try {
        const t = parseNvmeUri(spec);
        return `nvme-${t.device.replace(/[:.]/g, '-')}-n${t.namespace}`;
      } catch {
        return 'nvme';
      }
    },
  };
}

export const nvmeProtocol = makeNvmeProtocol();
