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

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting
from ._dual_cone import (
    check_non_negative_number,
    normalize_gramian,
    project_weights,
    resolve_pref_vector,
    to_pref_vector,
)

__all__ = ["UPGrad", "UPGradWeighting"]


class UPGradWeighting(Weighting):
    """Weighting of :class:`UPGrad`: ``w = Σᵢ pᵢ vᵢ`` with ``vᵢ = argmin_{v ≥ eᵢ} vᵀ G v``.

    The Gramian is first divided by its trace (``‖J‖_F²``; replaced by zeros if the trace is below
    ``norm_eps``), then ``reg_eps · I`` is added so that the projection problem has a unique
    solution (Quinton & Rey 2024, arXiv:2406.16232). Since the projection is positively
    homogeneous, ``pᵢ π(gᵢ) = π(pᵢ gᵢ)``: the weights are exact solutions of the dual problems,
    not approximations.

    Parameters
    ----------
    pref_vector
        Non-negative weight of each objective's projection, shape ``[m]``; ``None`` means
        ``1/m`` for every objective.
    norm_eps
        Threshold on the trace of the Gramian below which it is treated as zero.
    reg_eps
        Amount added to the diagonal of the normalised Gramian.
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
    ) -> None:
        self._pref_vector = to_pref_vector(pref_vector)
        self.norm_eps = check_non_negative_number(norm_eps, "norm_eps")
        self.reg_eps = check_non_negative_number(reg_eps, "reg_eps")

    @property
    def pref_vector(self) -> Tensor | None:
        """The preference vector (float64), or ``None`` for uniform weights."""
        return None if self._pref_vector is None else self._pref_vector.clone()

    def compute(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        pref = resolve_pref_vector(self._pref_vector, m)
        normalized = normalize_gramian(gramian.detach().to(device="cpu", dtype=torch.float64), self.norm_eps)
        # Rows with pᵢ = 0 project to 0: only the others are solved.
        targets = torch.diag(pref) if self._pref_vector is None else torch.diag(pref)[pref > 0]
        projected = project_weights(targets, normalized, reg_eps=self.reg_eps)
        return projected.sum(dim=0).to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        pref = None if self._pref_vector is None else self._pref_vector.tolist()
        return (
            f"{type(self).__name__}(pref_vector={pref}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )


class UPGrad(GramianWeightedAggregator):
    """UPGrad aggregator: mean (or preference-weighted sum) of the rows projected onto the dual cone.

    The result never conflicts with any row (``J A(J) ≥ 0``) and equals the weighted mean when no
    two rows conflict. Reference: Quinton & Rey, "Jacobian Descent For Multi-Objective
    Optimization", arXiv:2406.16232 (2024).

    Parameters
    ----------
    pref_vector, norm_eps, reg_eps
        See :class:`UPGradWeighting`.
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, norm_eps, reg_eps))

    def __repr__(self) -> str:
        return repr(self.weighting).replace(type(self.weighting).__name__, type(self).__name__, 1)
