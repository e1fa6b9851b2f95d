"""Tests of the batched masked CG and its spectral preconditioner (hf_jd.aggregation._masked_cg)."""

from __future__ import annotations

import pytest
import torch

from hf_jd.aggregation import _masked_cg
from hf_jd.aggregation._masked_cg import SpectralPreconditioner, masked_cg

from _aggregation_references import masked_solutions

DT = torch.float64


def unit_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    d = matrix.diagonal().sqrt()
    return matrix / d[:, None] / d[None, :]


def spiked_matrix(m: int, spikes: int, seed: int = 0) -> torch.Tensor:
    """Unit-diagonal ``A Aᵀ + ridge`` with a few large eigenvalues above a narrow bulk (cond ~1e3)."""
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(m, spikes, generator=generator, dtype=DT)
    bulk = torch.randn(m, 2 * m, generator=generator, dtype=DT) / (2 * m) ** 0.5
    matrix = low_rank @ low_rank.T + 0.05 * bulk @ bulk.T + 0.02 * torch.eye(m, dtype=DT)
    return unit_diagonal(matrix)


def random_masks(k: int, m: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(k, m, generator=generator) < 0.5
    masks[:, 0] = True  # no empty mask
    return masks


def dense_preconditioner(preconditioner: SpectralPreconditioner, eigenvalues: torch.Tensor) -> torch.Tensor:
    """``P = U (Λ_r − σ) Uᵀ + σ I`` as a dense float64 matrix."""
    vectors = preconditioner.eigenvectors.double()
    r = vectors.shape[1]
    shifted = eigenvalues[-r:] - preconditioner.sigma
    m = vectors.shape[0]
    return vectors @ torch.diag(shifted) @ vectors.T + preconditioner.sigma * torch.eye(m, dtype=DT)


def test_masked_cg_solves_each_rows_principal_system() -> None:
    m, k = 20, 7
    matrix = spiked_matrix(m, 2)
    masks = random_masks(k, m)
    rhs = torch.randn(k, m, dtype=DT) * masks
    x, converged = masked_cg(matrix, rhs, torch.zeros_like(rhs), masks.to(DT), 1e-12, 500)
    assert bool(converged.all())
    torch.testing.assert_close(x, masked_solutions(matrix, rhs, masks), rtol=1e-8, atol=1e-10)
    assert bool((x[~masks] == 0).all())


def test_restricted_preconditioner_is_the_woodbury_inverse() -> None:
    m, k = 40, 5
    matrix = spiked_matrix(m, 4)
    preconditioner = SpectralPreconditioner.build(matrix, k)
    assert preconditioner is not None
    eigenvalues = torch.linalg.eigvalsh(matrix)
    dense = dense_preconditioner(preconditioner, eigenvalues)
    masks = random_masks(k, m, seed=1)
    residual = torch.randn(k, m) * masks
    applied = preconditioner.restrict(torch.arange(k), masks.float())(residual).double()
    expected = masked_solutions(dense, residual.double(), masks)
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-5)


def test_preconditioned_spectrum_is_within_the_bound() -> None:
    # M − P is negative semi-definite with norm ≤ σ − λ_min, so P_FF⁻¹ M_FF has its eigenvalues
    # in [λ_min / σ, 1] for every F; σ / λ_min ≤ _TARGET_CONDITION by the choice of r.
    m = 50
    matrix = spiked_matrix(m, 5)
    preconditioner = SpectralPreconditioner.build(matrix, 1)
    assert preconditioner is not None
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert preconditioner.sigma / float(eigenvalues[0]) <= _masked_cg._TARGET_CONDITION * 1.0001
    dense = dense_preconditioner(preconditioner, eigenvalues)
    index = torch.nonzero(random_masks(1, m, seed=2)[0]).flatten()
    factor = torch.linalg.cholesky(dense[index][:, index])
    inverse_factor = torch.linalg.inv(factor)
    spectrum = torch.linalg.eigvalsh(inverse_factor @ matrix[index][:, index] @ inverse_factor.T)
    assert float(spectrum[0]) >= float(eigenvalues[0]) / preconditioner.sigma * (1 - 1e-4)
    assert float(spectrum[-1]) <= 1 + 1e-4


def test_preconditioning_needs_fewer_iterations() -> None:
    m, k = 80, 12
    matrix = spiked_matrix(m, 6)
    masks = random_masks(k, m, seed=3)
    rhs = torch.randn(k, m, dtype=DT) * masks
    preconditioner = SpectralPreconditioner.build(matrix, k)
    assert preconditioner is not None
    apply = preconditioner.restrict(torch.arange(k), masks.float())
    iterations = 25
    _, plain = masked_cg(matrix, rhs, torch.zeros_like(rhs), masks.to(DT), 1e-6, iterations)
    x, preconditioned = masked_cg(
        matrix, rhs, torch.zeros_like(rhs), masks.to(DT), 1e-6, iterations,
        lambda r: apply(r.float()).double(),
    )
    assert not bool(plain.all()), "plain CG should need more iterations on this matrix"
    assert bool(preconditioned.all())
    torch.testing.assert_close(x, masked_solutions(matrix, rhs, masks), rtol=1e-4, atol=1e-5)


def test_out_of_date_capacitance_is_kept_and_still_positive_definite() -> None:
    m = 30
    matrix = spiked_matrix(m, 3)
    preconditioner = SpectralPreconditioner.build(matrix, 1)
    assert preconditioner is not None
    rows = torch.arange(1)
    first = random_masks(1, m, seed=4).float()
    preconditioner.restrict(rows, first)
    changed = first.clone()
    flip = torch.nonzero(first[0] == 0).flatten()[: _masked_cg._STALE_ENTRIES]
    changed[0, flip] = 1.0
    apply = preconditioner.restrict(rows, changed)
    assert torch.equal(preconditioner._masks[0], first[0]), "C_F should not have been recomputed"
    index = torch.nonzero(changed[0]).flatten()
    basis = torch.zeros(index.numel(), m)
    basis[torch.arange(index.numel()), index] = 1.0
    operator = torch.stack([apply(row.unsqueeze(0))[0, index] for row in basis]).double()
    torch.testing.assert_close(operator, operator.T, rtol=1e-4, atol=1e-5)
    assert float(torch.linalg.eigvalsh((operator + operator.T) / 2)[0]) > 0
    # More changes than _STALE_ENTRIES: recomputed for the new mask.
    changed[0, torch.nonzero(first[0] == 0).flatten()] = 1.0
    preconditioner.restrict(rows, changed)
    assert torch.equal(preconditioner._masks[0], changed[0])


def test_no_preconditioner_for_well_conditioned_matrices() -> None:
    generator = torch.Generator().manual_seed(5)
    jac = torch.randn(30, 400, generator=generator, dtype=DT)
    assert SpectralPreconditioner.build(unit_diagonal(jac @ jac.T), 4) is None
    assert SpectralPreconditioner.build(torch.eye(10, dtype=DT), 4) is None


def test_no_preconditioner_when_too_many_eigenvalues_are_large(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = spiked_matrix(40, 6)
    assert SpectralPreconditioner.build(matrix, 1) is not None
    monkeypatch.setattr(_masked_cg, "_MAX_RANK", 3)
    assert SpectralPreconditioner.build(matrix, 1) is None
