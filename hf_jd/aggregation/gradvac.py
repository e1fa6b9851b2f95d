"""GradVac: Gradient Vaccine.

Reference: Z. Wang, Y. Tsvetkov, O. Firat and Y. Cao, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021 (arXiv 2010.05874).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._base import GramianWeightedAggregator, Weighting
from ._generator import SeededGenerator, random_orders
from ._simplex import ZERO_ROW_RTOL, gramian_to_numpy, nonzero_rows, weights_to_tensor

__all__ = ["GradVacWeighting", "GradVac", "gradvac_weights"]


def gradvac_weights(
    gramian: np.ndarray,
    targets: np.ndarray,
    orders: Sequence[Sequence[int]] | np.ndarray,
    beta: float,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the GradVac weights and the updated targets for the given orders.

    ``orders[i]`` lists the ``m - 1`` indices other than ``i`` in the order row ``i`` visits them.

    Row ``i`` starts as ``g_i = e_iᵀJ`` (coefficients ``c_i = e_i``). For each ``j`` of
    ``orders[i]`` in turn, with ``g_i' = c_iᵀJ``, the cosine ``φ_ij = cos(g_i', g_j)`` is computed
    from ``G``; if ``φ_ij < φ̂_ij`` (the target ``targets[i, j]``) then
    ``c_i[j] += |g_i'| (φ̂_ij sqrt(1-φ_ij²) - φ_ij sqrt(1-φ̂_ij²)) / (|g_j| sqrt(1-φ̂_ij²))``, which
    makes ``cos(g_i', g_j) = φ̂_ij``; then ``φ̂_ij ← (1-β) φ̂_ij + β φ_ij``. The weights are
    ``Σ_i c_i``. ``sqrt(1-φ̂²)`` is bounded below by ``epsilon``. Pairs where ``g_i'`` or ``g_j``
    is zero are skipped (the cosine is undefined), and their target is unchanged. The rows are
    processed together, keeping ``G c_i`` up to date: ``O(m³)`` operations.

    Parameters
    ----------
    gramian
        Float64 Gramian, shape ``[m, m]``.
    targets
        Target cosines ``φ̂``, shape ``[m, m]``.
    orders
        Visiting orders, shape ``[m, m - 1]``.
    beta
        EMA rate of the targets.
    epsilon
        Lower bound on ``sqrt(1 - φ̂²)``.

    Returns
    -------
    tuple of numpy.ndarray
        The weights (shape ``[m]``) and the updated targets (shape ``[m, m]``).
    """
    m = gramian.shape[0]
    order_array = np.asarray(orders, dtype=np.intp).reshape(m, m - 1)
    targets = targets.copy()
    diagonal = np.diag(gramian)
    nonzero = nonzero_rows(gramian)
    norm_floor = ZERO_ROW_RTOL * max(float(diagonal.max()), 0.0)
    rows = np.arange(m)
    coefficients = np.eye(m)
    products = gramian.copy()  # row i: Gc_i, the inner products of g_i' with every g_j
    norms_sq = diagonal.copy()  # row i: |g_i'|² = c_iᵀGc_i, updated with each change
    # All rows are processed at once: step k handles the pair (i, orders[i][k]) for every i.
    for step in range(m - 1):
        columns = order_array[:, step]
        valid = nonzero[columns] & (norms_sq > norm_floor)
        norm_i = np.sqrt(np.where(valid, norms_sq, 1.0))
        norm_j = np.sqrt(np.where(valid, diagonal[columns], 1.0))
        inner = products[rows, columns]
        cosine = np.where(valid, np.clip(inner / (norm_i * norm_j), -1.0, 1.0), 0.0)
        target = targets[rows, columns]
        target_sine = np.maximum(np.sqrt(np.clip(1.0 - target**2, 0.0, None)), epsilon)
        sine = np.sqrt(np.clip(1.0 - cosine**2, 0.0, None))
        change = norm_i * (target * sine - cosine * target_sine) / (norm_j * target_sine)
        change = np.where(valid & (cosine < target), change, 0.0)
        targets[rows, columns] = np.where(valid, (1.0 - beta) * target + beta * cosine, target)
        # Only the rows whose cosine was raised change (O(m) each).
        changed = np.flatnonzero(change)
        if changed.size == 0:
            continue
        picked, delta = columns[changed], change[changed]
        coefficients[changed, picked] += delta
        # |c + δ e_j|²_G = |c|²_G + 2δ (Gc)_j + δ² G_jj, with (Gc)_j = inner before the change.
        norms_sq[changed] += delta * (2.0 * inner[changed] + delta * diagonal[picked])
        products[changed] += delta[:, None] * gramian[picked]
    return coefficients.sum(axis=0), targets


