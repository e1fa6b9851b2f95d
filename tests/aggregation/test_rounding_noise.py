"""Weightings that invert the Gramian (or its cosine matrix) on Gramians known up to rounding.

A Gramian of a rank-deficient Jacobian computed in float32 and cast to float64 (or accumulated
layer by layer) has null eigenvalues perturbed to both signs. Inverting the perturbed ones swamps
the weights; the weightings treat eigenvalues of the size of a negative one as zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_jd.aggregation import AlignedMTLWeighting, ConFIGWeighting, IMTLGWeighting
from hf_jd.aggregation._simplex import NOISE_MARGIN, pinv_psd, rank_cutoff

WEIGHTINGS = [ConFIGWeighting, IMTLGWeighting, AlignedMTLWeighting]


def _noisy_gramian(seed: int, dtype: torch.dtype, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Jacobian of rank 3 with 5 rows, its exact Gramian and the Gramian plus symmetric noise
    of ``noise`` times its largest entry, with at least one negative eigenvalue."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(100):
        jacobian = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        jacobian[:, 0] += 2.0  # (rows that mostly agree: a well-defined update)
        gramian = jacobian @ jacobian.T
        perturbation = torch.randn(5, 5, generator=generator, dtype=torch.float64) * noise * gramian.abs().max()
        noisy = (gramian + (perturbation + perturbation.T) / 2).to(dtype)
        if float(torch.linalg.eigvalsh(noisy.double()).min()) < 0:
            return jacobian, gramian, noisy
    raise AssertionError("no negative eigenvalue drawn")


@pytest.mark.parametrize("weighting_class", WEIGHTINGS)
@pytest.mark.parametrize(("dtype", "noise"), [(torch.float64, 1e-13), (torch.float64, 1e-9), (torch.float32, 1e-6)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounding_noise_barely_moves_the_update(
    weighting_class: type, dtype: torch.dtype, noise: float, seed: int
) -> None:
    jacobian, gramian, noisy = _noisy_gramian(seed, dtype, noise)
    exact = weighting_class()(gramian) @ jacobian
    perturbed = weighting_class()(noisy).double() @ jacobian
    assert float(exact.norm()) > 0.1
    # (before, the update collapsed to 1e-12 of its norm for ConFIG and IMTL-G, to 1e-6 for Aligned-MTL)
    assert float((perturbed - exact).norm()) <= 1e3 * noise * float(exact.norm()) + 1e-9


def test_rank_cutoff_follows_the_negative_eigenvalues() -> None:
    eigenvalues = np.array([-1e-9, 2e-9, 5e-8, 3.0])
    assert rank_cutoff(eigenvalues, 1e-12) == pytest.approx(NOISE_MARGIN * 1e-9)
    assert rank_cutoff(np.array([0.0, 1e-6, 3.0]), 1e-12) == pytest.approx(3e-12)
    assert rank_cutoff(np.array([-1.0, -0.5]), 1e-12) == pytest.approx(NOISE_MARGIN)


def test_pinv_psd_inverts_the_range_and_drops_the_noise() -> None:
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
    matrix = (basis * np.array([-1e-10, 5e-10, 2.0, 4.0])) @ basis.T
    expected = (basis[:, 2:] * np.array([0.5, 0.25])) @ basis[:, 2:].T
    np.testing.assert_allclose(pinv_psd(matrix, 1e-15), expected, atol=1e-12)
    full = (basis * np.array([1.0, 2.0, 3.0, 4.0])) @ basis.T
    np.testing.assert_allclose(pinv_psd(full, 1e-15), np.linalg.inv(full), atol=1e-12)
