"""Krum and Multi-Krum: Byzantine-robust selection of gradients.

Reference: P. Blanchard, E. M. El Mhamdi, R. Guerraoui and J. Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. With ``f`` Byzantine rows among
``m > 2f + 2``, each row ``i`` gets the score ``sᵢ = Σ_{j ∈ Nᵢ} ‖gᵢ − gⱼ‖²`` over its ``m − f − 2``
nearest other rows ``Nᵢ``; Krum returns the row of lowest score and Multi-Krum the mean of the
``n_selected`` rows of lowest scores. Distances come from the Gramian:
``‖gᵢ − gⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2 Gᵢⱼ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting

__all__ = ["Krum", "KrumWeighting"]


def _check_count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


class KrumWeighting(Weighting):
    """Weighting of :class:`Krum`: ``1 / n_selected`` on the selected rows, ``0`` elsewhere.

    Ties between equal scores are broken by the lower row index.

    Reference: Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS 2017 (Krum and Multi-Krum).

    Parameters
    ----------
    n_byzantine
        Number ``f ≥ 0`` of rows that may be adversarial; requires ``m > 2f + 2`` rows.
    n_selected
        Number of rows averaged (1: Krum; more: Multi-Krum); requires ``n_selected ≤ m``.
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        self.n_byzantine = _check_count(n_byzantine, "n_byzantine", 0)
        self.n_selected = _check_count(n_selected, "n_selected", 1)

    def compute(self, gramian: Tensor) -> Tensor:
        """The (Multi-)Krum weights of ``gramian``, from the pairwise distances of the rows.

        Parameters
        ----------
        gramian
            A Gramian ``J Jᵀ`` of shape ``[m, m]`` that passed :func:`check_gramian`.

        Returns
        -------
        Tensor
            The weights, shape ``[m]``, with the dtype and device of ``gramian``.

        Raises
        ------
        ValueError
            If ``m ≤ 2·n_byzantine + 2`` or ``n_selected > m``.
        """
        m = gramian.shape[0]
        f = self.n_byzantine
        if m <= 2 * f + 2:
            raise ValueError(
                f"Krum with n_byzantine={f} needs more than 2*n_byzantine+2 = {2 * f + 2} rows, got "
                f"m={m}. Use more objectives or a smaller n_byzantine."
            )
        if self.n_selected > m:
            raise ValueError(
                f"Krum cannot select n_selected={self.n_selected} rows out of m={m}; use "
                f"n_selected <= {m}."
            )
        g = gramian.to(torch.float64)
        diagonal = g.diagonal()
        distances = (diagonal.unsqueeze(0) + diagonal.unsqueeze(1) - 2 * g).clamp_min(0)
        distances.fill_diagonal_(float("inf"))  # a row is not its own neighbour
        n_neighbours = m - f - 2
        nearest = torch.sort(distances, dim=1).values[:, :n_neighbours]
        scores = nearest.sum(dim=1)
        selected = torch.sort(scores, stable=True).indices[: self.n_selected]
        weights = torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        weights[selected.to(gramian.device)] = 1.0 / self.n_selected
        return weights

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_byzantine={self.n_byzantine}, n_selected={self.n_selected})"


class Krum(GramianWeightedAggregator):
    """Krum / Multi-Krum aggregator (Blanchard et al., NeurIPS 2017).

    Parameters
    ----------
    n_byzantine, n_selected
        See :class:`KrumWeighting`.
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))

    def __repr__(self) -> str:
        return repr(self.weighting).replace(type(self.weighting).__name__, type(self).__name__, 1)
