"""FairGrad: α-fair allocation of the update among objectives.

Reference: H. Ban and K. Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024
(arXiv 2402.15638).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._alpha_fair import solve_alpha_fair
from ._base import GramianWeightedAggregator, Weighting
from ._simplex import gramian_to_numpy, weights_to_tensor

__all__ = ["FairGradWeighting", "FairGrad"]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a positive number, got {type(alpha).__name__}.")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"alpha must be a finite positive number (α-fairness exponent, e.g. 1.0 for "
            f"proportional fairness), got {alpha}."
        )
    return float(alpha)


class FairGradWeighting(Weighting):
    """Weights of FairGrad (Ban & Ji, ICML 2024): the α-fair allocation of the update.

    FairGrad chooses the update ``d = Jᵀw`` maximising ``Σ_i u_α(g_iᵀd)`` for the α-fair utility
    ``u_α(x) = x^{1-α}/(1-α)`` (``log x`` when ``α = 1``) under a norm budget. Its optimality
    condition is the fixed point

    .. math::  G w = w^{-1/α}, \\qquad w > 0,

    with ``G = J Jᵀ``. ``α = 1`` is proportional fairness (the Nash-MTL solution), ``α → ∞``
    approaches max-min fairness. The authors solve the fixed point with SciPy least squares; here
    it is solved by damped Newton on the equivalent concave program (residual ~1e-12 on usual
    Gramians; with row norms spread over eight orders of magnitude and ``α < 1``, ~1e-3), see
    :mod:`hf_jd.aggregation._alpha_fair`. The fixed point holds even for a singular
    Gramian as long as some direction has a positive inner product with every row (directions
    whose eigenvalue in the cosine matrix is below ``m·eps`` of the input dtype are treated as
    rounding noise and dropped, so there it holds up to that noise). Float16 and bfloat16
    Gramians are solved in float64 with their own ``eps``: the rows count as in conflict (zero
    weights) when the squared norm of the min-norm point of the unit rows is below ``10·eps``,
    about ``1/m`` for ``m`` generic rows, so a bfloat16 Gramian of more than about 12 generic
    rows (float16: 100) gets zero weights; pass a float32 Gramian. The aggregator computes the
    Gramian of a half-precision Jacobian in float32.

    Zero rows cannot be served by any update: they get weight ``0`` and the fixed point is solved
    for the other rows. When no direction has a positive inner product with every non-zero row
    (``0`` in their convex hull, e.g. two opposite rows) the fixed point has no solution and the
    weights are all zero (no update).

    Parameters
    ----------
    alpha
        The fairness exponent ``α > 0``.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _check_alpha(alpha)

    def compute(self, gramian: Tensor) -> Tensor:
        """The α-fair weights of ``gramian``, zeros when the rows are in conflict.

        Parameters
        ----------
        gramian
            A Gramian ``J Jᵀ`` of shape ``[m, m]`` that passed :func:`check_gramian`.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``, with the dtype and device of ``gramian``.
        """
        precision = torch.finfo(gramian.dtype).eps
        weights = solve_alpha_fair(gramian_to_numpy(gramian), self.alpha, precision=precision)
        if weights is None:
            weights = np.zeros(gramian.shape[0])
        return weights_to_tensor(weights, gramian)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"


class FairGrad(GramianWeightedAggregator):
    """FairGrad aggregator (Ban & Ji, ICML 2024): ``J ↦ wᵀJ`` with ``J Jᵀ w = w^{-1/α}``.

    See :class:`FairGradWeighting` for the definition and the degenerate cases.

    Parameters
    ----------
    alpha
        The fairness exponent ``α > 0``.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(FairGradWeighting(alpha))
