// What `tsmount --help` says after the options: the formats and sources it opens, the
// `-o` values, and an example per common use. Kept as text here (help must not load
// every driver); test/cli-errors.test.ts checks it names every registered format and
// protocol, so a new driver that is not listed fails a test.

export const FORMATS_RW = ['raw', 'qcow2', 'qcow', 'qed', 'vmdk', 'vdi', 'vpc', 'vhdx', 'luks', 'parallels'];
export const FORMATS_RO = ['dmg', 'bochs', 'cloop'];

export const TSMOUNT_HELP_AFTER = `
Formats (-f; probed when absent):
  read-write   ${FORMATS_RW.join(', ')}
  read-only    ${FORMATS_RO.join(', ')}

Sources (IMAGE):
  FILE, /dev/sdX, /dev/sr0      a local file or host block device, CD-ROM, floppy
  nvme://PCI-ADDRESS/NAMESPACE  an NVMe namespace (nvme://0000:01:00.0/1)
  fat:[floppy:][rw:][12:|16:|32:]DIR
                                a virtual FAT disk made from a directory tree
  nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbd:HOST:PORT[:exportname=NAME],
  nbd:unix:PATH, nbds://...     NBD (nbds: over TLS)
  ssh://[USER@]HOST[:PORT]/PATH SSH/SFTP
  iscsi://[USER[%PASS]@]HOST[:PORT]/IQN/LUN
                                iSCSI (--iscsi, --readconfig for CHAP and digests)
  gluster[+tcp|+unix]://HOST[:PORT]/VOLUME/PATH
                                GlusterFS
  sheepdog[+unix]://[HOST[:PORT]]/VDI[#TAG]
                                Sheepdog
  json:{...}, --image-opts K=V,...
                                QEMU's option syntax, for every source

Forms:
  tsmount IMAGE... MOUNTPOINT   each image appears as MOUNTPOINT/<stem>.raw
  tsmount IMAGE FILE            one image, mounted over an existing regular file

Mount options (-o, also for fstab and mount -t fuse.tsmount):
  ro, rw, noatime, noexec, allow_other, allow_root, default_permissions, nonempty,
  max_read=N, max_write=N, max_readahead=N, kernel_cache, direct_io, passthrough,
  nopassthrough, uid=N, gid=N, umask=M, growable (resize), and every option above in
  its -o spelling: cache=, cache-size=, locking=, format=, secret-file=, overlay=,
  log=, readconfig=, prealloc-size=, prealloc-align=, force-share, share-rw,
  partitions, snapshot, layers, confine, trust-image-paths, preallocate, debug

Examples:
  tsmount disk.vmdk /mnt/x                      read-only: /mnt/x/disk.raw
  tsmount --rw disk.qcow2 /mnt/x                read-write; writes reach the image
  tsmount --snapshot disk.qcow2 /mnt/x          writable; the writes go to a temporary overlay
  tsmount --partitions disk.vhdx /mnt/x         also /mnt/x/disk-p1.raw ... (mount -o loop them)
  tsmount --secret-file pass.txt enc.qcow2 /mnt/x
  tsmount disk.qcow2 /srv/backup/disk.raw       over an existing regular file
  tsmount nbd://127.0.0.1/export /mnt/x
  tsmount fat:/srv/tree /mnt/x                  a directory as a FAT disk
  tsmount --list                                what is mounted
  tsmount -u /mnt/x                             unmount, after every write is on disk

See tsmount(1).
`;
