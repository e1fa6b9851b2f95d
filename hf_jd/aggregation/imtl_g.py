"""IMTL-G: the gradient part of Impartial Multi-Task Learning.

Reference: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao and W. Zhang, "Towards
Impartial Multi-task Learning", ICLR 2021.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting
from ._simplex import (
    cosine_matrix,
    gramian_to_numpy,
    nonzero_rows,
    pinv_psd,
    weights_to_tensor,
)

__all__ = ["IMTLGWeighting", "IMTLG"]


class IMTLGWeighting(Weighting):
    """Weights of IMTL-G (Liu et al., ICLR 2021), computed from the Gramian.

    IMTL-G looks for weights ``α`` summing to ``1`` such that the update ``g = αᵀJ`` has the same
    projection on every unit gradient ``u_i = g_i/|g_i|``: ``gᵀu_i = (Gα)_i / |g_i|`` is the same
    for all ``i``. With ``n = sqrt(diag(G))`` (the row norms) this reads ``G α = λ n``, hence

    .. math::  α = \\frac{G^{+} n}{1^\\top G^{+} n},

    which equals the paper's closed form ``α_{2:m} = g_1 Uᵀ(D Uᵀ)^{-1}``, ``α_1 = 1 - Σ α_{2:m}``
    (with ``D``, ``U`` the differences ``g_1 - g_i`` and ``u_1 - u_i``) when ``G`` is invertible.

    Since ``G = N C N`` with ``N = diag(n)`` and ``C`` the cosine matrix of the rows,
    ``G⁻¹n = N⁻¹ C⁻¹ 1`` when ``G`` is invertible; the weights are computed in this form, which
    stays accurate when the row norms differ by orders of magnitude.

    Rank deficiency: the pseudo-inverse ``C⁺`` (eigenvalues below ``m·eps`` of the input dtype
    times the largest, or below ten times the magnitude of a negative eigenvalue, which shows the
    Gramian's rounding noise, are treated as zero) gives the minimum-norm solution; the equal-projection
    property then holds whenever ``1`` is in the range of ``C`` (e.g. duplicated rows, which share
    their weight). Zero rows (see :data:`~hf_jd.aggregation._simplex.ZERO_ROW_RTOL`) get weight
    exactly ``0`` and are left out. If the sum to normalise by is zero (relative to the
    ``ℓ₁``-norm, up to ``1e-12``), e.g. all rows are zero, no normalised solution exists and the
    weights are all zero. As in the paper, the common projection may be negative in rare
    configurations of three or more rows; the weights are then returned unchanged.
    """

    def compute(self, gramian: Tensor) -> Tensor:
        """The IMTL-G weights of ``gramian`` (zero rows get weight 0).

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
        weights = np.zeros(m)
        active = nonzero_rows(array)
        if not active.any():
            return weights_to_tensor(weights, gramian)
        norms, cosines = cosine_matrix(array[np.ix_(active, active)])
        rtol = m * torch.finfo(gramian.dtype).eps
        direction = (pinv_psd(cosines, rtol) @ np.ones(len(norms))) / norms
        total = float(direction.sum())
        if not np.isfinite(total) or abs(total) <= 1e-12 * float(np.abs(direction).sum()):
            return weights_to_tensor(weights, gramian)
        weights[active] = direction / total
        return weights_to_tensor(weights, gramian)


class IMTLG(GramianWeightedAggregator):
    """IMTL-G aggregator (Liu et al., ICLR 2021): the update with equal projections on every unit
    gradient; see :class:`IMTLGWeighting`."""

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
