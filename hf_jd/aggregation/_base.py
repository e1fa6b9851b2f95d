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
    """Raise ``ValueError`` unless ``gramian`` is a finite, square, floating 2-D tensor whose diagonal
    (squared norms of the rows) is not negative beyond rounding."""
    check_matrix(gramian, "Gramian")
    if gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"The Gramian must be square (shape [m, m]), got shape {tuple(gramian.shape)}. "
            "Pass J @ J.T, not the Jacobian J itself."
        )
    diagonal = gramian.detach().diagonal()
    if bool((diagonal < -1e-5 * diagonal.abs().max()).any()):
        raise ValueError(
            f"The Gramian has negative diagonal entries (min {float(diagonal.min()):.3g}), so it is not J @ J.T "
            "of any matrix J. Pass the Gramian of the Jacobian."
        )


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
        """Return the weights this aggregator gives to the rows of ``matrix``."""
        check_matrix(matrix)
        return self._weighting(compute_gramian(matrix))

    def aggregate(self, matrix: Tensor) -> Tensor:
        weights = self._weighting(compute_gramian(matrix))
        return weights @ matrix

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
    """Return ``matrix @ matrix.T``, symmetrised to remove rounding asymmetry."""
    gramian = matrix @ matrix.T
    return (gramian + gramian.T) / 2
