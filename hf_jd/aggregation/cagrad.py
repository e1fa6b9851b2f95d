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
from .dualproj import DualProjWeighting

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


# Relative KKT tolerance of the support solver, and the ridge (relative to each row's squared norm)
# that keeps its linear systems non-singular when rows are affinely dependent.
_SUPPORT_TOL = 1e-10
_SUPPORT_RIDGE = 1e-12
# Kim & Park's backup rule: exchanges of every infeasible index allowed without progress.
_SUPPORT_BACKUP = 10


def _on_support(
    gramian: np.ndarray, b: np.ndarray, s: float, support: np.ndarray, t: float | None = None
) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """The stationary point of ``bᵀw + s·sqrt(wᵀGw)`` over ``{Σw = 1, w = 0 off support}``.

    On a support ``S`` the stationarity condition ``b_S + (s/τ) G_SS w_S = μ 1`` with ``1ᵀw_S = 1``
    is linear in ``t = τ/s`` once ``ν = tμ`` is the unknown: ``[G_SS, −1; 1ᵀ, 0] [w_S; ν] =
    [−t b_S; 1]``, so ``w_S = p + t q`` from one factorisation. ``τ = |g_w|`` then reads
    ``s² t² = (p + tq)ᵀ G (p + tq)``, a quadratic in ``t`` with one positive root when
    ``qᵀGq < s²`` (otherwise the objective is unbounded below on the support's affine hull: the
    support is wrong). With ``t`` given, the point is instead that of the simplex QP
    ``min bᵀw + wᵀGw/(2t)`` on the support (always defined). Returns the support's indices,
    ``w_S``, ``μ`` and ``τ``, or ``None``.
    """
    index = np.flatnonzero(support)
    k = index.size
    block = gramian[np.ix_(index, index)]
    # Solved with the unit-diagonal block D G_SS D (w_S = D y): rows whose norms differ by orders
    # of magnitude then cost no accuracy.
    d = 1.0 / np.sqrt(np.diag(block))
    system = np.zeros((k + 1, k + 1))
    system[:k, :k] = block * np.outer(d, d)
    system[:k, k] = -d
    system[k, :k] = d
    rhs = np.zeros((k + 1, 2))
    rhs[k, 0] = 1.0
    rhs[:k, 1] = -b[index] * d
    try:
        solution = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(solution).all():
        return None
    p, q = solution[:k, 0] * d, solution[:k, 1] * d
    if t is None:
        block_q = block @ q
        a = s * s - float(q @ block_q)
        half_b = float(p @ block_q)
        c = max(float(p @ (block @ p)), 0.0)
        if not a > 0:
            return None
        t = (half_b + math.sqrt(max(half_b * half_b + a * c, 0.0))) / a
    if not t > 0 or not math.isfinite(t):
        return None
    weights = p + t * q
    nu = float(solution[k, 0] + t * solution[k, 1])
    return index, weights, nu / t, s * t


