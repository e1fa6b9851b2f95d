"""Small helpers shared by the non-core weightings: float64 conversion, zero rows, cosines, the
spectral factor of a Gramian, dense linear algebra and quadratic programs over the probability
simplex (solved exactly with ``quadprog``).

All functions work on small ``[m, m]`` NumPy arrays in float64; callers convert back to the
dtype and device of their input. Dense linear algebra goes through ``torch.linalg`` (zero-copy
on these arrays) so that it uses PyTorch's thread pool: NumPy's BLAS starts its own threads, which
is much slower on a busy machine.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

# A Gramian's eigenvalues up to this many times the magnitude of its most negative one are rounding noise
# (see rank_cutoff).
NOISE_MARGIN = 10.0

__all__ = [
    "gramian_to_numpy",
    "weights_to_tensor",
    "spectral_factor",
    "ZERO_ROW_RTOL",
    "nonzero_rows",
    "cosine_matrix",
    "simplex_qp",
    "eigh",
    "NOISE_MARGIN",
    "rank_cutoff",
    "pinv_psd",
    "min_norm_simplex",
]


def gramian_to_numpy(gramian: Tensor) -> np.ndarray:
    """Return the symmetrised Gramian as a float64 NumPy array (detached, on the CPU).

    Parameters
    ----------
    gramian
        The Gramian, shape ``[m, m]``.

    Returns
    -------
    numpy.ndarray
        ``(G + Gᵀ) / 2``, float64.

    Raises
    ------
    ValueError
        If a diagonal entry is negative: the squared norms of the rows of ``J`` cannot be, so the
        matrix is not a Gramian ``J Jᵀ``.
    """
    array = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    if bool((np.diag(array) < 0).any()):
        raise ValueError(
            f"The Gramian has negative diagonal entries ({np.diag(array).min():.3g}), so it is not "
            "J @ J.T for any matrix J: pass the Gramian of the Jacobian."
        )
    return (array + array.T) / 2.0


def weights_to_tensor(weights: np.ndarray, like: Tensor) -> Tensor:
    """Return ``weights`` as a tensor with the dtype and device of ``like``.

    Parameters
    ----------
    weights
        The weights, shape ``[m]``.
    like
        Tensor whose dtype and device the result takes.

    Returns
    -------
    Tensor
        The weights, shape ``[m]``.
    """
    return torch.as_tensor(np.ascontiguousarray(weights), dtype=like.dtype, device=like.device)


ZERO_ROW_RTOL = 1e-24
"""A row is treated as zero when its squared norm is at most this times the largest one."""


def nonzero_rows(gramian: np.ndarray) -> np.ndarray:
    """Return the boolean mask of the rows whose squared norm exceeds ``ZERO_ROW_RTOL`` times the
    largest one (all ``False`` if every row is zero).

    Parameters
    ----------
    gramian
        Float64 Gramian, shape ``[m, m]``.

    Returns
    -------
    numpy.ndarray
        Boolean mask, shape ``[m]``.
    """
    diagonal = np.diag(gramian)
    largest = float(diagonal.max())
    if not largest > 0:
        return np.zeros(gramian.shape[0], dtype=bool)
    return diagonal > ZERO_ROW_RTOL * largest


def cosine_matrix(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the row norms ``n = sqrt(diag(G))`` and the cosines ``C = G / (n nᵀ)`` of a Gramian
    without zero rows. ``G = diag(n) C diag(n)``; ``C`` is better conditioned when the norms of the
    rows differ by orders of magnitude.

    Parameters
    ----------
    gramian
        Float64 Gramian without zero rows, shape ``[m, m]``.

    Returns
    -------
    tuple of numpy.ndarray
        The norms (shape ``[m]``) and the cosines (shape ``[m, m]``, unit diagonal).
    """
    norms = np.sqrt(np.diag(gramian))
    cosines = np.clip(gramian / np.outer(norms, norms), -1.0, 1.0)
    np.fill_diagonal(cosines, 1.0)
    return norms, cosines


def eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix.

    Parameters
    ----------
    matrix
        Symmetric float64 array, shape ``[m, m]``.

    Returns
    -------
    tuple of numpy.ndarray
        The eigenvalues (shape ``[m]``) and the eigenvectors as columns (shape ``[m, m]``).
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrix)))
    return eigenvalues.numpy(), eigenvectors.numpy()


def rank_cutoff(eigenvalues: np.ndarray, rtol: float) -> float:
    """Eigenvalue of a Gramian (or of its cosine matrix) up to which a direction counts as null.

    ``rtol`` times the largest eigenvalue, raised to :data:`NOISE_MARGIN` times the magnitude of
    the most negative one: a Gramian is positive semi-definite, so a negative eigenvalue is
    rounding noise (e.g. a float32 Gramian cast to float64, or one accumulated layer by layer), and
    positive eigenvalues of that size are indistinguishable from it. Inverting them would blow the
    noise up into the weights.

    Parameters
    ----------
    eigenvalues
        The eigenvalues, shape ``[m]``.
    rtol
        Relative cut-off of the eigenvalues (e.g. ``m·eps`` of the Gramian's dtype).

    Returns
    -------
    float
        The cut-off: eigenvalues at or below it are treated as zero.
    """
    largest = max(float(eigenvalues.max()), 0.0)
    negative = max(-float(eigenvalues.min()), 0.0)
    return max(rtol * largest, NOISE_MARGIN * negative)


