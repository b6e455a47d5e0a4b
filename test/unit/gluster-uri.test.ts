import { expect } from 'chai';
import { formatGlusterUri, glusterStem, parseGlusterSpec, resolveGlusterRelative } from '../../drivers/protocol/gluster/uri.js';
import { imageOptsToSpec, jsonToSpec } from '../../drivers/protocol/remote.js';
import { UsageError } from '../../drivers/errors.js';

describe('gluster image names', () => {
  it('parses every URI form of qemu-block-drivers(7)', () => {
    expect(parseGlusterSpec('gluster://1.2.3.4/testvol/a.img')).to.deep.include({ servers: [{ type: 'tcp', host: '1.2.3.4', port: 24007 }], volume: 'testvol', path: '/a.img' });
    expect(parseGlusterSpec('gluster+tcp://1.2.3.4:24007/testvol/dir/a.img').path).to.equal('/dir/a.img');
    expect(parseGlusterSpec('gluster+tcp://[1:2:3:4:5:6:7:8]:24007/testvol/dir/a.img').servers[0]).to.deep.equal({ type: 'tcp', host: '1:2:3:4:5:6:7:8', port: 24007 });
    expect(parseGlusterSpec('gluster+tcp://server.example.com/testvol/dir/a.img').servers[0]).to.deep.include({ host: 'server.example.com' });
    expect(parseGlusterSpec('gluster+unix:///testvol/dir/a.img?socket=/tmp/glusterd.socket').servers[0]).to.deep.equal({ type: 'unix', socket: '/tmp/glusterd.socket' });
    expect(parseGlusterSpec('gluster+rdma://1.2.3.4:24007/testvol/a.img')).to.deep.include({ rdma: true });
    expect(parseGlusterSpec('gluster:///testvol/a.img').servers[0]).to.deep.include({ host: 'localhost' });
  });

  it('refuses what QEMU refuses, in one line', () => {
    for (const bad of ['gluster://h/vol', 'gluster://h/', 'gluster+unix:///v/a', 'gluster+unix://h/v/a?socket=/s', 'gluster://h/v/a?socket=/s', 'gluster://h:0/v/a', 'gluster://h/v/a?foo=1']) {
      expect(() => parseGlusterSpec(bad), bad).to.throw(UsageError).with.property('message').that.does.not.include('\n');
    }
  });

  it('formats a canonical URI that parses back to the same target, options and all', () => {
    for (const spec of ['gluster://h:24007/v/d/a.img', 'gluster+unix:///v/a.img?socket=/run/g.sock', 'gluster://h:1/v/a%20b.img?server=unix:/s&server=tcp:[::1]:24008&debug=9&logfile=/tmp/l']) {
      const t = parseGlusterSpec(spec);
      expect(parseGlusterSpec(formatGlusterUri(t))).to.deep.equal(t);
    }
  });

  it('resolves a backing file on the same volume with the same servers', () => {
    expect(resolveGlusterRelative('gluster://h:24007/v/d/top.qcow2?debug=2', 'base.qcow2')).to.equal('gluster://h:24007/v/d/base.qcow2?debug=2');
    expect(resolveGlusterRelative('gluster://h:24007/v/d/top.qcow2', '/x/base.qcow2')).to.equal('gluster://h:24007/v/x/base.qcow2');
    expect(glusterStem('gluster://h/v/d/top.qcow2')).to.equal('top');
  });

  it('takes the json: and --image-opts forms with a server list', () => {
    const j = jsonToSpec('json:{"driver":"qcow2","file":{"driver":"gluster","volume":"v","path":"/d/a.qcow2","server":[{"type":"tcp","host":"h","port":"24008"},{"type":"unix","path":"/s"}],"debug":"12","logfile":"/tmp/gl.log"}}');
    expect(j.format).to.equal('qcow2');
    expect(parseGlusterSpec(j.spec)).to.deep.equal({ servers: [{ type: 'tcp', host: 'h', port: 24008 }, { type: 'unix', socket: '/s' }], volume: 'v', path: '/d/a.qcow2', debug: 9, logfile: '/tmp/gl.log' });
    const o = imageOptsToSpec('driver=gluster,volume=v,path=a.img,server.0.type=inet,server.0.host=h,server.1.type=unix,server.1.socket=/s');
    expect(o).to.deep.equal({ spec: 'gluster://h:24007/v/a.img?server=unix:/s', format: 'raw' });
    expect(() => imageOptsToSpec('driver=gluster,volume=v,path=a.img')).to.throw(UsageError, /at least one server/);
    expect(() => imageOptsToSpec('driver=gluster,volume=v,path=a.img,server.0.host=h,server.0.bogus=1')).to.throw(UsageError, /unsupported option/);
  });
});
