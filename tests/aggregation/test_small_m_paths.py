"""Tests of the NumPy paths of UPGrad and MGDA at small m (hf_jd.aggregation._dual_cone,
_lcp_small, mgda) against independent references: per-row brute force, quadprog and SciPy NNLS for
the dual-cone projections, a quadprog simplex QP and the KKT conditions for MGDA.

The Gramians mimic per-example gradients (a dominant common direction, every row in conflict with
some other), plus random, rank-deficient, ill-conditioned and badly scaled ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch
from _aggregation_references import brute_force, quadprog_reference, scipy_nnls

from hf_jd.aggregation import MGDAWeighting, UPGradWeighting

DT = torch.float64
CASES = ["conflicting", "common", "mixed", "rank_deficient", "ill_conditioned", "scaled"]


def jacobian(case: str, m: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = 40
    noise = torch.randn(m, n, generator=generator, dtype=DT)
    common = torch.randn(1, n, generator=generator, dtype=DT)
    if case == "conflicting":
        return noise
    if case == "common":  # no conflict at all: UPGrad is the mean
        return 3 * common + noise
    if case == "mixed":  # some rows conflict with another, some with none
        return 0.6 * common + noise
    if case == "rank_deficient":
        return noise[:, : max(1, m // 2)]
    if case == "ill_conditioned":  # nearly parallel rows, as per-example gradients of a small model
        return common + 1e-3 * noise
    return noise * torch.logspace(-3, 3, m, dtype=DT).unsqueeze(1)  # norms over six orders


def upgrad_matrix(gramian: np.ndarray, reg_eps: float = 1e-4) -> np.ndarray:
    """The documented problem matrix of UPGradWeighting: symmetrised, divided by the trace, each
    diagonal entry times 1 + m·reg_eps (positive definite here: every row is non-zero)."""
    m = gramian.shape[0]
    matrix = (gramian + gramian.T) / (2 * np.trace(gramian))
    matrix[np.diag_indices(m)] *= 1 + m * reg_eps
    return matrix


def upgrad_reference(matrix: np.ndarray, pref: np.ndarray) -> np.ndarray:
    """Σᵢ argmin_{v ≥ pᵢ eᵢ} vᵀ M v, by brute force (m ≤ 7) or quadprog and NNLS (agreeing).

    Solved for ``y = D v`` with ``D = diag(sqrt(Mᵢᵢ))`` (``y ≥ D u``, ``yᵀ (D⁻¹ M D⁻¹) y``): the
    references' absolute tolerances then suit rows of any norm.
    """
    m = matrix.shape[0]
    d = np.sqrt(np.diag(matrix))
    unit = matrix / np.outer(d, d)
    total = np.zeros(m)
    for i in np.flatnonzero(pref > 0):
        target = np.zeros(m)
        target[i] = pref[i] * d[i]
        if m <= 7:
            solution = brute_force(unit, target)
        else:
            solution = quadprog_reference(unit, target)
            np.testing.assert_allclose(scipy_nnls(unit, target), solution, rtol=1e-6, atol=1e-9 * target[i])
        total += solution / d
    return total


@pytest.mark.parametrize("m", [2, 3, 5, 7, 16, 32])
@pytest.mark.parametrize("case", CASES)
def test_upgrad_matches_per_row_references(m: int, case: str) -> None:
    jac = jacobian(case, m, seed=m)
    gramian = jac @ jac.T
    weights = UPGradWeighting()(gramian)
    expected = upgrad_reference(upgrad_matrix(gramian.numpy()), np.full(m, 1.0 / m))
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    if case == "common":
        np.testing.assert_allclose(weights.numpy(), np.full(m, 1.0 / m), rtol=1e-12)


def test_the_cases_cover_all_some_and_no_conflicting_rows() -> None:
    """Guards the test above: UPGrad solves all rows, some rows or none (three code paths)."""
    counts = {}
    for case in ("conflicting", "mixed", "common"):
        jac = jacobian(case, 16, seed=16)
        counts[case] = int(((jac @ jac.T) < 0).any(dim=1).sum())
    assert counts == {"conflicting": 16, "mixed": counts["mixed"], "common": 0}
    assert 0 < counts["mixed"] < 16


@pytest.mark.parametrize("m", [4, 16, 40])  # m = 40: the PyTorch solver, on the positive rows only
def test_upgrad_preference_with_zeros(m: int) -> None:
    jac = jacobian("conflicting", m, seed=3)
    gramian = jac @ jac.T
    pref = np.zeros(m)
    pref[1::3] = np.arange(1, len(pref[1::3]) + 1)
    weights = UPGradWeighting(pref_vector=pref.tolist())(gramian)
    expected = upgrad_reference(upgrad_matrix(gramian.numpy()), pref)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upgrad_on_a_transposed_gramian(dtype: torch.dtype) -> None:
    """A non-contiguous Gramian (here a transposed view) gives the weights of its contiguous copy:
    the in-place ridge acts on the converted array whatever the input's layout."""
    jac = jacobian("mixed", 8, seed=2)
    gramian = (jac @ jac.T).to(dtype)
    gramian = gramian + 1e-6 * torch.triu(gramian)  # asymmetric within tolerance: layout matters
    view = gramian.T
    assert not view.is_contiguous()
    for weighting in (UPGradWeighting(), MGDAWeighting()):
        torch.testing.assert_close(weighting(view), weighting(view.contiguous()), rtol=0, atol=0)


