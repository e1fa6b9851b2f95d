"""DualProj: projection of the averaged gradient onto the dual cone (Quinton & Rey 2024).

    A_DualProj(J) = π_J(pᵀ J),

the projection of the preference-weighted mean of the rows (uniform ``1/m`` by default) onto the
dual cone ``{x : J x ≥ 0}``. Reference: P. Quinton and V. Rey, "Jacobian Descent For
Multi-Objective Optimization", arXiv:2406.16232 (2024), where DualProj is compared with UPGrad;
the projection of a mean gradient onto the dual cone goes back to GEM (Lopez-Paz & Ranzato 2017).
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

__all__ = ["DualProj", "DualProjWeighting"]


class DualProjWeighting(Weighting):
    """Weighting of :class:`DualProj`: ``w = argmin_{v ≥ p} vᵀ G v``.

    The Gramian is divided by its trace (zeros if the trace is below ``norm_eps``) and
    ``reg_eps · I`` is added, as for :class:`~hf_jd.aggregation.upgrad.UPGradWeighting`.

    Parameters
    ----------
    pref_vector
        Non-negative weights ``p`` of the vector to project, shape ``[m]``; ``None`` means ``1/m``.
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
        projected = project_weights(pref, normalized, reg_eps=self.reg_eps)
        return projected.to(dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        pref = None if self._pref_vector is None else self._pref_vector.tolist()
        return (
            f"{type(self).__name__}(pref_vector={pref}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )


class DualProj(GramianWeightedAggregator):
    """DualProj aggregator: the (preference-weighted) mean row projected onto the dual cone.

    Reference: Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization",
    arXiv:2406.16232 (2024).

    Parameters
    ----------
    pref_vector, norm_eps, reg_eps
        See :class:`DualProjWeighting`.
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, norm_eps, reg_eps))

    def __repr__(self) -> str:
        return repr(self.weighting).replace(type(self.weighting).__name__, type(self).__name__, 1)
