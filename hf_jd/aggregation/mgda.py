"""MGDA: the minimum-norm point of the convex hull of the gradients.

    A_MGDA(J) = wᵀ J,   w = argmin_{w ∈ Δ_m} wᵀ G w,   Δ_m = {w ≥ 0, Σ wᵢ = 1}.

References: J.-A. Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
optimization", Comptes Rendus Mathématique 350 (2012); O. Sener and V. Koltun, "Multi-Task
Learning as Multi-Objective Optimization", NeurIPS 2018.

Solver: the simplex QP is solved *exactly* (no Frank-Wolfe). Its KKT conditions
``G w = μ 1 + λ, λ ≥ 0, λᵀ w = 0, μ = wᵀ G w`` are, with ``v = w / μ``, those of the linear
complementarity problem ``G v - 1 ≥ 0, v ≥ 0, vᵀ(G v - 1) = 0`` (the non-negative minimiser of
``½ vᵀ G v - 1ᵀ v``), which is solved by the active-set solver of
:func:`hf_jd.aggregation._lcp.solve_lcp`; then ``w = v / Σ v``. Up to ``m ≈ 50`` it first tries
``v = G⁻¹ 1``, the answer whenever every row is in the support (as for the Gramians of
per-example BERT gradients measured), and otherwise pivots from that solution's support. When ``0`` lies in the
convex hull (``G`` singular), the Gramian is regularised by a tiny multiple of the identity
(:func:`~hf_jd.aggregation._dual_cone.regularize_gramian`) and ``w`` is the limit point.

Conditioning: the minimiser is exact for the Gramian it is given, but when the rows are nearly
parallel (eigenvalues of ``G`` many orders of magnitude below the largest, as for per-example
gradients of a small model) it is sensitive to the Gramian's rounding: a Gramian accumulated in
float32 moves ``w`` by up to about 1% against one computed in float64. Compare MGDA results with
that tolerance, or compute the Jacobian in float64.
"""

from __future__ import annotations

import numpy as np

from ._base import ArrayWeighting, GramianWeightedAggregator
from ._dual_cone import _make_definite, _solve, check_non_negative_number
from ._lcp import uses_small_solver
from ._lcp_small import DEFAULT_TOL, polish, quadprog_rows, solve_small

__all__ = ["MGDA", "MGDAWeighting"]


class MGDAWeighting(ArrayWeighting):
    """Weighting of :class:`MGDA`: the convex weights of the minimum-norm point of the rows' hull.

    The result ``d = wᵀ J`` satisfies ``⟨gᵢ, d⟩ ≥ ‖d‖² ≥ 0`` for every row ``gᵢ``.

    References: Désidéri (2012), "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization"; Sener & Koltun (2018), "Multi-Task Learning as Multi-Objective Optimization".

    Parameters
    ----------
    epsilon
        Relative tolerance of the KKT conditions that the solution must satisfy (``tol`` of
        :func:`~hf_jd.aggregation._lcp.solve_lcp`), in ``(0, 1)``. For ``m`` up to about 50 the
        linear systems are solved by direct factorisation, and the answer is checked against the
        minimum-norm point's optimality condition ``min_i ⟨gᵢ, d⟩ ≥ ‖d‖² − 10⁻¹² maxᵢ ‖gᵢ‖²``
        (which bounds ``‖d − d*‖`` by ``10⁻⁶`` of the largest row norm); when it fails it is solved
        again at the strictest tolerance, then by quadprog. (With nearly parallel rows the
        pivoting's iterates are large, and its relative tolerance can accept a support that is not
        optimal.) Measured: within ``10⁻¹⁰`` of the largest row norm of quadprog's answer on
        near-duplicate rows, whatever ``epsilon``. Beyond ``m ≈ 50``, conjugate gradients stop at
        this relative residual.
    max_iters
        Maximum number of active-set (pivoting) iterations before falling back to ``quadprog``.

    Raises
    ------
    TypeError
        If ``epsilon`` is not a number.
    ValueError
        If ``epsilon`` is not in ``(0, 1)`` or ``max_iters`` is not a positive integer.
    """

    def __init__(self, epsilon: float = 1e-5, max_iters: int = 250) -> None:
        if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and epsilon < 0:
            raise ValueError(f"epsilon must be in (0, 1) (a relative tolerance, e.g. 1e-5), got {epsilon}.")
        self.epsilon = check_non_negative_number(epsilon, "epsilon")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1) (a relative tolerance, e.g. 1e-5), got {self.epsilon}.")
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}.")
        self.max_iters = max_iters

    def compute_array(self, gramian: np.ndarray) -> np.ndarray:
        """The convex weights of the minimum-norm point, from the trace-normalised Gramian.

        Parameters
        ----------
        gramian
            The Gramian, float64, shape ``[m, m]`` (it may be overwritten).

        Returns
        -------
        numpy.ndarray
            The weights, float64, shape ``[m]``.
        """
        m = gramian.shape[0]
        # Divided by its trace (zeros for a zero Gramian), symmetrised, made positive definite.
        trace = float(gramian.trace())
        if trace > 0:
            normalized = gramian / (2.0 * trace)
            normalized += normalized.T
        else:
            normalized = np.zeros_like(gramian)
        matrix, factor = _make_definite(normalized, 0.0)
        q = np.full((1, m), -1.0)
        if uses_small_solver(1, m):
            v, interior = _interior_solution(matrix, self.epsilon)
            if not interior:
                # Pivoting from the support of the interior solution (its first step would
                # solve the same system).
                v = solve_small(matrix, q, self.epsilon, free=(v > 0)[None, :])[0]
            v = _ensure_minimum_norm(matrix, q, v)
        else:
            v = _solve(matrix, q, self.epsilon, self.max_iters, factor)[0]
        v /= v.sum()
        return v

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epsilon={self.epsilon}, max_iters={self.max_iters})"


