"""ConFIG: conflict-free training.

Reference: Q. Liu, M. Chu and N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics
Informed Neural Networks", ICLR 2025 (arXiv 2408.11104).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import Aggregator
from ._preference import check_pref_vector, resolve_pref_vector

__all__ = ["ConFIG"]


class ConFIG(Aggregator):
    """ConFIG aggregator (Liu et al., ICLR 2025).

    With the unit rows ``u_i = g_i / |g_i|`` stacked in ``U`` and preference weights ``w``
    (default all ones), ConFIG takes the direction ``g_v = U⁺ w`` (the minimum-norm ``x`` with
    ``u_iᵀx = w_i``), normalises it to ``g_u = g_v / |g_v|`` and rescales it by the sum of the
    projections of the rows:

    .. math::  g_{ConFIG} = \\Big(\\sum_i g_i^\\top g_u\\Big)\\, g_u.

    When ``U`` has full row rank every cosine ``cos(g_ConFIG, g_i)`` equals ``w_i / |g_v|``: the
    same positive value for every objective with the default preferences. The weights depend on
    the row norms and on ``U``, not only on ``J Jᵀ`` through a weighting, so ConFIG has no
    ``weighting`` (it cannot be used by the autogram engine).

    Zero rows have a zero unit vector (they ask for nothing). ``U⁺`` is ``torch.linalg.pinv``
    with its default tolerance. A solution of ``U x = w`` has ``|x| ≥ |w|/sqrt(m)``; if
    ``|g_v| ≤ sqrt(eps)·|w|`` (``eps`` of the dtype) no direction meets the preferences at all
    (e.g. all rows zero, or two opposite rows, where ``g_v`` is only rounding noise) and the
    update is zero.

    Parameters
    ----------
    pref_vector
        Preference weights ``w`` (shape ``[m]``); ``None`` means all ones.
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        self.pref_vector = check_pref_vector(pref_vector)

    def aggregate(self, matrix: Tensor) -> Tensor:
        if matrix.dtype in (torch.float16, torch.bfloat16):  # torch.linalg.pinv needs float32 or float64
            return self.aggregate(matrix.float()).to(matrix.dtype)
        preference = resolve_pref_vector(self.pref_vector, matrix.shape[0], 1.0)
        preference = preference.to(dtype=matrix.dtype, device=matrix.device)
        norms = matrix.norm(dim=1, keepdim=True)
        units = matrix / torch.where(norms > 0, norms, torch.ones_like(norms))
        direction = torch.linalg.pinv(units) @ preference
        direction_norm = direction.norm()
        threshold = torch.finfo(matrix.dtype).eps ** 0.5 * preference.norm()
        if not bool(direction_norm > threshold):
            return torch.zeros_like(matrix[0])
        unit_direction = direction / direction_norm
        return (matrix @ unit_direction).sum() * unit_direction

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"{type(self).__name__}(pref_vector={pref})"
