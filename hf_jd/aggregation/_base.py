"""Base classes of the aggregation package: weightings, aggregators and input checks.

A *weighting* maps the Gramian ``G = J Jᵀ`` (shape ``[m, m]``) of a Jacobian ``J`` (shape
``[m, n]``) to a weight vector ``w`` (shape ``[m]``). An *aggregator* maps ``J`` itself to an
update vector (shape ``[n]``). Every aggregator whose weights depend on ``J`` only through its
Gramian is a :class:`GramianWeightedAggregator`: its update is ``wᵀ J`` and it exposes its
weighting as ``.weighting``, which is what the autogram engine uses without ever forming ``J``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Weighting",
    "Aggregator",
    "GramianWeightedAggregator",
    "check_matrix",
    "check_gramian",
]


def check_matrix(matrix: Tensor, what: str = "matrix") -> None:
    """Raise ``ValueError`` unless ``matrix`` is a non-empty, finite, floating 2-D tensor."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"The {what} must be a torch.Tensor, got {type(matrix).__name__}.")
    if matrix.dim() != 2:
        raise ValueError(
            f"The {what} must be 2-D (shape [m, n]: one row per objective), got shape "
            f"{tuple(matrix.shape)}. Flatten each gradient into one row first."
        )
    if matrix.shape[0] == 0:
        raise ValueError(f"The {what} is empty (shape {tuple(matrix.shape)}): it needs at least one row.")
    if not matrix.is_floating_point():
        raise ValueError(f"The {what} must have a floating dtype, got {matrix.dtype}.")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(
            f"The {what} has non-finite entries (inf or nan): check the losses and gradients "
            "that produced it."
        )


def check_gramian(gramian: Tensor) -> None:
    """Raise ``ValueError`` unless ``gramian`` could be ``J Jᵀ`` up to rounding.

    It must be a finite, square, floating 2-D tensor whose diagonal (squared norms of the rows) is
    not negative, which is symmetric and satisfies the Cauchy–Schwarz inequality
    ``|Gᵢⱼ| ≤ sqrt(Gᵢᵢ Gⱼⱼ)`` (necessary for positive semi-definiteness, ``O(m²)`` to check),
    both up to a relative ``max(1e-3, 100·eps)`` of ``sqrt(Gᵢᵢ Gⱼⱼ)`` (``eps`` of its dtype) plus
    ``1e-6`` of the largest diagonal entry.
    """
    check_matrix(gramian, "Gramian")
    if gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"The Gramian must be square (shape [m, m]), got shape {tuple(gramian.shape)}. "
            "Pass J @ J.T, not the Jacobian J itself."
        )
    work = gramian.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    diagonal = work.diagonal()
    largest = float(diagonal.abs().max())
    if bool((diagonal < -1e-5 * largest).any()):
        raise ValueError(
            f"The Gramian has negative diagonal entries (min {float(diagonal.min()):.3g}), so it is not J @ J.T "
            "of any matrix J. Pass the Gramian of the Jacobian."
        )
    if work.shape[0] > 1:
        _check_symmetric_and_cauchy_schwarz(work, diagonal, largest, torch.finfo(gramian.dtype).eps)


def _check_symmetric_and_cauchy_schwarz(
    gramian: Tensor, diagonal: Tensor, largest: float, eps: float
) -> None:
    """The structural part of :func:`check_gramian` (``gramian``: float32 or float64)."""
    norms = diagonal.clamp_min(0.0).sqrt()
    bound = norms.unsqueeze(1) * norms.unsqueeze(0)
    tol = max(_GRAMIAN_RTOL, 100.0 * eps)
    allowed = bound.mul(tol).add_(_GRAMIAN_ATOL * largest)
    asymmetry = (gramian - gramian.T).abs_().sub_(allowed)
    if bool((asymmetry > 0).any()):
        i, j = divmod(int(asymmetry.argmax()), gramian.shape[0])
        raise ValueError(
            f"The Gramian is not symmetric (G[{i}, {j}] = {float(gramian[i, j]):.4g} but "
            f"G[{j}, {i}] = {float(gramian[j, i]):.4g}), so it is not J @ J.T of any matrix J. "
            "Pass the Gramian of the Jacobian, J @ J.T."
        )
    excess = gramian.abs().sub_(bound).sub_(allowed)
    if bool((excess > 0).any()):
        i, j = divmod(int(excess.argmax()), gramian.shape[0])
        raise ValueError(
            f"The Gramian is not positive semi-definite: |G[{i}, {j}]| = {float(gramian[i, j].abs()):.4g} "
            f"exceeds sqrt(G[{i}, {i}] G[{j}, {j}]) = {float(bound[i, j]):.4g} (Cauchy-Schwarz), so it is "
            "not J @ J.T of any matrix J. Pass the Gramian of the Jacobian, J @ J.T."
        )


