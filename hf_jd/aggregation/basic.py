"""Fixed and random weightings: Mean, Sum, Constant and Random.

``Random`` follows Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022 (arXiv:2111.10603): at every step the weights are the softmax of
a standard Gaussian vector. The other three are the usual linear scalarisations. None of these
aggregators needs the Gramian, so their ``aggregate`` skips it (``weighting(J Jᵀ) @ J`` gives the
same result).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting, computes_weighted_rows, weighted_rows
from ._generator import check_seed
from ._preference import check_vector

__all__ = [
    "Mean",
    "MeanWeighting",
    "Sum",
    "SumWeighting",
    "Constant",
    "ConstantWeighting",
    "Random",
    "RandomWeighting",
]


class _SizeOnlyWeighting(Weighting):
    """A weighting whose weights depend only on the number of rows ``m``."""

    def compute(self, gramian: Tensor) -> Tensor:
        return self.weights_for(gramian.shape[0], gramian.dtype, gramian.device)

    @abstractmethod
    def weights_for(self, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the weights for ``m`` objectives."""


class _SizeOnlyAggregator(GramianWeightedAggregator):
    """Aggregator ``wᵀ J`` that computes ``w`` from ``m`` alone, without forming ``J Jᵀ``."""

    @computes_weighted_rows
    def aggregate(self, matrix: Tensor) -> Tensor:
        weighting = self.weighting
        assert isinstance(weighting, _SizeOnlyWeighting)
        return weighted_rows(weighting.weights_for(matrix.shape[0], matrix.dtype, matrix.device), matrix)

    def __repr__(self) -> str:
        return repr(self.weighting).replace(type(self.weighting).__name__, type(self).__name__, 1)


class MeanWeighting(_SizeOnlyWeighting):
    """Uniform weights ``1/m``: the mean of the rows.

    Reference: none, a baseline without a paper of its own (linear scalarisation of the losses).
    """

    def weights_for(self, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return ``1/m`` each for ``m`` objectives.

        Parameters
        ----------
        m
            Number of objectives (rows of the Jacobian).
        dtype, device
            Those of the result.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``.
        """
        return torch.full((m,), 1.0 / m, dtype=dtype, device=device)


class Mean(_SizeOnlyAggregator):
    """The mean of the rows (what ordinary gradient descent on the average loss does).

    Reference: none, a baseline without a paper of its own (linear scalarisation of the losses).
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())


class SumWeighting(_SizeOnlyWeighting):
    """Unit weights: the sum of the rows.

    Reference: none, a baseline without a paper of its own (linear scalarisation of the losses).
    """

    def weights_for(self, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return ``1`` each for ``m`` objectives.

        Parameters
        ----------
        m
            Number of objectives (rows of the Jacobian).
        dtype, device
            Those of the result.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``.
        """
        return torch.ones(m, dtype=dtype, device=device)


class Sum(_SizeOnlyAggregator):
    """The sum of the rows (gradient descent on the summed loss).

    Reference: none, a baseline without a paper of its own (linear scalarisation of the losses).
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())


class ConstantWeighting(_SizeOnlyWeighting):
    """Fixed weights given at construction.

    Reference: none, a baseline without a paper of its own (linear scalarisation of the losses).

    Parameters
    ----------
    weights
        One (finite) weight per objective, shape ``[m]``.
    """

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        self._weights = check_vector(weights, "weights")

    @property
    def weights(self) -> Tensor:
        """The fixed weights (float64)."""
        return self._weights.clone()

    def weights_for(self, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the fixed weights for ``m`` objectives.

        Parameters
        ----------
        m
            Number of objectives (rows of the Jacobian).
        dtype, device
            Those of the result.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``.

        Raises
        ------
        ValueError
            If ``m`` differs from the number of fixed weights.
        """
        if m != self._weights.shape[0]:
            raise ValueError(
                f"ConstantWeighting has {self._weights.shape[0]} weights but the Jacobian has {m} "
                "rows (objectives): give one weight per objective."
            )
        return self._weights.to(dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={self._weights.tolist()})"


class Constant(_SizeOnlyAggregator):
    """The rows combined with fixed weights ``wᵀ J``.

    Reference: none, a baseline without a paper of its own (linear scalarisation of the losses).

    Parameters
    ----------
    weights
        See :class:`ConstantWeighting`.
    """

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__(ConstantWeighting(weights))


class RandomWeighting(_SizeOnlyWeighting):
    """Random weights ``softmax(ξ)``, ``ξ ~ N(0, I)``, drawn anew at every call.

    Reference: Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022. The draws come from a private CPU ``torch.Generator`` so
    that they are reproducible and checkpointable (``state_dict`` holds the generator state).

    Parameters
    ----------
    seed
        Seed of the generator; ``None`` draws one from PyTorch's global generator, so that
        ``torch.manual_seed`` makes the sequence reproducible too.
    """

    def __init__(self, seed: int | None = None) -> None:
        seed = check_seed(seed)
        self.seed = seed
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def weights_for(self, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return ``softmax(ξ)`` of a new draw ``ξ ~ N(0, I)`` for ``m`` objectives.

        Parameters
        ----------
        m
            Number of objectives (rows of the Jacobian).
        dtype, device
            Those of the result.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``.
        """
        noise = torch.randn(m, generator=self._generator, dtype=torch.float64)
        return torch.softmax(noise, dim=0).to(dtype=dtype, device=device)

    def reset(self) -> None:
        """Re-seed the generator: the draws start over."""
        self._generator.manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        """The seed and the state of the generator.

        Returns
        -------
        dict
            Keys ``"seed"`` and ``"generator_state"``.
        """
        return {"seed": self.seed, "generator_state": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Parameters
        ----------
        state
            A dictionary returned by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If a key is missing.
        """
        missing = {"seed", "generator_state"} - set(state)
        if missing:
            raise ValueError(
                f"RandomWeighting state is missing {sorted(missing)}; pass what state_dict() returned."
            )
        self.seed = int(state["seed"])
        self._generator.set_state(state["generator_state"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class Random(_SizeOnlyAggregator):
    """The rows combined with random positive weights summing to 1 (Lin et al., TMLR 2022).

    Parameters
    ----------
    seed
        See :class:`RandomWeighting`.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(RandomWeighting(seed))
