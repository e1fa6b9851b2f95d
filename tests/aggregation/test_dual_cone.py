"""Tests of the dual-cone projection in weight space (hf_jd.aggregation._dual_cone)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import quadprog
import torch
from scipy.optimize import nnls

from hf_jd.aggregation import _dual_cone
from hf_jd.aggregation._dual_cone import project_weights, regularize_gramian, solve_lcp

DT = torch.float64


def brute_force(gramian: np.ndarray, u: np.ndarray) -> np.ndarray:
    """argmin_{v ≥ u} vᵀGv by enumerating every free set (exact for small m, G positive definite)."""
    m = len(u)
    q = gramian @ u
    best = None
    for size in range(m + 1):
        for free in itertools.combinations(range(m), size):
            z = np.zeros(m)
            if free:
                idx = list(free)
                z[idx] = np.linalg.solve(gramian[np.ix_(idx, idx)], -q[idx])
            w = gramian @ z + q
            scale = 1e-9 * (np.abs(q).max() + np.abs(z).max() + 1e-300)
            if (z >= -scale).all() and (w >= -scale).all():
                candidate = u + np.clip(z, 0, None)
                if best is None or candidate @ gramian @ candidate < best @ gramian @ best - 1e-14:
                    best = candidate
    assert best is not None
    return best


def scipy_nnls(gramian: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Same problem as NNLS: with G = L Lᵀ, minimise ‖Lᵀ z + Lᵀ u‖ over z ≥ 0 (SciPy)."""
    lower = np.linalg.cholesky(gramian)
    z, _ = nnls(lower.T, -lower.T @ u, maxiter=50 * len(u))
    return u + z


def quadprog_reference(gramian: np.ndarray, u: np.ndarray) -> np.ndarray:
    m = len(u)
    return quadprog.solve_qp(gramian, np.zeros(m), np.eye(m), u)[0]


def random_gramian(m: int, n: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=generator, dtype=DT)
    jac += shift * torch.randn(n, generator=generator, dtype=DT)
    gram = jac @ jac.T
    return gram / gram.trace()


def assert_kkt(gramian: torch.Tensor, targets: torch.Tensor, result: torch.Tensor, tol: float = 1e-8) -> None:
    """v ≥ u, G v ≥ 0 and (v − u)ᵢ (G v)ᵢ = 0, relative to the problem's scale."""
    w = result @ gramian  # rows: (G v)ᵀ since G is symmetric
    z = result - targets
    scale = (targets.abs() @ gramian.abs()).amax(dim=1, keepdim=True) + result.abs().amax(dim=1, keepdim=True)
    assert bool((z >= -tol * scale).all()), "v >= u is violated"
    assert bool((w >= -tol * scale).all()), "G v >= 0 is violated"
    assert bool(((z.abs() * w.abs()) <= tol * scale**2).all()), "complementarity is violated"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7])
def test_matches_brute_force_small(m: int) -> None:
    gram = random_gramian(m, 10, seed=m)
    targets = torch.cat([torch.eye(m, dtype=DT), torch.randn(3, m, dtype=DT)])
    result = project_weights(targets, gram)
    expected = np.stack([brute_force(gram.numpy(), u) for u in targets.numpy()])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-9, atol=1e-10)
    assert_kkt(gram, targets, result)