# Tolerances of check_gramian's symmetry and Cauchy–Schwarz checks: relative to sqrt(Gᵢᵢ Gⱼⱼ)
# (at least 100 eps of the dtype) and to the largest diagonal entry.
_GRAMIAN_RTOL = 1e-3
_GRAMIAN_ATOL = 1e-6
# Largest diagonal entry below which a float32 Gramian is recomputed in float64.
_FLOAT32_GRAMIAN_FLOOR = 1e-30


class _Stateful:
    """State handling shared by weightings and aggregators; stateless by default."""

    def reset(self) -> None:
        """Forget any state accumulated over previous calls (no-op when stateless)."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state to save in a checkpoint (empty when stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        if state:
            raise ValueError(
                f"{type(self).__name__} is stateless but received a non-empty state "
                f"with keys {sorted(state)}."
            )

    @property
    def is_stateful(self) -> bool:
        """Whether this object keeps state across calls (and so needs checkpointing)."""
        return type(self).state_dict is not _Stateful.state_dict


class Weighting(_Stateful, ABC):
    """Maps a Gramian ``G`` of shape ``[m, m]`` to weights of shape ``[m]``.

    Subclasses implement :meth:`compute`; calling the object validates the input first.
    """

    def __call__(self, gramian: Tensor) -> Tensor:
        check_gramian(gramian)
        weights = self.compute(gramian)
        return weights

    @abstractmethod
    def compute(self, gramian: Tensor) -> Tensor:
        """Return the weights for a validated Gramian (same dtype and device)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Aggregator(_Stateful, ABC):
    """Maps a Jacobian matrix of shape ``[m, n]`` to an update vector of shape ``[n]``.

    Subclasses implement :meth:`aggregate`; calling the object validates the input first.
    """

    def __call__(self, matrix: Tensor) -> Tensor:
        check_matrix(matrix)
        return self.aggregate(matrix)

    @abstractmethod
    def aggregate(self, matrix: Tensor) -> Tensor:
        """Return the update vector for a validated matrix (same dtype and device)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GramianWeightedAggregator(Aggregator):
    """Aggregator ``J ↦ wᵀ J`` where ``w = weighting(J Jᵀ)``.

    Gradients: when ``J`` requires grad, the result is differentiable with the weights held constant
    (the weightings solve their problems outside autograd): the gradient of ``wᵀ J`` at fixed ``w``,
    which is the derivative of the aggregator itself only when ``w`` does not depend on ``J`` (mean,
    sum, constant, random weights).

    Parameters
    ----------
    weighting
        The weighting applied to the Gramian of the matrix.
    """

    def __init__(self, weighting: Weighting) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}.")
        self._weighting = weighting

    @property
    def weighting(self) -> Weighting:
        """The weighting that maps the Gramian to the weights."""
        return self._weighting

    def weights(self, matrix: Tensor) -> Tensor:
        """Return the weights this aggregator gives to the rows of ``matrix`` (in its dtype)."""
        check_matrix(matrix)
        return self._weighting(compute_gramian(matrix)).to(matrix.dtype)

    def aggregate(self, matrix: Tensor) -> Tensor:
        weights = self._weighting(compute_gramian(matrix))
        return weights.to(matrix.dtype) @ matrix

    def reset(self) -> None:
        self._weighting.reset()

    def state_dict(self) -> dict[str, Any]:
        return self._weighting.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._weighting.load_state_dict(state)

    @property
    def is_stateful(self) -> bool:
        return self._weighting.is_stateful

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._weighting!r})"


def compute_gramian(matrix: Tensor) -> Tensor:
    """Return ``matrix @ matrix.T``, symmetrised to remove rounding asymmetry.

    A float16 or bfloat16 matrix has its Gramian computed in float32: the products of its rows
    are exact there, whereas rounding them to the matrix's own 8 to 11 bits would leave the
    weightings a Gramian accurate to only two or three digits. A float32 Gramian that overflows,
    or whose largest entry is below ``1e-30`` (subnormal or zero) for a non-zero matrix, is
    computed in float64 instead.

    Raises
    ------
    ValueError
        If the Gramian overflows even float64.
    """
    work = matrix.float() if matrix.dtype in (torch.float16, torch.bfloat16) else matrix
    gramian = work @ work.T
    if work.dtype == torch.float32 and _outside_float32_range(gramian, work):
        # Products of rows that overflow float32 (entries above ~1e19) or underflow it (below
        # ~1e-19: the Gramian would be 0, or subnormal and imprecise) are exact in float64.
        work = matrix.double()
        gramian = work @ work.T
    if not bool(torch.isfinite(gramian.diagonal()).all()):
        raise ValueError(
            f"The Gramian J @ J.T of the matrix overflows {gramian.dtype} (its entries reach "
            f"{float(matrix.abs().max()):.3g}): scale the losses down."
        )
    return (gramian + gramian.T) / 2


def _outside_float32_range(gramian: Tensor, matrix: Tensor) -> bool:
    """Whether a float32 Gramian overflowed, or is below ``1e-30`` for a non-zero matrix."""
    largest = gramian.diagonal().abs().max()
    if not bool(torch.isfinite(largest)):
        return True
    return bool(largest < _FLOAT32_GRAMIAN_FLOOR) and bool((matrix != 0).any())
