"""CAGrad: Conflict-Averse Gradient descent.

Reference: B. Liu, X. Liu, X. Jin, P. Stone and Q. Liu, "Conflict-Averse Gradient Descent for
Multi-task Learning", NeurIPS 2021 (arXiv 2110.14048).
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting
from ._simplex import gramian_to_numpy, min_norm_simplex, simplex_qp, weights_to_tensor

__all__ = ["CAGradWeighting", "CAGrad", "solve_cagrad_dual"]

_MAX_ROOT_STEPS = 200


def _number(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)


# Below this fraction of ``max_i |g_i|``, the sign of ``f(τ) = τ² - q`` is not trusted (rounding),
# and a smaller optimal ``|g_w|`` is not resolved (the weighting then returns the mean).
_RELIABLE_TAU = 1e-6
# Ratio between the successive τ tried when looking for the bracket's lower end.
_SCAN_FACTOR = 1e-2


def solve_cagrad_dual(gramian: np.ndarray, c: float) -> np.ndarray:
    """Return ``argmin_{w ∈ Δ} wᵀG1/m + c·|g₀|·sqrt(wᵀGw)`` (the dual problem of CAGrad).

    ``Δ`` is the probability simplex and ``|g₀|² = 1ᵀG1/m²``. Using
    ``s·sqrt(q) = min_{τ>0} s·(q/τ + τ)/2`` the objective is the partial minimum over ``τ`` of a
    function jointly convex in ``(w, τ)``, so ``h(τ) = min_w [bᵀw + s·q(w)/(2τ)] + sτ/2`` (with
    ``q(w) = wᵀGw``) is convex and minimised where ``f(τ) = τ² - q(w*(τ)) = 0``; there ``w*(τ)`` is
    the solution. Each inner problem is a QP over the simplex, solved exactly with ``quadprog``.
    ``f`` has the sign of ``h'``, so it is non-decreasing, non-positive at ``τ`` = the norm of the
    min-norm point and non-negative at ``τ = max_i |g_i|``. When the min-norm point is (nearly) zero,
    ``f`` at that tiny ``τ`` is rounding noise, so the bracket's lower end is then searched for on a
    geometric grid going down from ``max_i |g_i|``. The root is found by the
    Illinois variant of regula falsi (superlinear; about ten QPs), stopped when
    ``|f(τ)| ≤ 1e-12·τ²`` or when the bracket is narrower than ``1e-12·τ``.
    """
    m = gramian.shape[0]
    linear = gramian.sum(axis=1) / m
    s = c * math.sqrt(max(float(gramian.sum()) / m**2, 0.0))
    low_weights = min_norm_simplex(gramian)
    if s == 0.0:
        return low_weights

    def residual(tau: float) -> tuple[np.ndarray, float]:
        weights = simplex_qp(gramian * (s / tau), linear)
        return weights, tau**2 - float(weights @ gramian @ weights)

    high = math.sqrt(float(np.diag(gramian).max()))
    min_norm = math.sqrt(max(float(low_weights @ gramian @ low_weights), 0.0))
    best, f_high = residual(high)
    if f_high <= 0.0:
        return best
    if min_norm >= _RELIABLE_TAU * high:
        low = min_norm
        low_solution, f_low = residual(low)
        if f_low >= 0.0:
            return low_solution
    else:
        # ``0`` is (nearly) in the convex hull of the rows: at τ = the min-norm point's norm,
        # ``f = τ² - q`` is a difference of two numbers at rounding level and its sign tells nothing.
        # Look for a τ with ``f < 0`` going down from ``high``; if none is found above
        # ``_RELIABLE_TAU·high``, the optimal |g_w| is below that and the smallest τ's solution is returned.
        floor = _RELIABLE_TAU * high
        tau = high
        while True:
            tau = max(tau * _SCAN_FACTOR, floor)
            weights, f_tau = residual(tau)
            if f_tau < 0.0:
                low, f_low = tau, f_tau
                break
            high, f_high, best = tau, f_tau, weights
            if tau <= floor:
                return best
    side = 0
    for _ in range(_MAX_ROOT_STEPS):
        tau = (low * f_high - high * f_low) / (f_high - f_low)
        if not low < tau < high:
            tau = (low + high) / 2.0
        weights, f_tau = residual(tau)
        if abs(f_tau) <= 1e-12 * tau**2:
            return weights
        if f_tau > 0.0:
            high, f_high, best = tau, f_tau, weights
            if side == 1:
                f_low /= 2.0
            side = 1
        else:
            low, f_low = tau, f_tau
            if side == -1:
                f_high /= 2.0
            side = -1
        if high - low <= 1e-12 * high:
            break
    return best


class CAGradWeighting(Weighting):
    """Weights of CAGrad (Liu et al., NeurIPS 2021).

    CAGrad looks for the update ``d`` maximising the worst improvement ``min_i g_iᵀd`` within a
    ball around the average gradient ``g₀ = (1/m) Σ_i g_i``:

    .. math::  \\max_d \\min_i g_i^\\top d \\quad \\text{s.t.} \\quad |d - g_0| \\le c |g_0|.

    Its dual (Algorithm 1 of the paper) is ``min_{w ∈ Δ} g_wᵀg₀ + sqrt(φ)|g_w|`` with
    ``g_w = Σ_i w_i g_i`` and ``φ = c²|g₀|²``, and then ``d = g₀ + sqrt(φ)/|g_w| · g_w``, i.e. the
    weights ``1/m + sqrt(φ)/|g_w| · w``. Everything depends on ``J`` only through ``G = J Jᵀ``.
    The dual is solved exactly, without new dependencies, by a root search over a scalar with
    exact simplex QPs (see :func:`solve_cagrad_dual`). The update is returned as in the paper's
    algorithm, without the ``1/(1 + c²)`` rescaling used in some of the authors' experiments.
    ``c = 0`` gives the mean.

    The Gramian is first divided by its mean diagonal (the weights are invariant to this). If
    the rows are all zero, or the optimal ``|g_w|`` is below ``norm_eps`` in these normalised
    units (then ``d`` is not determined by the dual), the weights are the mean ``1/m``. When ``0``
    lies in the convex hull of the rows (no direction improves every objective) the optimal ``|g_w|``
    is in general not zero, and the update is the paper's: the ``d`` of the ball with the least bad
    worst objective.

    Parameters
    ----------
    c
        Radius of the ball around ``g₀``, relative to ``|g₀|`` (``c ≥ 0``).
    norm_eps
        Threshold under which the normalised ``|g_w|`` is treated as zero.
    """

    def __init__(self, c: float = 0.5, norm_eps: float = 1e-4) -> None:
        c = _number(c, "c")
        norm_eps = _number(norm_eps, "norm_eps")
        if c < 0:
            raise ValueError(f"c must be non-negative (the radius of CAGrad's ball), got {c}.")
        if norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}.")
        self.c = c
        self.norm_eps = norm_eps

    def compute(self, gramian: Tensor) -> Tensor:
        array = gramian_to_numpy(gramian)
        m = array.shape[0]
        mean = np.full(m, 1.0 / m)
        scale = float(np.trace(array)) / m
        if not scale > 0:
            return weights_to_tensor(mean, gramian)
        array = array / scale
        dual = solve_cagrad_dual(array, self.c)
        g_w_norm = math.sqrt(max(float(dual @ array @ dual), 0.0))
        if g_w_norm < self.norm_eps:
            return weights_to_tensor(mean, gramian)
        sqrt_phi = self.c * math.sqrt(max(float(array.sum()) / m**2, 0.0))
        return weights_to_tensor(mean + (sqrt_phi / g_w_norm) * dual, gramian)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(c={self.c}, norm_eps={self.norm_eps})"


class CAGrad(GramianWeightedAggregator):
    """CAGrad aggregator (Liu et al., NeurIPS 2021); see :class:`CAGradWeighting`.

    Parameters
    ----------
    c
        Radius of the ball around the average gradient, relative to its norm (``c ≥ 0``).
    norm_eps
        Threshold under which the normalised ``|g_w|`` is treated as zero.
    """

    def __init__(self, c: float = 0.5, norm_eps: float = 1e-4) -> None:
        super().__init__(CAGradWeighting(c, norm_eps))
