// The one median the scripts report.
import { expect } from 'chai';
import { median } from '../scripts/lib/stats.js';

describe('median', function () {
  it('takes the middle value of an odd count and the mean of the two middle values of an even count', function () {
    expect(median([3, 1, 2])).to.equal(2);
    expect(median([4, 1, 3, 2])).to.equal(2.5);
    expect(median([5])).to.equal(5);
    expect(median([])).to.be.NaN;
  });
});