def _solve_by_supports(gramian: np.ndarray, b: np.ndarray, s: float) -> np.ndarray | None:
    """Solve the dual of CAGrad exactly by pivoting on the support of ``w``, or return ``None``.

    Starting from the vertex of smallest ``bᵢ``, each step computes the stationary point on the
    current support (:func:`_on_support`, closed form in ``τ``) and checks the KKT conditions of
    the convex problem ``min_{w ∈ Δ} bᵀw + s·|g_w|``: ``w_S ≥ 0`` and, off the support,
    ``λᵢ = bᵢ + (s/τ)(Gw)ᵢ − μ ≥ 0``, to the relative tolerance ``_SUPPORT_TOL``; when they hold
    ``w`` is optimal. Otherwise every violating index changes side (block principal pivoting,
    with Kim & Park's backup rule against cycling; at most as many as the support holds, the
    most violating ones), or only the most violating one if that support has no stationary
    point. If neither has, ``τ`` is frozen at its last value and the pivoting solves the
    (always well-posed) simplex QP of that ``τ`` until its KKT conditions hold, then ``τ`` is
    freed again on the support found. ``None`` when it fails (e.g. the
    optimum has ``g_w = 0``, where the objective is not differentiable); the caller then uses
    the root search.
    """
    m = gramian.shape[0]
    diagonal = np.diag(gramian)
    scale = float(diagonal.mean())
    # A ridge relative to each row's own squared norm (the mean one for zero rows).
    ridge = np.where(diagonal > 0, diagonal, scale if scale > 0 else 1.0)
    regularized = gramian + np.diag(_SUPPORT_RIDGE * ridge)
    columns = np.arange(m)
    support = columns == int(np.argmin(b))
    state = _on_support(regularized, b, s, support)
    fixed_t: float | None = None
    best, backup = m + 1, _SUPPORT_BACKUP
    for _ in range(2 * m + 20):
        if state is None:
            return None
        index, values, mu, tau = state
        weights = np.zeros(m)
        weights[index] = values
        products = regularized[:, index] @ values
        slack = (s / tau) * products + b - mu
        slack_scale = float(np.abs(b).max()) + abs(mu) + (s / tau) * float(np.abs(products).max())
        value_scale = float(np.abs(values).max())
        infeasible = np.where(
            support,
            weights < -_SUPPORT_TOL * value_scale,
            slack < -_SUPPORT_TOL * slack_scale,
        )
        count = int(infeasible.sum())
        if count == 0:
            if fixed_t is None:
                weights = np.clip(weights, 0.0, None)
                return weights / weights.sum()
            # The frozen τ's QP is solved: free τ on its support.
            fixed_t, best, backup = None, m + 1, _SUPPORT_BACKUP
            state = _on_support(regularized, b, s, support)
            continue
        if count < best:
            best, backup = count, _SUPPORT_BACKUP
        else:
            backup -= 1
        violation = np.where(support, weights / value_scale, slack / slack_scale)
        score = np.where(infeasible, violation, np.inf)
        new_state = None
        if count > 1 and backup >= 0:
            # Every violating index, but at most as many as the support holds (it at most
            # doubles: a support far too large has no stationary point, and costs the most).
            limit = max(2, int(support.sum()))
            flip = infeasible if count <= limit else np.isin(columns, np.argsort(score)[:limit])
            candidate = support ^ flip
            if candidate.any():
                new_state = _on_support(regularized, b, s, candidate, fixed_t)
        if new_state is None:
            worst = int(np.argmin(score))
            candidate = support ^ (columns == worst)
            if not candidate.any():
                return None
            new_state = _on_support(regularized, b, s, candidate, fixed_t)
            if new_state is None and fixed_t is None:
                # No stationary point there: solve the simplex QP at the current τ instead.
                fixed_t, best, backup = tau / s, m + 1, _SUPPORT_BACKUP
                new_state = _on_support(regularized, b, s, candidate, fixed_t)
        support, state = candidate, new_state
    return None


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

    The answer is first sought by pivoting on the support of ``w`` (:func:`_solve_by_supports`:
    a closed form in ``τ`` per support, a few supports; ``O(k³)`` per step for a support of ``k``
    rows), which gives the exact solution whenever the optimal ``g_w`` is not zero; the root
    search is the fallback.

    Parameters
    ----------
    gramian
        Positive semi-definite float64 Gramian, shape ``[m, m]``.
    c
        Radius of CAGrad's ball, relative to ``|g₀|`` (``c ≥ 0``).

    Returns
    -------
    numpy.ndarray
        The dual weights ``w`` on the simplex, shape ``[m]``.
    """
    m = gramian.shape[0]
    linear = gramian.sum(axis=1) / m
    s = c * math.sqrt(max(float(gramian.sum()) / m**2, 0.0))
    if s > 0.0:
        weights = _solve_by_supports(gramian, linear, s)
        if weights is not None:
            return weights
    return _solve_by_root_search(gramian, linear, s)


def _solve_by_root_search(gramian: np.ndarray, linear: np.ndarray, s: float) -> np.ndarray:
    """The root search of :func:`solve_cagrad_dual` over ``τ``, one simplex QP (quadprog) per step."""
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


def _cancelled(gramian: np.ndarray, mean: np.ndarray, radius: float) -> np.ndarray:
    """The weights of the update when the dual's optimal ``g_w`` cancels (``0`` in the convex hull of the rows and a
    ball large enough to reach a point that conflicts with no row): the primal optimum is then ``0``, reached by
    every point of the ball in the dual cone ``{d : J d ≥ 0}``, and the one closest to ``g₀`` is the projection of
    ``g₀`` onto that cone (DualProj's update). Should rounding put it outside the ball, the point where the segment
    from ``g₀`` to it leaves the ball (whose worst objective is still at least ``g₀``'s)."""
    projected = DualProjWeighting(reg_eps=0.0).compute_array(gramian.copy())
    step = projected - mean
    distance = math.sqrt(max(float(step @ gramian @ step), 0.0))
    if distance <= radius:
        return projected
    return mean + (radius / distance) * step


class CAGradWeighting(Weighting):
    """Weights of CAGrad (Liu et al., NeurIPS 2021).

    CAGrad looks for the update ``d`` maximising the worst improvement ``min_i g_iᵀd`` within a
    ball around the average gradient ``g₀ = (1/m) Σ_i g_i``:

    .. math::  \\max_d \\min_i g_i^\\top d \\quad \\text{s.t.} \\quad |d - g_0| \\le c |g_0|.

    Its dual (Algorithm 1 of the paper) is ``min_{w ∈ Δ} g_wᵀg₀ + sqrt(φ)|g_w|`` with
    ``g_w = Σ_i w_i g_i`` and ``φ = c²|g₀|²``, and then ``d = g₀ + sqrt(φ)/|g_w| · g_w``, i.e. the
    weights ``1/m + sqrt(φ)/|g_w| · w``. Everything depends on ``J`` only through ``G = J Jᵀ``.
    The dual is solved exactly, without new dependencies, by pivoting on the support of ``w``
    (a closed form per support, a few to a few tens of supports: at most 7 ms at ``m = 256`` and
    0.15 s at ``m = 1024`` on random Gramians, one thread) with, as fallback, a root search over
    a scalar with exact simplex QPs (see :func:`solve_cagrad_dual`; 0.6 s at ``m = 256``, 8 s
    at ``m = 512``). The update is returned as in the paper's
    algorithm, without the ``1/(1 + c²)`` rescaling used in some of the authors' experiments.
    ``c = 0`` gives the mean.

    The Gramian is first divided by its mean diagonal (the weights are invariant to this). If
    the rows are all zero, the weights are the mean ``1/m``. A small ``g_w`` made of small
    rows (the dual picking a nearly converged task's gradient) is not a cancellation: its direction is
    well determined, and so is ``d``. When ``0``
    lies in the convex hull of the rows (no direction improves every objective) the optimal ``|g_w|``
    is in general not zero, and the update is the paper's: the ``d`` of the ball with the least bad
    worst objective. When the ball is large enough to hold a point that conflicts with no row, that worst
    objective is ``0`` and the optimal ``g_w`` cancels, ``|g_w| ≤ norm_eps · Σ_i w_i |g_i|`` (its direction, hence
    the paper's formula for ``d``, is then rounding): every point of the ball in the dual cone ``{d : J d ≥ 0}`` is
    optimal, and the update is the one closest to ``g₀``, the projection of ``g₀`` onto that cone (as
    :class:`~hf_jd.aggregation.DualProj` computes it, without its ridge).

    Parameters
    ----------
    c
        Radius of the ball around ``g₀``, relative to ``|g₀|`` (``c ≥ 0``).
    norm_eps
        Threshold under which ``|g_w|``, relative to ``Σ_i w_i |g_i|``, is treated as zero.

    Raises
    ------
    TypeError
        If ``c`` or ``norm_eps`` is not a number.
    ValueError
        If ``c`` is negative or ``norm_eps`` not positive (or either is not finite).
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
        """The CAGrad weights of ``gramian``, from :func:`solve_cagrad_dual`.

        Parameters
        ----------
        gramian
            A Gramian ``J Jᵀ`` of shape ``[m, m]`` that passed :func:`check_gramian`.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``, with the dtype and device of ``gramian``.
        """
        array = gramian_to_numpy(gramian)
        m = array.shape[0]
        mean = np.full(m, 1.0 / m)
        scale = float(np.trace(array)) / m
        if not scale > 0:
            return weights_to_tensor(mean, gramian)
        array = array / scale
        dual = solve_cagrad_dual(array, self.c)
        g_w_norm = math.sqrt(max(float(dual @ array @ dual), 0.0))
        # (relative to Σ_i w_i |g_i|, the size of the rows g_w combines: a small row that the dual picks, such as a
        # nearly converged task's, gives a small but well-determined g_w)
        combined = float(dual @ np.sqrt(np.clip(np.diag(array), 0.0, None)))
        sqrt_phi = self.c * math.sqrt(max(float(array.sum()) / m**2, 0.0))
        if g_w_norm <= self.norm_eps * combined:
            return weights_to_tensor(_cancelled(array, mean, sqrt_phi), gramian)
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