def test_upgrad_on_a_singular_gramian_without_ridge_uses_the_documented_shift() -> None:
    """Pairwise correlations of −0.5 between three unit rows (they sum to zero: rank 2) without the relative ridge
    (``reg_eps=0``): δ·I is added (δ = 10⁻¹² · trace / m, times 10 until the Cholesky pivots exceed 10⁻¹⁰ of the
    diagonal). (Correlations of −0.6, which satisfy Cauchy–Schwarz but which no three vectors have, are no Gramian:
    rejected by ``check_gramian``.)"""
    gramian = np.full((3, 3), -0.5)
    np.fill_diagonal(gramian, 1.0)
    weights = UPGradWeighting(reg_eps=0.0)(torch.from_numpy(gramian))
    matrix = upgrad_matrix(gramian, reg_eps=0.0)
    delta = 1e-12 * np.trace(matrix) / 3
    while True:
        candidate = matrix + delta * np.eye(3)
        if np.all(np.linalg.eigvalsh(candidate) > 0):
            factor = np.linalg.cholesky(candidate)
            if np.all(np.diag(factor) ** 2 >= 1e-10 * np.diag(candidate)):
                break
        delta *= 10
    expected = upgrad_reference(candidate, np.full(3, 1.0 / 3))
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-8)


def min_norm_weights(matrix: np.ndarray) -> np.ndarray:
    """argmin_{w ∈ simplex} wᵀ M w with quadprog (M positive definite)."""
    m = matrix.shape[0]
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    return quadprog.solve_qp(matrix, np.zeros(m), constraints, bounds, meq=1)[0]


def assert_simplex_kkt(matrix: np.ndarray, weights: np.ndarray, tol: float) -> None:
    """w ∈ simplex, (M w)ᵢ ≥ wᵀ M w for every i, with equality where wᵢ > 0."""
    value = weights @ matrix @ weights
    gradient = matrix @ weights
    assert weights.min() >= 0 and abs(weights.sum() - 1) <= 1e-12
    assert gradient.min() >= value - tol * abs(value)
    support = weights > 1e-9
    np.testing.assert_allclose(gradient[support], value, rtol=tol)


@pytest.mark.parametrize("m", [2, 3, 8, 16, 32])
@pytest.mark.parametrize("case", ["conflicting", "common", "mixed", "ill_conditioned", "scaled"])
def test_mgda_matches_quadprog_and_kkt(m: int, case: str) -> None:
    jac = jacobian(case, m, seed=m + 1)
    gramian = (jac @ jac.T).numpy()
    weights = MGDAWeighting()(torch.from_numpy(gramian)).numpy()
    matrix = (gramian + gramian.T) / (2 * np.trace(gramian))
    assert_simplex_kkt(matrix, weights, tol=1e-6)
    expected = min_norm_weights(matrix)
    atol = 1e-8 * float(jac.abs().max())
    np.testing.assert_allclose(weights @ jac.numpy(), expected @ jac.numpy(), rtol=1e-5, atol=atol)


def test_mgda_cases_cover_interior_and_boundary_solutions() -> None:
    """Guards the test above: the minimum-norm point uses every row (one linear solve) in some
    cases and only some rows (pivoting from that solve's support) in others."""
    full = partial = 0
    for m in (3, 8, 16, 32):
        for case in ("conflicting", "common", "mixed", "ill_conditioned", "scaled"):
            jac = jacobian(case, m, seed=m + 1)
            gramian = (jac @ jac.T).numpy()
            support = int((min_norm_weights(gramian / np.trace(gramian)) > 1e-9).sum())
            full += support == m
            partial += support < m
    assert full >= 3 and partial >= 3


@pytest.mark.parametrize("case", ["conflicting", "common"])
def test_mgda_with_a_tolerance_nothing_meets_falls_back_to_quadprog(case: str) -> None:
    """With ε = 1e-300 neither the interior solve nor the pivoting is accepted: quadprog, then
    the exact re-solve on its free set, give the same weights."""
    jac = jacobian(case, 12, seed=4)
    gramian = jac @ jac.T
    strict = MGDAWeighting(epsilon=1e-300)(gramian)
    torch.testing.assert_close(strict, MGDAWeighting()(gramian), rtol=1e-7, atol=1e-10)


def test_mgda_rank_deficient_gives_the_limit_point() -> None:
    jac = jacobian("rank_deficient", 10, seed=5)  # rank 5 < 10: the hull may contain 0
    weights = MGDAWeighting()(jac @ jac.T)
    assert bool((weights >= 0).all()) and abs(float(weights.sum()) - 1) < 1e-12
    gramian = (jac @ jac.T).numpy()
    ridge = 1e-10 * np.trace(gramian) * np.eye(10)
    expected = min_norm_weights(gramian + ridge) @ jac.numpy()
    np.testing.assert_allclose(weights.numpy() @ jac.numpy(), expected, atol=1e-6 * float(jac.abs().max()))


@pytest.mark.parametrize("weighting", [UPGradWeighting(), MGDAWeighting()], ids=["upgrad", "mgda"])
def test_float32_gramian_of_per_example_like_gradients(weighting: object) -> None:
    jac = jacobian("ill_conditioned", 16, seed=6)
    gramian = jac @ jac.T
    single = weighting(gramian.float())  # type: ignore[operator]
    assert single.dtype == torch.float32
    # The float32 Gramian's rounding moves ill-conditioned weights (see MGDA's docstring): 1%.
    torch.testing.assert_close(single.double(), weighting(gramian), rtol=1e-2, atol=1e-2 / 16)  # type: ignore[operator]
