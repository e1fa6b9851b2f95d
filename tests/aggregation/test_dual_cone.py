"""Tests of the dual-cone projection in weight space (hf_jd.aggregation._dual_cone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _aggregation_references import DT, assert_kkt, brute_force, quadprog_reference, random_gramian, scipy_nnls

from hf_jd.aggregation._dual_cone import project_weights, regularize_gramian


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


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"tol": 0.0}, "tol"), ({"tol": 2.0}, "tol"), ({"max_iters": 0}, "max_iters")]
)
def test_bad_solver_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        project_weights(torch.eye(2), torch.eye(2), **kwargs)
