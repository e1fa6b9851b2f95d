"""Exact solver of the α-fair allocation ``G w = w^{-1/α}`` (FairGrad; Nash-MTL is ``α = 1``).

Let ``J`` (rows ``g_i``) have Gramian ``G = J Jᵀ`` and let ``u_α`` be the α-fair utility,
``u_α(x) = log x`` for ``α = 1`` and ``u_α(x) = x^{1-α} / (1-α)`` otherwise (``α > 0``). The
concave program

.. math::  \\max_{d \\in \\text{rows}(J)} \\sum_i u_α(g_i^\\top d) - \\tfrac12 \\lVert d \\rVert^2

has the stationarity condition ``d = Σ_i (g_iᵀd)^{-α} g_i``. Writing ``w_i = (g_iᵀd)^{-α} > 0``
gives ``d = Jᵀw`` and ``(G w)_i = g_iᵀd = w_i^{-1/α}``: exactly the fixed point of Ban & Ji (2024)
and, for ``α = 1``, of Navon et al. (2022). This formulation holds even when ``G`` is singular.

The program is solved by damped Newton ascent in ``r`` coordinates of the row space. With the
row norms ``n`` and the cosine matrix ``C = R_c R_cᵀ`` (spectral factor of rank ``r``), the inner
products are ``x = diag(n) R_c y`` for ``d`` with coordinates ``y``; working with ``C`` rather than
``G`` keeps the factor accurate when the row norms differ by orders of magnitude. The Hessian
``-Rᵀ diag(α x^{-α-1}) R - I`` (``R = diag(n) R_c``) is negative definite; a backtracking line
search keeps ``x > 0`` and full steps are taken near the optimum, where Newton converges
quadratically. The start is ``U⁺1`` (``U`` the unit rows: equal inner products with all of them,
read off the spectral factor) when it has a positive inner product with every row, as it does for
linearly independent rows; otherwise the min-norm point of the convex hull of the unit rows (MGDA
on ``C``, a quadratic program), which has one whenever such a direction exists; either is
rescaled optimally along its ray. When no direction has a positive inner product with every row
(``0`` lies in the convex hull of the rows, up to the rounding noise of the Gramian's dtype) the
fixed point does not exist and the solver returns ``None``. Zero rows (see
:data:`~hf_jd.aggregation._simplex.ZERO_ROW_RTOL`) cannot be served by any direction: they get
weight ``0`` and the fixed point is solved for the other rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ._simplex import cosine_matrix, min_norm_simplex, nonzero_rows, spectral_factor

__all__ = ["solve_alpha_fair"]

_FEASIBILITY_TOL = 1e-10
# Multiple of the Gramian's precision (machine epsilon of its dtype) treated as rounding noise.
_NOISE_FACTOR = 10.0
_ARMIJO = 0.25
_FULL_STEP_DECREMENT = 1e-3


def _utility(x: Tensor, alpha: float) -> float:
    if alpha == 1.0:
        return float(torch.log(x).sum())
    return float((x ** (1.0 - alpha)).sum() / (1.0 - alpha))


def _objective(r: Tensor, y: Tensor, alpha: float) -> float:
    return _utility(r @ y, alpha) - 0.5 * float(y @ y)


def _newton_solver(r: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Return the map ``(D, g) ↦ (Rᵀ diag(D) R + I)⁻¹ g`` for the Newton steps (``R``: ``[m, r]``).

    Forming ``Rᵀ diag(D) R`` costs ``m r²`` per step. When ``r`` is close to ``m`` the Woodbury
    identity ``(I + Rᵀ D R)⁻¹ = I − Rᵀ (D⁻¹ + R Rᵀ)⁻¹ R`` is cheaper: ``R Rᵀ`` is formed once and
    each step is one ``m × m`` Cholesky factorisation (measured 4x faster at ``m = r = 1024``).
    Both systems are symmetric positive definite; should a Cholesky factorisation fail (rounding),
    the step falls back to a general solve of the ``r × r`` system.
    """
    m, rank = r.shape
    identity = torch.eye(rank, dtype=r.dtype)

    def direct(curvature: Tensor, gradient: Tensor) -> Tensor:
        system = (r.T * curvature) @ r + identity
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            return torch.cholesky_solve(gradient.unsqueeze(1), factor).squeeze(1)
        return torch.linalg.solve(system, gradient)

    if 4 * rank < 3 * m:
        return direct
    outer = r @ r.T

    def woodbury(curvature: Tensor, gradient: Tensor) -> Tensor:
        factor, info = torch.linalg.cholesky_ex(outer + torch.diag(1.0 / curvature))
        if int(info) != 0:
            return direct(curvature, gradient)
        inner = torch.cholesky_solve((r @ gradient).unsqueeze(1), factor).squeeze(1)
        return gradient - r.T @ inner

    return woodbury


