// Error messages are one line whatever an image puts into them (the fuzzer found a vmdk
// whose createType, missing its closing quote, ran over three lines into the message).
import { expect } from 'chai';
import { parseDescriptor } from '../../drivers/format/vmdk/descriptor.js';
import { CorruptImageError, oneLine, TsmountError } from '../../drivers/errors.js';

describe('error messages are one line (unit)', () => {
  it('control characters from an image are shown escaped, never as line breaks', () => {
    expect(oneLine('a\nb\r\x1b[31mc\td')).to.equal('a\\nb\\x0d\\x1b[31mc d');
    expect(new CorruptImageError('bad name "x\ny"').message).to.equal('bad name "x\\ny"');
  });

  it("the fuzzer's vmdk: a createType without its closing quote, running over the extent lines", () => {
    const desc = '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat\n# Extent description\nRW 8192 FLAT "x.vmdk" 0\n';
    let err: unknown;
    try {
      parseDescriptor(desc, 'mut.vmdk');
    } catch (e) {
      err = e;
    }
    expect(err).to.be.instanceOf(TsmountError);
    expect((err as Error).message).to.not.include('\n');
  });
});
