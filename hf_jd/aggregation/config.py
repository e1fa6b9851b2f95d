"""ConFIG: conflict-free training.

Reference: Q. Liu, M. Chu and N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics
Informed Neural Networks", ICLR 2025 (arXiv 2408.11104).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting
from ._preference import check_pref_vector, resolve_pref_vector
from ._simplex import pinv_psd

__all__ = ["ConFIG", "ConFIGWeighting"]


class ConFIGWeighting(Weighting):
    """Weights of ConFIG (Liu et al., ICLR 2025).

    With the unit rows ``u_i = g_i / |g_i|`` stacked in ``U`` and preference weights ``w``
    (default all ones), ConFIG takes the direction ``g_v = U⁺ w`` (the minimum-norm ``x`` with
    ``u_iᵀx = w_i``), normalises it to ``g_u = g_v / |g_v|`` and rescales it by the sum of the
    projections of the rows:

    .. math::  g_{ConFIG} = \\Big(\\sum_i g_i^\\top g_u\\Big)\\, g_u.

    When ``U`` has full row rank every cosine ``cos(g_ConFIG, g_i)`` equals ``w_i / |g_v|``: the
    same positive value for every objective with the default preferences.

    Everything depends on ``J`` only through ``G = J Jᵀ``: with ``N = diag(|g_i|)`` and the cosine
    matrix ``C = U Uᵀ = N⁻¹ G N⁻¹``, ``U⁺ = Uᵀ C⁺``, so ``g_v = Jᵀ b`` with ``b = N⁻¹ C⁺ w``,
    ``|g_v|² = bᵀ G b`` and the update is ``βᵀ J`` with ``β = (1ᵀ G b / bᵀ G b) b``. That is what
    is computed, in float64, so ConFIG also runs on the autogram engine. ``C⁺`` is the
    pseudo-inverse of ``C`` with relative tolerance ``m·eps`` (``eps`` of the Gramian's dtype) on its
    eigenvalues, i.e. directions of ``U`` with singular values below ``sqrt(m·eps)`` times the
    largest are left out; so are those whose eigenvalues are below ten times the magnitude of a
    negative eigenvalue of ``C`` (a Gramian known up to rounding, e.g. computed in float32 and cast
    to float64: inverting its noise would swamp the weights).

    Zero rows have a zero unit vector (they ask for nothing). A solution of ``U x = w`` has
    ``|x| ≥ |w|/sqrt(m)``; if ``|g_v| ≤ sqrt(eps)·|w|`` no direction meets the preferences at all
    (e.g. all rows zero, or two opposite rows, where ``g_v`` is only rounding noise) and the
    weights (and the update) are zero.

    Parameters
    ----------
    pref_vector
        Preference weights ``w`` (shape ``[m]``); ``None`` means all ones.
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        self.pref_vector = check_pref_vector(pref_vector)

    def compute(self, gramian: Tensor) -> Tensor:
        """The ConFIG weights of ``gramian`` (see the class docstring).

        Parameters
        ----------
        gramian
            A Gramian ``J Jᵀ`` of shape ``[m, m]`` that passed :func:`check_gramian`.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``, with the dtype and device of ``gramian``.
        """
        dtype = gramian.dtype if gramian.dtype in (torch.float32, torch.float64) else torch.float32
        eps = torch.finfo(dtype).eps
        gramian64 = gramian.detach().to(torch.float64)
        m = gramian64.shape[0]
        preference = resolve_pref_vector(self.pref_vector, m, 1.0).to(gramian64.device)
        norms = gramian64.diagonal().clamp(min=0.0).sqrt()
        inverse_norms = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        cosines = inverse_norms[:, None] * gramian64 * inverse_norms[None, :]
        pseudo_inverse = torch.from_numpy(pinv_psd(cosines.cpu().numpy(), m * eps)).to(gramian64.device)
        coefficients = inverse_norms * (pseudo_inverse @ preference)
        squared_norm = coefficients @ gramian64 @ coefficients  # |g_v|²
        if not bool(squared_norm > eps * preference.dot(preference)):
            return torch.zeros_like(gramian[0])
        weights = (gramian64.sum(dim=0) @ coefficients) / squared_norm * coefficients
        return weights.to(gramian.dtype)

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"{type(self).__name__}(pref_vector={pref})"


class ConFIG(GramianWeightedAggregator):
    """ConFIG aggregator (Liu et al., ICLR 2025); see :class:`ConFIGWeighting`.

    The update ``(Σ_i g_iᵀ g_u) g_u`` along ``g_u ∝ U⁺ w`` (``U``: the unit rows, ``w``: the
    preferences) has the same positive cosine with every row when ``U`` has full row rank.

    Parameters
    ----------
    pref_vector
        Preference weights ``w`` (shape ``[m]``); ``None`` means all ones.
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        weighting = ConFIGWeighting(pref_vector)
        super().__init__(weighting)
        self.pref_vector = weighting.pref_vector

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"{type(self).__name__}(pref_vector={pref})"
