"""Tests of the coordinate-wise trimmed mean against SciPy."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import trim_mean

from hf_jd.aggregation import TrimmedMean, is_gramian_based


@pytest.mark.parametrize(("m", "t"), [(1, 0), (5, 1), (9, 3), (10, 2)])
def test_matches_scipy(m: int, t: int) -> None:
    jac = torch.randn(m, 7, dtype=torch.float64)
    expected = torch.from_numpy(trim_mean(jac.numpy(), t / m, axis=0))
    torch.testing.assert_close(TrimmedMean(t)(jac), expected)


def test_robust_to_outliers_and_dtype() -> None:
    jac = torch.ones(5, 3)
    jac[0] = 1e6
    jac[4] = -1e6
    out = TrimmedMean(1)(jac)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(3))
    assert not is_gramian_based("trimmed_mean")


def test_errors() -> None:
    with pytest.raises(ValueError, match="more than 2\\*trim_number = 4 rows, got m=4"):
        TrimmedMean(2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="trim_number"):
        TrimmedMean(-1)
    with pytest.raises(TypeError, match="trim_number"):
        TrimmedMean(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        TrimmedMean(0)(torch.randn(3))


def test_repr() -> None:
    assert repr(TrimmedMean(2)) == "TrimmedMean(trim_number=2)"
