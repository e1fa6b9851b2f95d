"""MGDA: the minimum-norm point of the convex hull of the gradients.

    A_MGDA(J) = wᵀ J,   w = argmin_{w ∈ Δ_m} wᵀ G w,   Δ_m = {w ≥ 0, Σ wᵢ = 1}.

References: J.-A. Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
optimization", Comptes Rendus Mathématique 350 (2012); O. Sener and V. Koltun, "Multi-Task
Learning as Multi-Objective Optimization", NeurIPS 2018.

Solver: the simplex QP is solved *exactly* (no Frank-Wolfe). Its KKT conditions
``G w = μ 1 + λ, λ ≥ 0, λᵀ w = 0, μ = wᵀ G w`` are, with ``v = w / μ``, those of the linear
complementarity problem ``G v - 1 ≥ 0, v ≥ 0, vᵀ(G v - 1) = 0`` (the non-negative minimiser of
``½ vᵀ G v - 1ᵀ v``), which is solved by the active-set solver of
:func:`hf_jd.aggregation._lcp.solve_lcp`; then ``w = v / Σ v``. When ``0`` lies in the
convex hull (``G`` singular), the Gramian is regularised by a tiny multiple of the identity
(:func:`~hf_jd.aggregation._dual_cone.regularize_gramian`) and ``w`` is the limit point.

Conditioning: the minimiser is exact for the Gramian it is given, but when the rows are nearly
parallel (eigenvalues of ``G`` many orders of magnitude below the largest, as for per-example
gradients of a small model) it is sensitive to the Gramian's rounding: a Gramian accumulated in
float32 moves ``w`` by up to about 1% against one computed in float64. Compare MGDA results with
that tolerance, or compute the Jacobian in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting
from ._dual_cone import check_non_negative_number, normalize_gramian, regularize_gramian
from ._lcp import solve_lcp

__all__ = ["MGDA", "MGDAWeighting"]


class MGDAWeighting(Weighting):
    """Weighting of :class:`MGDA`: the convex weights of the minimum-norm point of the rows' hull.

    The result ``d = wᵀ J`` satisfies ``⟨gᵢ, d⟩ ≥ ‖d‖² ≥ 0`` for every row ``gᵢ``.

    Parameters
    ----------
    epsilon
        Relative tolerance of the KKT conditions that the solution must satisfy (``tol`` of
        :func:`~hf_jd.aggregation._lcp.solve_lcp`), in ``(0, 1)``. For ``m`` up to about 150 the
        linear systems are solved by direct factorisation, so with the default (or any ``epsilon``
        up to about ``1e-4``) the result is exact up to rounding (1e-9 of the largest row norm); a
        looser tolerance accepts a point further from the minimum-norm one (measured worst cases:
        ``1e-5`` of the largest row norm at ``1e-3``, ``4e-3`` at ``1e-2``, ``5e-2`` at ``0.1``).
        Beyond ``m ≈ 150``, conjugate gradients stop at this relative residual.
    max_iters
        Maximum number of active-set (pivoting) iterations before falling back to ``quadprog``.
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

    def compute(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        normalized = normalize_gramian(gramian.detach().to(device="cpu", dtype=torch.float64), 0.0)
        matrix = regularize_gramian(normalized, 0.0)
        q = -torch.ones(1, m, dtype=torch.float64)
        v = solve_lcp(matrix, q, tol=self.epsilon, max_iters=self.max_iters)[0]
        weights = v / v.sum()
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epsilon={self.epsilon}, max_iters={self.max_iters})"


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