def _feasible_start(factor: Tensor, cosines: np.ndarray, noise: float) -> Tensor | None:
    """Coordinates ``y`` of a direction with a positive inner product with every unit row, or ``None``.

    First the direction ``U⁺1`` (equal inner products with all unit rows when they are linearly
    independent: the usual case, from the spectral factor at no extra cost), if its worst
    normalised inner product exceeds ``sqrt(noise)``; otherwise the
    min-norm point of the convex hull of the unit rows (a quadratic program), which has a
    positive inner product with every row whenever such a direction exists. ``None`` when its
    squared norm is at most ``noise``: ``0`` is in the hull up to rounding.
    """
    if factor.shape[1] > 0:
        # U⁺1 in factor coordinates: the least-squares solution of factor·y = 1, whose columns
        # are orthogonal. Its unit direction has inner products ≥ min(products)/|y| with the unit
        # rows, a lower bound of the min-norm point's norm: above sqrt(noise), the rows are not
        # in conflict up to rounding.
        y = factor.sum(dim=0) / factor.square().sum(dim=0)
        products = factor @ y
        margin = float(products.min())
        if bool(torch.isfinite(y).all()) and margin > 0 and margin**2 > noise * float(y @ y):
            return y
    start = min_norm_simplex(cosines)
    y = factor.T @ torch.from_numpy(start)
    if float(y @ y) <= noise or float((factor @ y).min()) <= 0.0:
        return None
    return y


def solve_alpha_fair(
    gramian: np.ndarray,
    alpha: float,
    max_iter: int = 100,
    tol: float = 1e-24,
    precision: float = 2.0**-52,
) -> np.ndarray | None:
    """Return ``w > 0`` with ``G w = w^{-1/α}`` (elementwise), or ``None`` if none exists.

    Zero rows get weight ``0``; the fixed point then holds for the other rows.

    Parameters
    ----------
    gramian
        Positive semi-definite float64 array of shape ``[m, m]``.
    alpha
        Fairness exponent, ``α > 0``.
    max_iter
        Maximum number of Newton steps (it usually converges in fewer than 15).
    tol
        Stop when the squared Newton decrement falls below ``tol``, or when it stops decreasing
        below ``1e-14`` (machine precision reached).
    precision
        Relative precision of the Gramian (the machine epsilon of the dtype it was computed in).
        Rounding moves each cosine by about ``precision``, hence the squared norm of any convex
        combination of the unit rows by at most that much and an eigenvalue of the cosine matrix
        by at most ``m`` times that much: eigenvalues below ``m·precision`` (and below ``1e-10``
        times the largest) are treated as rounding noise and dropped, and the rows are declared
        in conflict (no solution) when the min-norm point of the unit rows has squared norm at
        most ``max(1e-10, 10·precision)``. (A threshold growing as ``100·m·precision`` once
        declared every float32 batch of ``m ≥ 300`` independent rows in conflict.)

    Returns
    -------
    numpy.ndarray or None
        The weights, float64, shape ``[m]``; ``None`` when the rows are in conflict (no solution).
    """
    active = nonzero_rows(gramian)
    if not active.any():
        return None
    if not active.all():
        sub_gramian = gramian[np.ix_(active, active)]
        sub_weights = solve_alpha_fair(sub_gramian, alpha, max_iter, tol, precision)
        if sub_weights is None:
            return None
        weights = np.zeros(gramian.shape[0])
        weights[active] = sub_weights
        return weights

    m = gramian.shape[0]
    # Rounding noise of the cosines (entries of size <= 1) is about `precision` per entry: it moves
    # the squared norm of any convex combination of the unit rows by at most that much, and an
    # eigenvalue by at most m times that much (absolute, whatever the largest eigenvalue).
    feasibility_noise = max(_FEASIBILITY_TOL, _NOISE_FACTOR * precision)
    eigenvalue_noise = m * precision
    scale = float(np.diag(gramian).mean())
    norms, cosines = cosine_matrix(gramian / scale)
    factor = spectral_factor(cosines, rtol=_FEASIBILITY_TOL, atol=eigenvalue_noise)
    # The Newton iteration runs in torch (float64, CPU) to use PyTorch's thread pool.
    factor_t = torch.from_numpy(factor)
    r = torch.from_numpy(norms)[:, None] * factor_t
    y = _feasible_start(factor_t, cosines, feasibility_noise)
    if y is None:
        return None
    x = r @ y
    # Best multiple t·y: d/dt [Σ u(t x_i) - t²|y|²/2] = 0  ⇔  t^{1+α} = Σ x_i^{1-α} / |y|².
    y = y * (float((x ** (1.0 - alpha)).sum()) / float(y @ y)) ** (1.0 / (1.0 + alpha))

    newton_step = _newton_solver(r)
    value = _objective(r, y, alpha)
    previous_decrement = math.inf
    for _ in range(max_iter):
        x = r @ y
        gradient = r.T @ x ** (-alpha) - y
        curvature = alpha * x ** (-alpha - 1.0)
        step = newton_step(curvature, gradient)
        decrement = float(gradient @ step)
        if decrement <= tol or (decrement < 1e-14 and decrement >= previous_decrement):
            break
        previous_decrement = decrement
        length = 1.0
        while length > 1e-12:
            candidate = y + length * step
            if float((r @ candidate).min()) > 0.0:
                candidate_value = _objective(r, candidate, alpha)
                accepted = decrement < _FULL_STEP_DECREMENT
                if accepted or candidate_value >= value + _ARMIJO * length * decrement:
                    break
            length /= 2.0
        else:
            break
        y, value = candidate, candidate_value

    weights = ((r @ y) ** (-alpha)).numpy()
    # Undo the normalisation: if G/s · w' = w'^{-1/α}, then w = s^{-α/(1+α)} w' solves
    # G w = w^{-1/α}.
    return weights * scale ** (-alpha / (1.0 + alpha))