def pinv_psd(matrix: np.ndarray, rtol: float) -> np.ndarray:
    """Pseudo-inverse of a positive semi-definite matrix known up to rounding: eigenvalues at or
    below :func:`rank_cutoff` (all negative ones among them) are treated as zero.

    Parameters
    ----------
    matrix
        Symmetric float64 array, shape ``[m, m]``.
    rtol
        Relative cut-off of the eigenvalues (see :func:`rank_cutoff`).

    Returns
    -------
    numpy.ndarray
        The pseudo-inverse, shape ``[m, m]``.
    """
    eigenvalues, eigenvectors = eigh(matrix)
    keep = eigenvalues > rank_cutoff(eigenvalues, rtol)
    inverse = np.zeros_like(eigenvalues)
    inverse[keep] = 1.0 / eigenvalues[keep]
    return (eigenvectors * inverse) @ eigenvectors.T


def spectral_factor(gramian: np.ndarray, rtol: float = 1e-10, atol: float = 0.0) -> np.ndarray:
    """Return ``R`` of shape ``[m, r]`` with ``R Rᵀ ≈ gramian``, keeping the ``r`` eigenvalues
    larger than ``rtol`` times the largest one and than ``atol``. The columns of ``R`` are
    orthogonal (eigenvectors times the square roots of their eigenvalues).

    If ``gramian = J Jᵀ`` then ``R = J Q`` for an orthonormal basis ``Q`` of the row space of
    ``J``: the rows of ``R`` are the rows of ``J`` written in ``r`` coordinates, so inner products
    and norms of combinations of rows can be computed from ``R`` alone.

    Parameters
    ----------
    gramian
        Symmetric positive semi-definite float64 array, shape ``[m, m]``.
    rtol
        Relative cut-off of the eigenvalues.
    atol
        Absolute cut-off of the eigenvalues.

    Returns
    -------
    numpy.ndarray
        ``R``, shape ``[m, r]``.
    """
    eigenvalues, eigenvectors = eigh(gramian)
    largest = max(float(eigenvalues[-1]), 0.0)
    if largest > 0:
        keep = eigenvalues > max(rtol * largest, atol)
    else:
        keep = np.zeros_like(eigenvalues, dtype=bool)
    return np.ascontiguousarray(eigenvectors[:, keep] * np.sqrt(eigenvalues[keep]))


def simplex_qp(hessian: np.ndarray, linear: np.ndarray, ridge: float = 1e-12) -> np.ndarray:
    """Return ``argmin_{w ≥ 0, Σw = 1} ½ wᵀ H w + cᵀ w`` for a positive semi-definite ``H``.

    ``quadprog`` needs a positive definite matrix, so ``ridge`` times the mean diagonal of ``H``
    (or ``ridge`` if that is zero) is added to the diagonal. A Gramian computed in float32 can
    have eigenvalues slightly below zero; if ``quadprog`` rejects the matrix, the shift is raised
    to ``-λ_min`` plus ``1e-10`` times the mean diagonal, then multiplied by 100 up to four
    times. The result is clipped at zero and renormalised to remove the solver's rounding.

    Parameters
    ----------
    hessian
        Positive semi-definite float64 array ``H``, shape ``[m, m]``.
    linear
        Linear term ``c``, shape ``[m]``.
    ridge
        Relative ridge added to the diagonal.

    Returns
    -------
    numpy.ndarray
        The weights ``w`` on the simplex, shape ``[m]``.

    Raises
    ------
    ValueError
        If ``quadprog`` still fails, which means that ``H`` is far from positive semi-definite.
    """
    m = hessian.shape[0]
    scale = float(np.trace(hessian)) / m
    scale = scale if scale > 0 else 1.0
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])

    def attempt(shift: float) -> np.ndarray:
        matrix = hessian + shift * np.eye(m)
        return quadprog.solve_qp(matrix, -linear, constraints, bounds, meq=1)[0]

    try:
        solution = attempt(ridge * scale)
    except ValueError as first_error:
        smallest = float(eigh(hessian)[0][0])
        base = max(-smallest, 0.0) + 1e-10 * scale
        for power in range(5):
            try:
                solution = attempt(base * 100.0**power)
                break
            except ValueError:
                continue
        else:
            raise ValueError(
                f"Could not solve a QP over the simplex ({first_error}). The Gramian must be "
                "positive semi-definite: pass J @ J.T for a real matrix J."
            ) from first_error
    solution = np.clip(solution, 0.0, None)
    return solution / solution.sum()


def min_norm_simplex(gramian: np.ndarray) -> np.ndarray:
    """Return the weights of the minimum-norm point of the convex hull of the rows (MGDA).

    Parameters
    ----------
    gramian
        Positive semi-definite float64 Gramian, shape ``[m, m]``.

    Returns
    -------
    numpy.ndarray
        The convex weights, shape ``[m]``.
    """
    return simplex_qp(gramian, np.zeros(gramian.shape[0]))
