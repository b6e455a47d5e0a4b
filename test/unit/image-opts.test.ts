import { expect } from 'chai';
import { imageOptsToSpec, jsonToSpec } from '../../drivers/protocol/remote.js';
import { loginSettings, parseIscsiSpec } from '../../drivers/protocol/iscsi/uri.js';
import { UsageError } from '../../drivers/errors.js';
import { parseNbdSpec } from '../../drivers/protocol/nbd/uri.js';
import { parseObjects } from '../../drivers/objects.js';

describe('--image-opts: QEMU dotted options for every protocol', () => {
  it('ssh: the structured host-key-check of current QEMU', () => {
    const base = 'driver=qcow2,file.driver=ssh,file.server.host=h,file.server.port=2222,file.user=u,file.path=/i.qcow2';
    expect(imageOptsToSpec(base).spec).to.equal('ssh://u@h:2222/i.qcow2');
    expect(imageOptsToSpec(`${base},file.host-key-check.mode=none`).spec).to.equal('ssh://u@h:2222/i.qcow2?host_key_check=no');
    expect(imageOptsToSpec(`${base},file.host-key-check.mode=hash,file.host-key-check.type=sha1,file.host-key-check.hash=abcd`).spec).to.equal('ssh://u@h:2222/i.qcow2?host_key_check=sha1:abcd');
    expect(() => imageOptsToSpec(`${base},file.host-key-check.mode=hash`)).to.throw(UsageError, /needs host-key-check.type/);
    expect(() => imageOptsToSpec(`${base},file.host-key-check.mode=maybe`)).to.throw(UsageError, /none, hash or known_hosts/);
  });

  it('every protocol driver, alone and under a format, in dotted and json: forms', () => {
    const cases: [string, string, string][] = [
      ['driver=raw,file.driver=file,file.filename=/x/d.img', '/x/d.img', 'raw'],
      ['driver=file,filename=/x/d.img', '/x/d.img', 'raw'],
      ['driver=host_device,filename=/dev/sdz', '/dev/sdz', 'raw'],
      ['driver=nbd,server.type=inet,server.host=h,server.port=10810,export=e', 'nbd://h:10810/e', 'raw'],
      ['driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=/s', 'nbd+unix:///?socket=/s', 'qcow2'],
      ['driver=gluster,volume=v,path=d.img,server.0.type=tcp,server.0.host=h', 'gluster://h:24007/v/d.img', 'raw'],
      ['driver=vmdk,file.driver=gluster,file.volume=v,file.path=/d.vmdk,file.server.0.type=unix,file.server.0.path=/s', 'gluster+unix:///v/d.vmdk?socket=/s', 'vmdk'],
      ['driver=iscsi,transport=tcp,portal=127.0.0.1:3261,target=iqn.2026-12.test:t,lun=2', 'iscsi://127.0.0.1:3261/iqn.2026-12.test:t/2', 'raw'],
      ['driver=qcow2,file.driver=iscsi,file.portal=h,file.target=iqn.2026-12.test:q,file.user=u,file.header-digest=crc32c', 'iscsi://u@h/iqn.2026-12.test:q/0', 'qcow2'],
    ];
    for (const [opts, spec, format] of cases) {
      const got = imageOptsToSpec(opts);
      expect(got.format, opts).to.equal(format);
      expect(got.spec.startsWith(spec.replace(/\?.*$/, '')), `${opts} -> ${got.spec}`).to.equal(true);
    }
    expect(jsonToSpec('json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"inet","host":"h"},"export":"e"}}').spec).to.match(/^nbd:\/\/h(:10809)?\/e$/);
  });

  it('iscsi: the login options a target is given stay with that target; what cannot be done is refused in one line', () => {
    imageOptsToSpec('driver=iscsi,portal=h,target=iqn.2026-12.test:opts,lun=1,initiator-name=iqn.2026-12.test:me,header-digest=crc32c');
    const login = loginSettings(parseIscsiSpec('iscsi://h/iqn.2026-12.test:opts/1'), {});
    expect(login.initiatorName).to.equal('iqn.2026-12.test:me');
    expect(login.headerDigest).to.equal('CRC32C');
    expect(() => imageOptsToSpec('driver=iscsi,transport=iser,portal=h,target=iqn.x:y')).to.throw(/transport 'iser' is not supported/);
    expect(() => imageOptsToSpec('driver=iscsi,portal=h')).to.throw(/needs portal=HOST\[:PORT\] and target=IQN/);
    expect(() => imageOptsToSpec('driver=iscsi,portal=h,target=iqn.x:y,password-secret=s0')).to.throw(/password-secret/);
  });

  it('iscsi: password-secret takes the CHAP password from a secret object (data=, or base64)', () => {
    const objs = parseObjects(['secret,id=s1,data=wonderland12', `secret,id=s2,format=base64,data=${Buffer.from('looking,glass').toString('base64')}`, 'tls-creds-psk,id=t,dir=/k']);
    imageOptsToSpec('driver=iscsi,portal=h,target=iqn.2026-12.test:sec,lun=1,user=alice,password-secret=s1', objs);
    expect(loginSettings(parseIscsiSpec('iscsi://h/iqn.2026-12.test:sec/1'), {})).to.deep.include({ user: 'alice', password: 'wonderland12' });
    imageOptsToSpec('driver=iscsi,portal=h,target=iqn.2026-12.test:sec64,lun=1,user=bob,password-secret=s2', objs);
    expect(loginSettings(parseIscsiSpec('iscsi://h/iqn.2026-12.test:sec64/1'), {})).to.deep.include({ user: 'bob', password: 'looking,glass' });
    expect(() => imageOptsToSpec('driver=iscsi,portal=h,target=iqn.x:y,password-secret=s1', objs)).to.throw(UsageError, /needs user=/);
    expect(() => imageOptsToSpec('driver=iscsi,portal=h,target=iqn.x:y,user=a,password-secret=t', objs)).to.throw(UsageError, /not a secret object/);
  });

  it('nbd: reconnect-delay and open-timeout travel in the name', () => {
    expect(imageOptsToSpec('driver=nbd,server.host=h,export=e,reconnect-delay=5,open-timeout=3').spec).to.equal('nbd://h:10809/e?reconnect-delay=5&open-timeout=3');
    expect(parseNbdSpec('nbd://h/e?reconnect-delay=5&open-timeout=3')).to.deep.include({ reconnectDelay: 5, openTimeout: 3 });
    expect(() => imageOptsToSpec('driver=nbd,server.host=h,reconnect-delay=-1')).to.throw(UsageError, /whole number of seconds/);
  });

  it("ignores only what changes nothing here (node-name, aio), and refuses the rest in one line", () => {
    expect(imageOptsToSpec('driver=qcow2,node-name=top,file.driver=file,file.filename=/x.qcow2,file.node-name=f,file.aio=native').spec).to.equal('/x.qcow2');
    expect(() => imageOptsToSpec('driver=qcow2,file.driver=file,file.filename=/x.qcow2,file.bogus=1')).to.throw(UsageError, /unsupported option 'file.bogus'/);
  });
});
