"""Tests of Krum / Multi-Krum against explicit pairwise distances."""

from __future__ import annotations

import pytest
import torch

from hf_jd.aggregation import Krum, KrumWeighting

DT = torch.float64


def krum_reference(jac: torch.Tensor, f: int, k: int) -> torch.Tensor:
    m = jac.shape[0]
    scores = []
    for i in range(m):
        distances = sorted(float((jac[i] - jac[j]).square().sum()) for j in range(m) if j != i)
        scores.append(sum(distances[: m - f - 2]))
    order = sorted(range(m), key=lambda i: (scores[i], i))[:k]
    return jac[order].mean(dim=0)


@pytest.mark.parametrize(("m", "f", "k"), [(5, 1, 1), (7, 2, 1), (10, 3, 4), (10, 0, 10)])
def test_matches_explicit_distances(m: int, f: int, k: int) -> None:
    jac = torch.randn(m, 8, dtype=DT)
    torch.testing.assert_close(Krum(f, k)(jac), krum_reference(jac, f, k))


def test_rejects_byzantine_outliers() -> None:
    honest = torch.randn(7, 5, dtype=DT) * 0.1 + 1.0
    byzantine = torch.full((2, 5), 100.0, dtype=DT)
    jac = torch.cat([honest, byzantine])
    weights = Krum(n_byzantine=2, n_selected=3).weights(jac)
    assert float(weights[7:].abs().sum()) == 0.0
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=DT))


def test_aggregator_equals_weighting_of_gramian() -> None:
    jac = torch.randn(8, 6)
    torch.testing.assert_close(Krum(2, 2)(jac), KrumWeighting(2, 2)(jac @ jac.T) @ jac)


def test_errors() -> None:
    with pytest.raises(ValueError, match="more than 2\\*n_byzantine\\+2 = 4 rows, got m=4"):
        Krum(1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="n_selected=6 rows out of m=5"):
        Krum(0, 6)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="n_byzantine"):
        Krum(-1)
    with pytest.raises(ValueError, match="n_selected"):
        Krum(1, 0)
    with pytest.raises(TypeError, match="n_byzantine"):
        Krum(1.0)  # type: ignore[arg-type]


def test_repr() -> None:
    assert repr(Krum(1, 2)) == "Krum(n_byzantine=1, n_selected=2)"
