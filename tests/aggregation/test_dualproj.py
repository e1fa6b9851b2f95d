"""Tests of DualProj and DualProjWeighting against a primal projection."""

from __future__ import annotations

import pytest
import torch

from hf_jd.aggregation import DualProj, DualProjWeighting

from _aggregation_references import project_onto_dual_cone_primal

DT = torch.float64


@pytest.mark.parametrize(("m", "n"), [(1, 3), (2, 5), (6, 10), (15, 40)])
def test_matches_primal_projection_of_mean(m: int, n: int) -> None:
    jac = torch.randn(m, n, dtype=DT)
    expected = project_onto_dual_cone_primal(jac, jac.mean(dim=0))
    torch.testing.assert_close(DualProj(reg_eps=0.0)(jac), expected, rtol=1e-8, atol=1e-10)


def test_preference_vector() -> None:
    jac = torch.randn(3, 7, dtype=DT)
    pref = torch.tensor([1.0, 0.0, 3.0], dtype=DT)
    expected = project_onto_dual_cone_primal(jac, pref @ jac)
    torch.testing.assert_close(DualProj(pref_vector=pref, reg_eps=0.0)(jac), expected, rtol=1e-8, atol=1e-10)


def test_non_conflicting() -> None:
    g = torch.Generator().manual_seed(1)
    for m in (3, 10, 64):
        jac = torch.randn(m, 100, generator=g, dtype=DT)
        weights = DualProj().weights(jac)
        trace = (jac * jac).sum()
        # With the relative regularisation: (G w)ᵢ ≥ −m·reg_eps·Gᵢᵢ·wᵢ (exactly 0 without it).
        assert bool((jac @ (weights @ jac) >= -1e-4 * m * (jac * jac).sum(dim=1) * weights - 1e-9 * trace).all())
        exact = DualProj(reg_eps=0.0)(jac) if m <= 100 else None
        if exact is not None:
            assert float((jac @ exact).min()) >= -1e-9 * float(jac.norm() * exact.norm())


def test_equals_mean_without_conflict() -> None:
    jac = torch.rand(5, 8, dtype=DT)
    torch.testing.assert_close(DualProj()(jac), jac.mean(dim=0))


def test_aggregator_equals_weighting_of_gramian() -> None:
    jac = torch.randn(12, 30, dtype=DT)
    torch.testing.assert_close(DualProj()(jac), DualProjWeighting()(jac @ jac.T) @ jac)


def test_permutation_invariant() -> None:
    jac = torch.randn(9, 15, dtype=DT)
    perm = torch.randperm(9)
    torch.testing.assert_close(DualProj()(jac[perm]), DualProj()(jac), rtol=1e-9, atol=1e-11)


def test_errors() -> None:
    with pytest.raises(ValueError, match="pref_vector"):
        DualProj(pref_vector=[-1.0])
    with pytest.raises(ValueError, match="2 entries but the Jacobian has 3 rows"):
        DualProj(pref_vector=[1.0, 1.0])(torch.randn(3, 4))
    with pytest.raises(ValueError, match="norm_eps"):
        DualProjWeighting(norm_eps=float("nan"))


def test_repr_and_dtype() -> None:
    assert repr(DualProj()) == "DualProj(pref_vector=None, norm_eps=0.0, reg_eps=0.0001)"
    assert DualProj()(torch.randn(3, 4)).dtype == torch.float32
