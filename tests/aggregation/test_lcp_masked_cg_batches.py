"""Tests of the batch handling of the masked CG (hf_jd.aggregation._masked_cg): per-row
tolerances, dropping finished rows from the batch, and narrowing a restricted preconditioner.

Independent truth: each row's principal system solved densely with ``torch.linalg.solve``.
"""

from __future__ import annotations

import torch

from hf_jd.aggregation._masked_cg import RestrictedPreconditioner, SpectralPreconditioner, masked_cg

from _aggregation_references import masked_solutions

DT = torch.float64


def spiked_matrix(m: int, spikes: int, seed: int = 0) -> torch.Tensor:
    """Unit-diagonal matrix with a few large eigenvalues above a bulk (condition ~1e3)."""
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(m, spikes, generator=generator, dtype=DT)
    bulk = torch.randn(m, 2 * m, generator=generator, dtype=DT) / (2 * m) ** 0.5
    matrix = low_rank @ low_rank.T + 0.05 * bulk @ bulk.T + 0.02 * torch.eye(m, dtype=DT)
    d = matrix.diagonal().sqrt()
    return matrix / d[:, None] / d[None, :]


def masks_and_rhs(k: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(k, m, generator=generator) < 0.5
    masks[:, 0] = True
    rhs = torch.randn(k, m, generator=generator, dtype=DT) * masks
    return masks, rhs


def relative_residuals(
    matrix: torch.Tensor, x: torch.Tensor, rhs: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    residual = rhs - (x @ matrix) * masks
    return residual.norm(dim=1) / rhs.norm(dim=1).clamp_min(1e-300)


def test_per_row_tolerances_and_dropped_rows_plain_cg() -> None:
    m, k = 40, 16
    matrix = spiked_matrix(m, 3)
    masks, rhs = masks_and_rhs(k, m, seed=1)
    rhs[3] = 0.0  # finished before the first iteration: stays zero
    tol = torch.where(torch.arange(k) % 2 == 0, 1e-12, 1e-3).to(DT)
    x, converged = masked_cg(matrix, rhs, torch.zeros_like(rhs), masks.to(DT), tol, 500)
    assert bool(converged.all())
    residuals = relative_residuals(matrix, x, rhs, masks)
    assert bool((residuals[torch.arange(k) != 3] <= tol[torch.arange(k) != 3] * 1.01).all())
    assert bool((x[3] == 0).all()) and bool((x[~masks] == 0).all())
    strict = torch.arange(0, k, 2)
    torch.testing.assert_close(x[strict], masked_solutions(matrix, rhs, masks)[strict], rtol=1e-8, atol=1e-10)


def test_dropping_rows_with_a_restricted_preconditioner_gives_the_same_solutions() -> None:
    m, k = 50, 24
    matrix = spiked_matrix(m, 5, seed=2)
    masks, rhs = masks_and_rhs(k, m, seed=3)
    preconditioner = SpectralPreconditioner.build(matrix, k)
    assert preconditioner is not None
    restricted = preconditioner.restrict(torch.arange(k), masks.float())
    assert isinstance(restricted, RestrictedPreconditioner)
    tol = torch.logspace(-2, -6, k, dtype=torch.float32)
    x, converged = masked_cg(
        matrix.float(), rhs.float(), torch.zeros(k, m), masks.float(), tol, 200, restricted
    )
    assert bool(converged.all())
    # True residuals (float64) of the float32 iterates: each row's tolerance, up to what float32
    # products can resolve.
    residuals = relative_residuals(matrix, x.double(), rhs, masks)
    floor = 3e-5
    assert bool((residuals <= tol.double() * 1.01 + floor).all())
    expected = masked_solutions(matrix, rhs, masks)
    error = (x.double() - expected).norm(dim=1) / expected.norm(dim=1)
    # The error is bounded by the residual times the condition number of the row's system.
    supports = [torch.nonzero(row).flatten() for row in masks]
    bound = torch.tensor([float(torch.linalg.cond(matrix[i][:, i])) for i in supports], dtype=DT)
    assert bool((error <= bound * (tol.double() * 1.01 + floor)).all())
    assert bool((error[-4:] < 1e-3).all())  # the strict rows are accurate


def test_narrowed_preconditioner_matches_the_full_one_on_its_rows() -> None:
    m, k = 30, 9
    matrix = spiked_matrix(m, 3, seed=4)
    masks, _ = masks_and_rhs(k, m, seed=5)
    preconditioner = SpectralPreconditioner.build(matrix, k)
    assert preconditioner is not None
    full = preconditioner.restrict(torch.arange(k), masks.float())
    keep = torch.tensor([True, False, True, True, False, False, True, False, True])
    residual = torch.randn(k, m) * masks
    torch.testing.assert_close(full.subset(keep)(residual[keep]), full(residual)[keep])
    # With out-of-date capacitances (masks changed in a few places), the narrowed one too.
    changed = masks.clone()
    changed[:, 1] = ~changed[:, 1]
    stale = preconditioner.restrict(torch.arange(k), changed.float())
    residual = torch.randn(k, m) * changed
    torch.testing.assert_close(stale.subset(keep)(residual[keep]), stale(residual)[keep])


def test_preconditioner_reports_the_smallest_eigenvalue() -> None:
    matrix = spiked_matrix(40, 4, seed=6)
    preconditioner = SpectralPreconditioner.build(matrix, 1)
    assert preconditioner is not None
    smallest = float(torch.linalg.eigvalsh(matrix)[0])
    assert abs(preconditioner.smallest_eigenvalue - smallest) <= 1e-4 * smallest + 1e-6