@pytest.mark.parametrize(
    ("m", "n", "shift"), [(16, 100, 0.0), (40, 300, 0.0), (64, 500, 0.0), (64, 500, 0.2), (100, 150, 0.0)]
)
def test_matches_scipy_nnls_and_quadprog(m: int, n: int, shift: float) -> None:
    gram = random_gramian(m, n, shift, seed=m + n)
    targets = torch.eye(m, dtype=DT)
    result = project_weights(targets, gram)
    rows = range(0, m, max(1, m // 12))
    expected = np.stack([scipy_nnls(gram.numpy(), targets[i].numpy()) for i in rows])
    np.testing.assert_allclose(result[list(rows)].numpy(), expected, rtol=1e-7, atol=1e-9)
    expected_qp = np.stack([quadprog_reference(gram.numpy(), targets[i].numpy()) for i in rows])
    np.testing.assert_allclose(result[list(rows)].numpy(), expected_qp, rtol=1e-7, atol=1e-9)
    assert_kkt(gram, targets, result)


def test_large_m_uses_cg_path_and_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    m = 128
    gram = random_gramian(m, 1000, seed=3) + 1e-4 * torch.eye(m, dtype=DT)
    targets = torch.eye(m, dtype=DT)
    built = []
    original = _dual_cone._cg_solver
    monkeypatch.setattr(_dual_cone, "_cg_solver", lambda matrix: built.append(1) or original(matrix))
    result = project_weights(targets, gram)
    assert built, "the CG path was not used"
    assert_kkt(gram, targets, result, tol=1e-9)
    for i in (0, 17, 101):
        expected = quadprog_reference(gram.numpy(), targets[i].numpy())
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_ill_conditioned_low_rank_large_m() -> None:
    # Rank 12 plus a small ridge: CG converges slowly, direct or quadprog fallbacks must be exact.
    m = 96
    gram = random_gramian(m, 12, seed=5) + 1e-6 * torch.eye(m, dtype=DT)
    targets = torch.eye(m, dtype=DT)[:40]
    result = project_weights(targets, gram)
    assert_kkt(gram, targets, result)
    for i in (0, 39):
        expected = quadprog_reference(gram.numpy(), targets[i].numpy())
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-5, atol=1e-8)


def test_quadprog_fallback_is_exact() -> None:
    # One pivoting iteration is not enough for most rows: they must fall back to quadprog.
    m = 24
    gram = random_gramian(m, 60, seed=1)
    targets = torch.eye(m, dtype=DT)
    result = project_weights(targets, gram, max_iters=1)
    expected = np.stack([quadprog_reference(gram.numpy(), u) for u in targets.numpy()])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert_kkt(gram, targets, result)


@pytest.mark.parametrize("m", [17, 30])
def test_direct_pivoting_path_matches_quadprog(m: int) -> None:
    gram = random_gramian(m, 2 * m, seed=m)
    targets = torch.cat([torch.eye(m, dtype=DT), torch.rand(4, m, dtype=DT)])
    result = project_weights(targets, gram)
    expected = np.stack([quadprog_reference(gram.numpy(), u) for u in targets.numpy()])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert_kkt(gram, targets, result)


def test_polish_removes_quadprog_rounding_on_singular_problem() -> None:
    # Parallel rows (rank one): the regularised matrix has condition number ~1e10, where
    # quadprog alone is accurate to ~1e-7 only; the exact answer is z = (1 / M₁₁, 0).
    jac = torch.tensor([[1.0, 0.0], [5.0, 0.0]], dtype=DT)
    matrix = regularize_gramian(jac @ jac.T / 26.0, 0.0)
    z = solve_lcp(matrix, -torch.ones(1, 2, dtype=DT))
    assert float(z[0, 1]) == 0.0
    assert abs(float(z[0, 0]) * float(matrix[0, 0]) - 1.0) < 1e-12


@pytest.mark.parametrize("case", ["rank_deficient", "duplicate_rows", "zero_row", "all_zero"])
def test_singular_gramians_are_regularised(case: str) -> None:
    generator = torch.Generator().manual_seed(7)
    if case == "rank_deficient":
        jac = torch.randn(6, 3, generator=generator, dtype=DT)
    elif case == "duplicate_rows":
        jac = torch.randn(5, 20, generator=generator, dtype=DT)
        jac = torch.cat([jac, jac[:2]])
    elif case == "zero_row":
        jac = torch.randn(5, 20, generator=generator, dtype=DT)
        jac[2] = 0
    else:
        jac = torch.zeros(4, 3, dtype=DT)
    gram = jac @ jac.T
    targets = torch.eye(gram.shape[0], dtype=DT)
    result = project_weights(targets, gram, reg_eps=0.0)
    regularized = regularize_gramian(gram, 0.0)
    expected = np.stack([brute_force(regularized.numpy(), u) for u in targets.numpy()])
    # The weights of a nearly singular problem are ill-determined; the projected vectors are not.
    scale = 1e-7 * (1 + float(jac.abs().max()))
    np.testing.assert_allclose((result @ jac).numpy(), expected @ jac.numpy(), rtol=1e-6, atol=scale)
    assert_kkt(regularized, targets, result, tol=1e-7)
    # The projected vectors do not conflict with any row (up to the tiny regularisation).
    inner = (result @ jac) @ jac.T
    assert bool((inner >= -1e-6 * (1 + gram.diagonal().max())).all())


def test_regularize_gramian_leaves_well_conditioned_matrices_unchanged() -> None:
    gram = random_gramian(5, 20)
    torch.testing.assert_close(regularize_gramian(gram, 0.0), gram, rtol=0, atol=1e-15)
    torch.testing.assert_close(regularize_gramian(gram, 0.5), gram + 0.5 * torch.eye(5, dtype=DT))


def test_regularize_gramian_adds_small_ridge_to_singular() -> None:
    jac = torch.randn(4, 2, dtype=DT)
    gram = jac @ jac.T
    regularized = regularize_gramian(gram, 0.0)
    delta = (regularized - gram).diagonal()
    assert bool((delta > 0).all())
    assert float(delta.max()) < 1e-6 * float(gram.trace())
    torch.linalg.cholesky(regularized)


def test_regularize_gramian_rejects_indefinite_matrix() -> None:
    with pytest.raises(RuntimeError, match="positive definite"):
        regularize_gramian(-1e300 * torch.eye(3, dtype=DT), 0.0)


def test_non_conflicting_target_is_unchanged() -> None:
    jac = torch.rand(6, 10, dtype=DT)  # non-negative entries: no two rows conflict
    gram = jac @ jac.T
    targets = torch.eye(6, dtype=DT)
    assert torch.equal(project_weights(targets, gram), targets)


def test_one_dimensional_target_and_dtype_device_preserved() -> None:
    gram = random_gramian(4, 8).float()
    target = torch.tensor([0.25, 0.25, 0.25, 0.25])
    result = project_weights(target, gram)
    assert result.shape == (4,)
    assert result.dtype == torch.float32
    expected = brute_force(gram.double().numpy(), target.double().numpy())
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_projection_is_idempotent_and_homogeneous() -> None:
    gram = random_gramian(10, 30)
    targets = torch.randn(5, 10, dtype=DT).abs()
    once = project_weights(targets, gram)
    # A projected vector lies in the cone: projecting it again changes nothing (in the primal).
    twice = project_weights(once, gram)
    torch.testing.assert_close(twice @ gram @ twice.T, once @ gram @ once.T)
    torch.testing.assert_close(project_weights(3.0 * targets, gram), 3.0 * once)


def test_solve_lcp_matches_brute_force_on_general_q() -> None:
    gram = random_gramian(6, 12) + 1e-3 * torch.eye(6, dtype=DT)
    q = torch.randn(4, 6, dtype=DT)
    z = solve_lcp(gram, q)
    w = z @ gram + q
    assert bool((z >= 0).all()) and bool((w >= -1e-12).all())
    assert float((z * w).abs().max()) < 1e-12


@pytest.mark.parametrize(
    ("targets", "gramian", "error", "match"),
    [
        (torch.eye(3), torch.eye(4), ValueError, "match the Gramian"),
        (torch.eye(3), torch.ones(3, 2), ValueError, "square"),
        (torch.eye(3)[None], torch.eye(3), ValueError, "shape"),
        (torch.full((1, 3), float("nan")), torch.eye(3), ValueError, "non-finite"),
        (torch.eye(3), torch.full((3, 3), float("inf")), ValueError, "non-finite"),
        (torch.eye(3, dtype=torch.long), torch.eye(3), ValueError, "floating"),
        ([[1.0]], torch.eye(1), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(targets: object, gramian: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        project_weights(targets, gramian)  # type: ignore[arg-type]


def test_negative_reg_eps_rejected() -> None:
    with pytest.raises(ValueError, match="reg_eps"):
        project_weights(torch.eye(2), torch.eye(2), reg_eps=-1.0)


def test_cg_and_direct_solvers_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    m = 60
    gram = random_gramian(m, 200, seed=11) + 1e-4 * torch.eye(m, dtype=DT)
    targets = torch.eye(m, dtype=DT)
    with_cg = project_weights(targets, gram)
    monkeypatch.setattr(_dual_cone, "_DIRECT_COST_LIMIT", float("inf"))
    direct = project_weights(targets, gram)
    torch.testing.assert_close(with_cg, direct, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"tol": 0.0}, "tol"), ({"tol": 2.0}, "tol"), ({"max_iters": 0}, "max_iters")]
)
def test_bad_solver_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        project_weights(torch.eye(2), torch.eye(2), **kwargs)


def test_thread_setting_is_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        project_weights(torch.eye(40, dtype=DT), random_gramian(40, 80))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_solve_lcp_rejects_bad_matrices() -> None:
    with pytest.raises(ValueError, match="diagonal"):
        solve_lcp(torch.zeros(2, 2, dtype=DT), torch.ones(1, 2, dtype=DT))
    with pytest.raises(ValueError, match="shapes"):
        solve_lcp(torch.eye(2, dtype=DT), torch.ones(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="float64"):
        solve_lcp(torch.eye(2), torch.ones(1, 2))


def test_cg_path_with_row_norms_spanning_eight_orders() -> None:
    # Rows of norms 1e-4 … 1e4 give right-hand sides that would underflow float32 without the
    # per-row rescaling of the mixed-precision solver.
    generator = torch.Generator().manual_seed(2)
    jac = torch.randn(100, 300, generator=generator, dtype=DT) * torch.logspace(-4, 4, 100, dtype=DT)[:, None]
    gram = jac @ jac.T
    gram = gram / gram.trace() + 1e-4 * torch.eye(100, dtype=DT)
    targets = torch.eye(100, dtype=DT)
    result = project_weights(targets, gram)
    assert_kkt(gram, targets, result)
    for i in (0, 50, 99):
        expected = quadprog_reference(gram.numpy(), targets[i].numpy())
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-6, atol=1e-9)