class GradVacWeighting(Weighting):
    """Weights of GradVac (Wang et al., ICLR 2021), computed from the Gramian.

    GradVac keeps, for every ordered pair of objectives, a target cosine similarity ``φ̂_ij``:
    an exponential moving average (decay ``β``) of the observed cosines, starting at ``0``. For
    every objective ``i`` it visits the other objectives ``j`` in a random order, and whenever
    ``φ_ij = cos(g_i', g_j) < φ̂_ij`` it adds a multiple of ``g_j`` to ``g_i'`` so that the cosine
    becomes exactly ``φ̂_ij``:

    .. math::  g_i' \\leftarrow g_i' + \\frac{|g_i'| (\\hat φ_{ij} \\sqrt{1-φ_{ij}^2}
               - φ_{ij} \\sqrt{1-\\hat φ_{ij}^2})}{|g_j| \\sqrt{1-\\hat φ_{ij}^2}} g_j,
       \\qquad \\hat φ_{ij} \\leftarrow (1-β) \\hat φ_{ij} + β φ_{ij}.

    The update is ``Σ_i g_i'``. With ``φ̂ = 0`` the correction is PCGrad's projection. The paper
    applies this per parameter group; here it is applied to the whole rows, and everything
    depends on ``J`` only through ``G = J Jᵀ`` (see :func:`gradvac_weights`).

    Stateful: the targets (an ``[m, m]`` matrix, created at the first call) and the generator of
    the orders (seeded with ``seed``; ``None`` draws a seed from PyTorch's global generator).

    Parameters
    ----------
    beta
        EMA rate ``β ∈ [0, 1]`` of the targets (``β`` in the paper).
    epsilon
        Lower bound on ``sqrt(1 - φ̂²)``, avoiding a division by zero when ``φ̂ = ±1``.
    seed
        Seed of the generator of the orders.

    Raises
    ------
    TypeError
        If ``beta`` or ``epsilon`` is not a number, or ``seed`` neither an ``int`` nor ``None``.
    ValueError
        If ``beta`` is outside ``[0, 1]``, ``epsilon`` not finite and positive, or ``seed`` negative.
    """

    def __init__(self, beta: float = 0.5, epsilon: float = 1e-8, seed: int | None = None) -> None:
        for name, value in (("beta", beta), ("epsilon", epsilon)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(
                f"beta must be in [0, 1] (the EMA rate of the target cosines), got {beta}."
            )
        if not math.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(f"epsilon must be a finite positive number, got {epsilon}.")
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        self._generator = SeededGenerator(seed)
        self._targets: np.ndarray | None = None

    @property
    def seed(self) -> int:
        """The seed of the generator of the orders."""
        return self._generator.seed

    @property
    def targets(self) -> Tensor | None:
        """A copy of the current target cosines ``φ̂`` (``None`` before the first call)."""
        return None if self._targets is None else torch.from_numpy(self._targets.copy())

    def compute(self, gramian: Tensor) -> Tensor:
        """The GradVac weights of ``gramian``; updates the target cosines.

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
            If the number of rows differs from that of the previous calls (call :meth:`reset` first).
        """
        m = gramian.shape[0]
        if self._targets is None:
            targets = np.zeros((m, m))
        elif self._targets.shape[0] != m:
            raise ValueError(
                f"GradVacWeighting holds target cosines for {self._targets.shape[0]} rows "
                f"(objectives) but received a Gramian of {m} rows: its targets are per pair of "
                "rows, so the number of rows cannot change between calls. Call reset() first "
                "(the targets restart from 0)."
            )
        else:
            targets = self._targets
        generator = self._generator.get("cpu")
        orders = random_orders(m, generator)
        weights, self._targets = gradvac_weights(
            gramian_to_numpy(gramian), targets, orders, self.beta, self.epsilon
        )
        return weights_to_tensor(weights, gramian)

    def reset(self) -> None:
        """Restart the target cosines from 0 and the orders from the seed."""
        self._targets = None
        self._generator.reset()

    def state_dict(self) -> dict[str, Any]:
        """The target cosines and the state of the generator of the orders.

        Returns
        -------
        dict
            Keys ``"targets"`` (a tensor, or ``None`` before the first call) and ``"generator"``.
        """
        return {"targets": self.targets, "generator": self._generator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Parameters
        ----------
        state
            A dictionary returned by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If the keys or the targets are not those :meth:`state_dict` produces.
        """
        if not isinstance(state, dict) or set(state) != {"targets", "generator"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                "GradVacWeighting state must have exactly the keys 'generator' and 'targets' "
                f"(from GradVacWeighting.state_dict()), got {keys}."
            )
        targets = state["targets"]
        if targets is not None:
            if (
                not isinstance(targets, Tensor)
                or targets.dim() != 2
                or targets.shape[0] != targets.shape[1]
            ):
                raise ValueError("The state's 'targets' must be None or a square 2-D tensor.")
            targets = targets.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
        self._generator.load_state_dict(state["generator"])
        self._targets = targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, epsilon={self.epsilon}, seed={self.seed})"


class GradVac(GramianWeightedAggregator):
    """GradVac aggregator (Wang et al., ICLR 2021); see :class:`GradVacWeighting`.

    Parameters
    ----------
    beta
        EMA rate of the target cosine similarities.
    epsilon
        Lower bound on ``sqrt(1 - φ̂²)``.
    seed
        Seed of the generator of the orders.
    """

    def __init__(self, beta: float = 0.5, epsilon: float = 1e-8, seed: int | None = None) -> None:
        super().__init__(GradVacWeighting(beta, epsilon, seed))
