// The name of a virtual FAT disk: QEMU's `fat:[floppy:][rw:][12:|16:|32:]DIR`
// (qemu-block-drivers(7), "Virtual FAT disk images"; block/vvfat.c
// vvfat_parse_filename) and its --image-opts form (driver=vvfat,dir=...,fat-type=...,
// floppy=on,rw=on,label=...). The directory is what follows the last colon, so it
// cannot contain one; the options before it come in any order.
import { UsageError } from '../../errors.js';

export type FatType = 12 | 16 | 32;

export interface VvfatSpec {
  dir: string;
  /** Undefined: QEMU's default (16 on a hard disk, 12 on a floppy). */
  fatType: FatType | undefined;
  floppy: boolean;
  /** `rw:`: writes through the disk go back to the directory (with --rw). */
  rw: boolean;
  /** The volume label (at most 11 bytes); QEMU's is `QEMU VVFAT`. */
  label: string | undefined;
}

export const isVvfatSpec = (spec: string): boolean => spec.startsWith('fat:');

/** QEMU's label limit: 11 bytes of the boot sector and the root directory's label entry. */
export const LABEL_BYTES = 11;

export function parseVvfatSpec(spec: string): VvfatSpec {
  if (!isVvfatSpec(spec)) throw new UsageError(`${spec}: a virtual FAT disk is named fat:[floppy:][rw:][12:|16:|32:]DIR`);
  const last = spec.lastIndexOf(':');
  const dir = spec.slice(last + 1);
  const out: VvfatSpec = { dir, fatType: undefined, floppy: false, rw: false, label: undefined };
  for (const opt of spec.slice(4, last).split(':')) {
    if (opt === '') continue;
    if (opt === 'floppy') out.floppy = true;
    else if (opt === 'rw') out.rw = true;
    else if (opt === '12' || opt === '16' || opt === '32') out.fatType = Number(opt) as FatType;
    // tsmount's own spelling of --image-opts' label, so the whole disk fits in one name.
    else if (opt.startsWith('label=')) out.label = checkLabel(spec, opt.slice(6));
    else throw new UsageError(`${spec}: unknown virtual FAT option '${opt}' (floppy, rw, 12, 16, 32)`);
  }
  if (!dir) throw new UsageError(`${spec}: no directory after 'fat:'`);
  if (out.floppy && out.fatType === 32) throw new UsageError(`${spec}: a floppy is FAT12 or FAT16, not FAT32`);
  return out;
}

function checkLabel(spec: string, label: string): string {
  if (Buffer.byteLength(label) > LABEL_BYTES) throw new UsageError(`${spec}: the volume label '${label}' is longer than ${LABEL_BYTES} bytes`);
  return label;
}

/** The spec for an --image-opts list of driver=vvfat (what tsmount and QEMU's runtime options take). */
export function vvfatSpecFromOptions(o: Map<string, string>): string {
  const take = (k: string): string | undefined => {
    const v = o.get(k);
    o.delete(k);
    return v;
  };
  const dir = take('dir');
  if (!dir) throw new UsageError(`--image-opts: driver=vvfat needs dir=DIRECTORY`);
  if (dir.includes(':')) throw new UsageError(`--image-opts: the vvfat directory '${dir}' contains ':', which a fat: name cannot carry`);
  const parts: string[] = [];
  const type = take('fat-type');
  if (type !== undefined && type !== '0') {
    if (type !== '12' && type !== '16' && type !== '32') throw new UsageError(`--image-opts: fat-type must be 12, 16 or 32, not '${type}'`);
    parts.push(type);
  }
  if (onOff(take('floppy'), 'floppy')) parts.push('floppy');
  if (onOff(take('rw'), 'rw')) parts.push('rw');
  const label = take('label');
  if (label !== undefined) {
    if (label.includes(':')) throw new UsageError(`--image-opts: the vvfat label '${label}' contains ':'`);
    parts.push(`label=${label}`);
  }
  if (o.size) throw new UsageError(`--image-opts: unsupported vvfat option '${[...o.keys()][0]}'`);
  return `fat:${parts.map((p) => `${p}:`).join('')}${dir}`;
}

function onOff(v: string | undefined, key: string): boolean {
  if (v === undefined || v === 'off' || v === 'false') return false;
  if (v === 'on' || v === 'true') return true;
  throw new UsageError(`--image-opts: ${key} must be on or off, not '${v}'`);
}
