// The -o spellings of tsmount's options, as fstab and mount(8) give them.
import { expect } from 'chai';
import { expandMountOptions } from '../../mount-helpers/mount-options.js';

describe('expandMountOptions (unit)', function () {
  it("turns tsmount's -o options into its flags and keeps FUSE options as -o", function () {
    expect(expandMountOptions(['-o', 'rw,cache=none,cache-size=8M,locking=off,share-rw,secret-file=/k,format=qcow2,partitions,overlay=/o.qcow2,allow_other', 'd.qcow2', '/mnt/x'])).to.deep.equal([
      '--cache=none', '--cache-size=8M', '--locking=off', '--share-rw', '--secret-file=/k', '--format=qcow2', '--partitions', '--overlay=/o.qcow2', '-o', 'allow_other', 'd.qcow2', '/mnt/x', '--rw',
    ]);
    expect(expandMountOptions(['-oforce-share,snapshot,layers', '--option=noatime', 'a', 'b'])).to.deep.equal(['--force-share', '--snapshot', '--layers', '-o', 'noatime', 'a', 'b']);
    expect(expandMountOptions(['-o', 'readconfig=/etc/qemu/iscsi.conf', 'iscsi://h/iqn.x:y/1', '/mnt/x'])).to.deep.equal(['--readconfig=/etc/qemu/iscsi.conf', 'iscsi://h/iqn.x:y/1', '/mnt/x']);
  });

  it('drops the options mount(8) gives every helper, and lets the last of rw and ro win', function () {
    expect(expandMountOptions(['-o', 'defaults,dev,nodev,suid,nosuid,auto,noauto,user,users,nouser,nofail,_netdev,x-systemd.automount,comment=x', 'a', 'b'])).to.deep.equal(['a', 'b']);
    expect(expandMountOptions(['--rw', '-o', 'ro', 'a', 'b'])).to.deep.equal(['a', 'b']);
    expect(expandMountOptions(['-o', 'ro', '-o', 'rw', 'a', 'b'])).to.deep.equal(['a', 'b', '--rw']);
    // After --, nothing is an option.
    expect(expandMountOptions(['--', '-o', 'rw'])).to.deep.equal(['--', '-o', 'rw']);
  });
});
