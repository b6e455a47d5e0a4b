#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for tsmount: system packages, npm packages, build,
# and `tsmount`/`tsimg` on PATH. Run as root (or with sudo). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the tool and its tests use. The oracle is QEMU itself (qemu-utils:
# qemu-img, qemu-io, qemu-nbd; qemu-system-common: qemu-storage-daemon).
PACKAGES=(
  libfuse2 fuse3                    # FUSE: fuse-native links libfuse2; fusermount
  qemu-utils qemu-system-common     # qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon
  fdisk util-linux                  # fdisk -l, losetup in the tests
  dosfstools mtools                 # virtual FAT tests: fsck.fat, mcopy/mdir/mmd/mdel/mren
  gdisk e2fsprogs                   # sgdisk, mkfs.ext4, e2fsck, debugfs: --partitions tests
  fio xmount                        # benchmarks (npm run bench)
  gcc libc6-dev libfuse3-dev pkg-config  # the benchmark's FUSE ceiling server (scripts/bench/ceiling.c)
  nbdkit                            # NBD tests (memory, file plugins)
  openssl                           # NBD over TLS tests: the CAs and certificates they make
  openssh-server openssh-client     # SSH/SFTP tests: sshd, ssh-agent, ssh-keygen
  bximage                           # bochs, VMware4 vmdk and VHD images made by bochs' tool
  cloop-utils                       # cloop images made by create_compressed_fs
  lz4                               # LZ4 blocks for the cloop V4 tests
  liblzo2-2 lzop xz-utils           # cloop V4 LZO1X and xz blocks: the decoders (liblzo2, liblzma) and the tests' compressors
  libzstd1                          # zstd-compressed qcow2 clusters decoded by libzstd (native-codecs.ts; fzstd is the fallback)
  libdeflate0                       # compressed qcow2 clusters and vmdk grains inflated by the FUSE workers (libdeflate.ts; zlib is the fallback)
  cryptsetup-bin                    # LUKS1/LUKS2 headers made by cryptsetup
  btrfs-progs xfsprogs e2fsprogs    # create -o nocow / extent_size_hint checked on loop-mounted btrfs and xfs (mkfs, lsattr, xfs_io)
  time                              # /usr/bin/time: CPU and peak memory of a hostile open
  socat                             # a syslog socket of the tests' own (mount-life test)
  strace                            # delay injection: the server's writes slowed so kills land inside the bitmap store (crash-bitmap-store test)
  tgt                               # iSCSI tests: tgtd and tgtadm serve LUNs on loopback
  dmg2img bzip2                     # dmg tests: an independent UDIF decoder; bzip2 chunks for the generator
  glusterfs-server libgfapi0        # GlusterFS: glusterd + bricks for the tests; libgfapi is what the gluster node calls
  qemu-block-extra                  # qemu-img's own gluster driver, the gluster tests' second oracle
  man-db                            # `man tsmount`, `man tsimg` (pages installed below)
  ca-certificates
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
# /dev/fuse must exist; on most machines the module is built in or already loaded.
[ -e /dev/fuse ] || modprobe fuse || true

npm ci --no-audit --no-fund
npm run build
npm link --no-audit --no-fund >/dev/null
# mount(8) looks for mount.fuse.tsmount in /sbin only (and mount.fuse3 runs `tsmount` from
# /sbin:/usr/sbin:/bin:/usr/bin): fstab lines and `mount -t fuse.tsmount` need these links.
bindir="$(npm prefix -g)/bin"
ln -sf "$bindir/mount.fuse.tsmount" /sbin/mount.fuse.tsmount
ln -sf "$bindir/tsmount" /usr/sbin/tsmount
# The man pages: `man tsmount`, `man tsimg`.
mandir=/usr/local/share/man/man1
mkdir -p "$mandir"
install -m 0644 mount-helpers/man/tsmount.1 mount-helpers/man/tsimg.1 "$mandir/"
mandb -q >/dev/null 2>&1 || true
echo "setup.sh: done; try: tsmount --help"
