"""UPGrad: unconflicting projection of gradients (Quinton & Rey 2024).

Each row ``gᵢ`` of the Jacobian is projected onto the dual cone ``{x : J x ≥ 0}`` of the rows,
and the projections are averaged with preference weights ``pᵢ`` (uniform ``1/m`` by default):

    A_UPGrad(J) = Σᵢ pᵢ π_J(gᵢ).

Reference: P. Quinton and V. Rey, "Jacobian Descent For Multi-Objective Optimization",
arXiv:2406.16232 (2024), Section "Unconflicting projection of gradients". The projections are
computed in weight space from the Gramian only (:mod:`hf_jd.aggregation._dual_cone`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ._dual_cone import _MAX_ITERS, DEFAULT_TOL, DualConeAggregator, DualConeWeighting, _project_diagonal

__all__ = ["UPGrad", "UPGradWeighting"]


class UPGradWeighting(DualConeWeighting):
    """Weighting of :class:`UPGrad`: ``w = Σᵢ pᵢ vᵢ`` with ``vᵢ = argmin_{v ≥ eᵢ} vᵀ G v``.

    The Gramian is first divided by its trace (``‖J‖_F²``; replaced by zeros if the trace is at most
    ``norm_eps``), then each diagonal entry is multiplied by ``1 + m · reg_eps`` so that the projection
    problem has a unique solution (a relative ridge: it keeps the slack of every constraint relative to
    its own row, and UPGrad linear under scaling of the rows; Quinton & Rey 2024, arXiv:2406.16232).
    Since the projection is positively homogeneous, ``pᵢ π(gᵢ) = π(pᵢ gᵢ)``: the weights are exact
    solutions of the dual problems, not approximations.

    Parameters
    ----------
    pref_vector
        Non-negative weight of each objective's projection, shape ``[m]``; ``None`` means
        ``1/m`` for every objective.
    norm_eps
        Threshold on the trace of the Gramian at or below which it is treated as zero (``0``: only
        an all-zero Jacobian).
    reg_eps
        Relative regularisation of each diagonal entry (``Gᵢᵢ → (1 + m · reg_eps) Gᵢᵢ``; ``0``: the
        exact projection).
    """

    def compute_array(self, gramian: np.ndarray) -> np.ndarray:
        """The weights ``Σᵢ pᵢ vᵢ`` of the regularised Gramian.

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
        # Rows with pᵢ = 0 project to 0: only the others are solved.
        matrix, factor = self._definite(gramian)
        uniform = self._pref_vector is None
        return _project_diagonal(matrix, pref, DEFAULT_TOL, _MAX_ITERS, uniform=uniform, factor=factor)


class UPGrad(DualConeAggregator):
    """UPGrad aggregator: mean (or preference-weighted sum) of the rows projected onto the dual cone.

    The result does not conflict with any row (``J A(J) ≥ 0``, exactly with ``reg_eps=0``; with the
    default regularisation up to a slack ``m · reg_eps · wᵢ ‖gᵢ‖²`` per row, relative to each row's own
    norm) and equals the weighted mean when no two rows conflict. The slack matters for degenerate
    Jacobians only: when the rows (nearly) positively span a subspace the exact projection is (nearly)
    zero, while the regularised one can stay as large as the mean (rows ``(1, 0)``, ``(−1, 0.01)``,
    ``(0, −1)``: norm 0.29 by default; with ``reg_eps=0``, 2e-6 in float64, about 5e-5 in float32 from
    rounding). Reference: Quinton & Rey, "Jacobian
    Descent For Multi-Objective Optimization", arXiv:2406.16232 (2024).

    Parameters
    ----------
    pref_vector, norm_eps, reg_eps
        See :class:`UPGradWeighting`.
    """

    weighting_class = UPGradWeighting

    # (its own constructor, so that a misspelt argument is reported for UPGrad, not for the shared base class)
    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__(pref_vector, norm_eps, reg_eps)
