"""Tests of the LCP solvers (hf_jd.aggregation._lcp, _lcp_small) and their routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _aggregation_references import DT, assert_kkt, brute_force, quadprog_reference, random_gramian

from hf_jd.aggregation import _lcp, _lcp_small
from hf_jd.aggregation._dual_cone import project_weights, regularize_gramian
from hf_jd.aggregation._lcp import solve_lcp


def test_large_m_uses_cg_path_and_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    m = 128
    gram = random_gramian(m, 1000, seed=3) + 1e-4 * torch.eye(m, dtype=DT)
    targets = torch.eye(m, dtype=DT)
    built = []
    original = _lcp._cg_solver
    monkeypatch.setattr(_lcp, "_cg_solver", lambda *args: built.append(1) or original(*args))
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


@pytest.mark.parametrize("m", [33, 40])
def test_direct_pivoting_path_matches_quadprog(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    used = []
    original = _lcp._direct_solver
    monkeypatch.setattr(_lcp, "_direct_solver", lambda matrix: used.append(1) or original(matrix))
    gram = random_gramian(m, 2 * m, seed=m)
    targets = torch.cat([torch.eye(m, dtype=DT), torch.rand(4, m, dtype=DT)])
    result = project_weights(targets, gram)
    assert used, "the batched direct pivoting path was not taken"
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


def test_solve_lcp_matches_brute_force_on_general_q() -> None:
    gram = random_gramian(6, 12) + 1e-3 * torch.eye(6, dtype=DT)
    q = torch.randn(4, 6, dtype=DT)
    z = solve_lcp(gram, q)
    w = z @ gram + q
    assert bool((z >= 0).all()) and bool((w >= -1e-12).all())
    assert float((z * w).abs().max()) < 1e-12


def test_cg_and_direct_solvers_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    m = 60
    gram = random_gramian(m, 200, seed=11) + 1e-4 * torch.eye(m, dtype=DT)
    targets = torch.eye(m, dtype=DT)
    with_cg = project_weights(targets, gram)
    monkeypatch.setattr(_lcp, "_DIRECT_COST_LIMIT", float("inf"))
    direct = project_weights(targets, gram)
    torch.testing.assert_close(with_cg, direct, rtol=1e-8, atol=1e-10)


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


def per_example_gramian(batch: int, seed: int = 0) -> torch.Tensor:
    """Gramian of the per-example gradients of a small two-layer MLP (ill-conditioned, realistic)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "w1": torch.randn(6, 16, generator=generator, dtype=DT) / 4,
        "w2": torch.randn(16, 3, generator=generator, dtype=DT) / 4,
    }
    inputs = torch.randn(batch, 6, generator=generator, dtype=DT)
    labels = torch.randint(0, 3, (batch,), generator=generator)

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.tanh(x @ params["w1"]) @ params["w2"]
        return torch.nn.functional.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(weights, inputs, labels)
    jac = torch.cat([g.reshape(batch, -1) for g in grads.values()], dim=1)
    gram = jac @ jac.T
    return gram / gram.trace()


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_small_numpy_pivoting_matches_brute_force(m: int) -> None:
    gram = regularize_gramian(random_gramian(m, m + 3, seed=10 + m), 1e-3)
    q = torch.randn(6, m, dtype=DT, generator=torch.Generator().manual_seed(m))
    z = torch.from_numpy(_lcp_small.solve_small(gram.numpy(), q.numpy(), 1e-10))
    # With u = M⁻¹ q the LCP is the projection problem of brute_force: z = v − u.
    u = torch.linalg.solve(gram, q.T).T
    expected = np.stack([brute_force(gram.numpy(), row) for row in u.numpy()]) - u.numpy()
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-8, atol=1e-10)
    w = z @ gram + q
    assert bool((z >= 0).all()) and bool((w >= -1e-10).all())


def test_small_quadprog_fallback_when_pivoting_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lcp_small, "_SMALL_PIVOT_ITERS", 0)
    m = 7
    gram = random_gramian(m, 9, seed=4)
    targets = torch.eye(m, dtype=DT)
    result = project_weights(targets, gram)
    expected = np.stack([brute_force(gram.numpy(), u) for u in targets.numpy()])
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_ill_conditioned_per_example_gradients_use_preconditioner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = 96
    gram = per_example_gramian(m)
    regularized = gram + 1e-4 * torch.eye(m, dtype=DT)
    eigenvalues = torch.linalg.eigvalsh(regularized)
    assert float(eigenvalues[-1] / eigenvalues[0]) > 100  # the case this test is about
    built = []
    original = _lcp.SpectralPreconditioner.build
    monkeypatch.setattr(
        _lcp.SpectralPreconditioner,
        "build",
        lambda matrix, rows, **kwargs: built.append(original(matrix, rows, **kwargs)) or built[-1],
    )
    targets = torch.eye(m, dtype=DT) / m
    result = project_weights(targets, regularized)
    assert built and built[0] is not None, "the spectral preconditioner was not used"
    assert_kkt(regularized, targets, result, tol=1e-9)
    for i in (0, 41, 95):
        expected = quadprog_reference(regularized.numpy(), targets[i].numpy())
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-6, atol=1e-12)
