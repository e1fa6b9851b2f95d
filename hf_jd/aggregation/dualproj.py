"""DualProj: projection of the averaged gradient onto the dual cone (Quinton & Rey 2024).

    A_DualProj(J) = π_J(pᵀ J),

the projection of the preference-weighted mean of the rows (uniform ``1/m`` by default) onto the
dual cone ``{x : J x ≥ 0}``. Reference: P. Quinton and V. Rey, "Jacobian Descent For
Multi-Objective Optimization", arXiv:2406.16232 (2024), where DualProj is compared with UPGrad;
the projection of a mean gradient onto the dual cone goes back to GEM (Lopez-Paz & Ranzato 2017).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ._dual_cone import _MAX_ITERS, DEFAULT_TOL, DualConeAggregator, DualConeWeighting, _solve

__all__ = ["DualProj", "DualProjWeighting"]


class DualProjWeighting(DualConeWeighting):
    """Weighting of :class:`DualProj`: ``w = argmin_{v ≥ p} vᵀ G v``.

    The Gramian is divided by its trace (zeros if the trace is at most ``norm_eps``) and each
    diagonal entry multiplied by ``1 + m · reg_eps``, as for :class:`~hf_jd.aggregation.upgrad.UPGradWeighting`.

    Reference: Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization",
    arXiv:2406.16232 (2024).

    Parameters
    ----------
    pref_vector
        Non-negative weights ``p`` of the vector to project, shape ``[m]``; ``None`` means ``1/m``.
    norm_eps
        Threshold on the trace of the Gramian at or below which it is treated as zero (``0``: only
        an all-zero Jacobian).
    reg_eps
        Relative regularisation of each diagonal entry (``Gᵢᵢ → (1 + m · reg_eps) Gᵢᵢ``; ``0``: the
        exact projection).
    """

    def compute_array(self, gramian: np.ndarray) -> np.ndarray:
        """The weights ``argmin_{v ≥ p} vᵀ G v`` of the regularised Gramian.

        Parameters
        ----------
        gramian
            The Gramian, float64, shape ``[m, m]`` (it may be overwritten).

        Returns
        -------
        numpy.ndarray
            The weights, float64, shape ``[m]``.
        """
        pref = self._preference(gramian.shape[0])
        matrix, factor = self._definite(gramian)
        return pref + _solve(matrix, (pref @ matrix)[None, :], DEFAULT_TOL, _MAX_ITERS, factor)[0]


class DualProj(DualConeAggregator):
    """DualProj aggregator: the (preference-weighted) mean row projected onto the dual cone.

    Reference: Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization",
    arXiv:2406.16232 (2024).

    Parameters
    ----------
    pref_vector, norm_eps, reg_eps
        See :class:`DualProjWeighting`.
    """

    weighting_class = DualProjWeighting

    # (its own constructor, so that a misspelt argument is reported for DualProj, not for the shared base class)
    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__(pref_vector, norm_eps, reg_eps)
