"""Tests of the ADMM first guess (hf_jd.aggregation._admm) and of the LCP solver paths it feeds.

Independent truth: exact free sets from plain block principal pivoting with dense per-row solves
(every returned set satisfies the KKT conditions to 1e-12), quadprog and SciPy's NNLS on the same
problems, eigenvalues from ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _aggregation_references import DT, assert_kkt, quadprog_reference, random_gramian, scipy_nnls

from hf_jd.aggregation import _admm, _lcp
from hf_jd.aggregation._admm import admm_free_sets, estimate_smallest_eigenvalue
from hf_jd.aggregation._dual_cone import project_weights, regularize_gramian


def unit_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    d = matrix.diagonal().sqrt()
    return matrix / d[:, None] / d[None, :]


def spiked_gramian(m: int, rank: int, ridge: float, seed: int = 0) -> torch.Tensor:
    """Trace-normalised ``J Jᵀ`` with a dominant shared direction, a low-rank part and a ridge:
    ill-conditioned like the Gramians of per-example gradients."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, 40, generator=generator, dtype=DT)
    signs = torch.where(torch.rand(m, 1, generator=generator) < 0.5, -1.0, 1.0).to(DT)
    jac = 3 * signs * shared + torch.randn(m, rank, generator=generator, dtype=DT) @ torch.randn(
        rank, 40, generator=generator, dtype=DT
    ) / rank**0.5
    gram = jac @ jac.T
    return gram / gram.trace() + ridge * torch.eye(m, dtype=DT)


def exact_free_sets(matrix: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Free sets of the LCPs ``w = M z + q`` by block principal pivoting with dense exact solves."""
    free = q < 0
    for _ in range(100):
        mask = free.to(DT)
        system = matrix * (mask[:, :, None] * mask[:, None, :]) + torch.diag_embed(1 - mask)
        z = torch.linalg.solve(system, (-q * mask).unsqueeze(2)).squeeze(2) * mask
        w = z @ matrix + q
        infeasible = torch.where(free, z < -1e-12, w < -1e-12)
        if not bool(infeasible.any()):
            return free
        free = free ^ infeasible
    raise AssertionError("reference pivoting did not converge")


@pytest.mark.parametrize("case", ["random", "spiked", "rank_deficient"])
def test_admm_finds_the_free_sets_of_almost_all_rows(case: str) -> None:
    m = 48
    if case == "random":
        gram = random_gramian(m, 200, seed=1)
    elif case == "spiked":
        gram = spiked_gramian(m, 6, 1e-3, seed=2)
    else:  # rank 8 < m: singular, regularised like UPGrad's Gramian
        gram = regularize_gramian(random_gramian(m, 8, seed=3), 1e-4)
    matrix = unit_diagonal(gram)
    q = matrix.clone()  # UPGrad's targets eᵢ in the unit-diagonal scaling
    smallest = float(torch.linalg.eigvalsh(matrix)[0])
    free, estimate = admm_free_sets(matrix, q, smallest)
    expected = exact_free_sets(matrix, q)
    wrong_rows = int((free != expected).any(dim=1).sum())
    assert wrong_rows <= m // 10, f"{wrong_rows} rows with a wrong free set"
    assert free.dtype == torch.bool and estimate.dtype == DT
    assert bool((estimate >= 0).all()) and bool((estimate[~free] == 0).all())
    # The estimate is close to the exact solution on the rows whose free set is right.
    good = ~(free != expected).any(dim=1)
    mask = expected.to(DT)
    system = matrix * (mask[:, :, None] * mask[:, None, :]) + torch.diag_embed(1 - mask)
    z = torch.linalg.solve(system, (-q * mask).unsqueeze(2)).squeeze(2) * mask
    error = (estimate[good] - z[good]).abs().amax(dim=1) / z[good].abs().amax(dim=1).clamp_min(1e-12)
    assert float(error.max()) < 1e-3


def test_admm_without_a_valid_rho_falls_back_to_the_classical_guess() -> None:
    matrix = unit_diagonal(random_gramian(10, 30, seed=4))
    q = torch.randn(3, 10, dtype=DT)
    free, estimate = admm_free_sets(matrix, q, 0.0)
    assert torch.equal(free, q < 0)
    assert bool((estimate == 0).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smallest_eigenvalue_estimate_is_a_close_upper_bound(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    m = 60
    jac = torch.randn(m, 3 * m, generator=generator, dtype=DT)
    for matrix in (unit_diagonal(jac @ jac.T), spiked_gramian(m, 5, 1e-3, seed=seed)):
        smallest = float(torch.linalg.eigvalsh(matrix)[0])
        estimate = estimate_smallest_eigenvalue(matrix)
        assert smallest * (1 - 1e-10) <= estimate <= 1.5 * smallest


def test_smallest_eigenvalue_estimate_rejects_indefinite_matrices() -> None:
    with pytest.raises(RuntimeError, match="positive definite"):
        estimate_smallest_eigenvalue(torch.diag(torch.tensor([1.0, -1.0], dtype=DT)))


def force_cg_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Route every problem to the CG path (with ADMM); return a list that records its use."""
    monkeypatch.setattr(_lcp, "_DIRECT_COST_LIMIT", 0.0)
    monkeypatch.setattr(_lcp, "_SMALL_COST_LIMIT", 0.0)
    monkeypatch.setattr(_lcp, "_SMALL_MAX_M", 0)
    used: list[int] = []
    original = _lcp.admm_free_sets
    monkeypatch.setattr(
        _lcp, "admm_free_sets", lambda *args: used.append(1) or original(*args)
    )
    return used


@pytest.mark.parametrize(
    ("case", "ridge"),
    [("spiked", 1e-3), ("spiked", 1e-6), ("rank_deficient", 1e-4), ("rank_deficient", 1e-6)],
)
def test_cg_path_matches_quadprog_and_nnls(
    monkeypatch: pytest.MonkeyPatch, case: str, ridge: float
) -> None:
    used = force_cg_path(monkeypatch)
    m = 40
    if case == "spiked":
        gram = spiked_gramian(m, 5, ridge, seed=5)
    else:  # rank 6 < m: singular, only the ridge makes it definite (UPGrad's default is 1e-4)
        gram = random_gramian(m, 6, seed=6)
    generator = torch.Generator().manual_seed(7)
    targets = torch.cat([torch.eye(m, dtype=DT), torch.rand(3, m, dtype=DT, generator=generator)])
    result = project_weights(targets, gram, reg_eps=ridge)
    assert used, "the ADMM/CG path was not used"
    regularized = regularize_gramian(gram, ridge)
    assert_kkt(regularized, targets, result, tol=1e-9)
    # The answer's accuracy is set by the KKT tolerance times the condition number (up to 1e8
    # here): compare to 1e-6 of the largest weight, as the benchmark does.
    for i in (0, 13, m + 1):
        expected = quadprog_reference(regularized.numpy(), targets[i].numpy())
        scale = 1e-6 * np.abs(expected).max()
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-6, atol=scale)
    for i in (5, m + 2):
        expected = scipy_nnls(regularized.numpy(), targets[i].numpy())
        scale = 1e-6 * np.abs(expected).max()
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-6, atol=scale)


