"""The one percentile-interval rule every CI in scaling/ uses (scaling/intervals.py)."""

import numpy as np
import pytest

from scaling.intervals import percentile_interval, tail_quantiles


def test_equal_tailed_interval_of_known_draws():
    assert tail_quantiles(0.9) == pytest.approx((0.05, 0.95))
    lo, hi = percentile_interval(np.arange(101.0), 0.9)  # the q-quantile of 0..100 is 100 q
    assert (lo, hi) == pytest.approx((5.0, 95.0), abs=1e-12)
    draws_BxK = np.stack([np.arange(101.0), -np.arange(101.0)], axis=1)
    lo, hi = percentile_interval(draws_BxK, 0.5)  # per column, over the draw axis
    np.testing.assert_allclose(lo, [25.0, -75.0])
    np.testing.assert_allclose(hi, [75.0, -25.0])
    with_nan = np.append(np.arange(101.0), np.nan)
    assert np.isnan(percentile_interval(with_nan, 0.9)[0])
    assert percentile_interval(with_nan, 0.9, skip_nan=True) == pytest.approx((5.0, 95.0), abs=1e-12)


@pytest.mark.parametrize("level", [0.0, 1.0, 95, -0.1])
def test_a_level_outside_the_unit_interval_is_refused_by_name(level):
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        percentile_interval(np.arange(10.0), level)