def _interior_solution(matrix: np.ndarray, tol: float) -> tuple[np.ndarray, bool]:
    """``v = M⁻¹ 1`` and whether it is positive and satisfies the LCP's KKT conditions to ``tol``.

    When every row is in the support of the minimum-norm point (the usual case for per-example
    gradients) that is the LCP's solution, found by one linear solve instead of the pivoting
    (whose first iteration solves the same system). The tolerance is the pivoting's: with ``M``
    scaled to unit diagonal (``S = D⁻¹ M D⁻¹``) and the right-hand side ``−D⁻¹ 1`` to unit
    max-norm (a factor ``c = min dᵢ``), ``|c D⁻¹ (M v − 1)| ≤ tol · (1 + c ‖D v‖∞)``.
    """
    v = np.linalg.solve(matrix, np.ones(matrix.shape[0]))
    if not v.min() > 0:
        return v, False
    d = np.sqrt(matrix.diagonal())
    c = d.min()
    residual = matrix @ v
    residual -= 1.0
    residual /= d
    return v, bool(c * np.abs(residual).max() <= tol * (1.0 + c * (d * v).max()))


# Largest violation of the minimum-norm point's optimality, min_i ⟨gᵢ, d⟩ ≥ ‖d‖² − δ, accepted from the
# pivoting, as a fraction of the trace-normalised Gramian's largest diagonal entry; it bounds ‖d − d*‖² by δ.
OPTIMALITY_SLACK = 1e-12


def _optimality_gap(matrix: np.ndarray, v: np.ndarray) -> float:
    """How far ``w = v / Σ v`` is from the minimum-norm point: ``max(‖d‖² − min_i ⟨gᵢ, d⟩, 0)`` relative to
    the largest diagonal entry of ``matrix`` (``inf`` for an unusable ``v``)."""
    total = v.sum()
    if not (np.isfinite(total) and total > 0 and v.min() >= 0):
        return float("inf")
    w = v / total
    products = matrix @ w  # ⟨gᵢ, d⟩
    return max(float(w @ products - products.min()), 0.0) / float(matrix.diagonal().max())


def _ensure_minimum_norm(matrix: np.ndarray, q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``v`` when its weights give the minimum-norm point to :data:`OPTIMALITY_SLACK`, else the better of a
    pivoting to the solvers' strictest tolerance and quadprog's answer re-solved on its support.

    The pivoting's tolerance is relative to the size of its iterates, which are large when rows are nearly
    parallel (near-duplicate per-example gradients): it can then stop at a support that is not optimal."""
    if _optimality_gap(matrix, v) <= OPTIMALITY_SLACK:
        return v
    candidates = [v, solve_small(matrix, q, DEFAULT_TOL)[0]]
    if _optimality_gap(matrix, candidates[-1]) > OPTIMALITY_SLACK:
        candidates.append(polish(matrix, q, quadprog_rows(matrix, q), DEFAULT_TOL)[0])
    return min(candidates, key=lambda candidate: _optimality_gap(matrix, candidate))


class MGDA(GramianWeightedAggregator):
    """MGDA aggregator: the minimum-norm convex combination of the rows.

    References: Désidéri (2012), "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization"; Sener & Koltun (2018), "Multi-Task Learning as Multi-Objective Optimization".

    Parameters
    ----------
    epsilon, max_iters
        See :class:`MGDAWeighting`.
    """

    def __init__(self, epsilon: float = 1e-5, max_iters: int = 250) -> None:
        super().__init__(MGDAWeighting(epsilon, max_iters))

    def __repr__(self) -> str:
        return repr(self.weighting).replace(type(self.weighting).__name__, type(self).__name__, 1)