def test_pivoting_corrects_a_poor_admm_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    # One ADMM iteration leaves most free sets wrong: pivoting must still reach the exact answer.
    force_cg_path(monkeypatch)
    monkeypatch.setattr(_admm, "_MAX_ITERS", 1)
    monkeypatch.setattr(_admm, "_FLOAT64_ITERS", 0)
    m = 36
    gram = spiked_gramian(m, 4, 1e-4, seed=8)
    targets = torch.eye(m, dtype=DT)
    matrix = unit_diagonal(regularize_gramian(gram, 0.0))
    guess, _ = admm_free_sets(matrix, matrix.clone(), float(torch.linalg.eigvalsh(matrix)[0]))
    assert int((guess != exact_free_sets(matrix, matrix.clone())).any(dim=1).sum()) > m // 4
    result = project_weights(targets, gram)
    assert_kkt(gram, targets, result, tol=1e-9)
    for i in (0, 20):
        expected = quadprog_reference(gram.numpy(), targets[i].numpy())
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_rows_where_cg_fails_go_to_the_direct_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    force_cg_path(monkeypatch)
    # A CG that never converges: every row must be solved by the direct fallback, exactly.
    def never_converges(
        matrix: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor, *args: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros(rhs.shape[0], dtype=torch.bool)

    monkeypatch.setattr(_lcp, "masked_cg", never_converges)
    direct = []
    original = _lcp._direct_solver
    monkeypatch.setattr(_lcp, "_direct_solver", lambda matrix: direct.append(1) or original(matrix))
    m = 30
    gram = random_gramian(m, 90, seed=9)
    targets = torch.eye(m, dtype=DT)
    result = project_weights(targets, gram)
    assert direct, "the direct fallback was not used"
    assert_kkt(gram, targets, result, tol=1e-9)
    expected = np.stack([quadprog_reference(gram.numpy(), u) for u in targets.numpy()])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-7, atol=1e-10)
