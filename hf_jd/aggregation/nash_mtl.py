"""Nash-MTL: the Nash bargaining solution among objectives.

Reference: A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik and
E. Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022 (arXiv 2202.01017).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._alpha_fair import solve_alpha_fair
from ._base import GramianWeightedAggregator, Weighting
from ._simplex import gramian_to_numpy, weights_to_tensor

__all__ = ["NashMTLWeighting", "NashMTL"]


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}.")
    return value


class NashMTLWeighting(Weighting):
    """Weights of Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution.

    The update ``d = Jᵀα`` maximises ``Σ_i log(g_iᵀd)`` in a ball; its optimality condition is

    .. math::  (G α)_i = 1 / α_i, \\qquad α > 0,

    with ``G = J Jᵀ``. The authors approach it by a sequence of convex approximations solved with
    CVXPY. Here it is solved without CVXPY, exactly: the condition is the stationarity condition of
    the concave program ``max_d Σ_i log(g_iᵀd) - ½|d|²`` over the row space of ``J``, solved by
    damped Newton ascent from the min-norm point of the convex hull of the rows, for at most
    ``optim_niter`` Newton steps (see :mod:`hf_jd.aggregation._alpha_fair`; this is FairGrad with
    ``α = 1``). At the solution ``|d|² = αᵀGα = m``.

    As in the reference implementation:

    * the weights are recomputed every ``update_weights_every`` calls and reused in between;
    * if ``max_norm`` is set and ``|d| = sqrt(αᵀGα)`` exceeds it, the weights are scaled so that
      ``|d| = max_norm`` (the authors clip the gradient norm of the shared parameters);
    * if the problem has no solution (no direction has a positive inner product with every
      non-zero row, e.g. two opposite rows) the previous weights are reused, or zeros (no update)
      on the first call. Zero rows get weight ``0``.

    Stateful: it keeps the last computed (unclipped) weights and the number of calls.

    Parameters
    ----------
    n_tasks
        Expected number of objectives ``m``; when given, a Gramian of another size is an error.
    max_norm
        Upper bound on the norm of the update ``wᵀJ``, or ``None`` for no bound.
    update_weights_every
        Recompute the weights every this many calls (``1``: every call).
    optim_niter
        Maximum number of Newton steps per computation.

    Raises
    ------
    TypeError
        If an argument does not have the type given above.
    ValueError
        If ``n_tasks``, ``update_weights_every`` or ``optim_niter`` is not positive, or
        ``max_norm`` not finite and positive.
    """

    def __init__(
        self,
        n_tasks: int | None = None,
        max_norm: float | None = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        if n_tasks is not None:
            _check_positive_int(n_tasks, "n_tasks")
        if max_norm is not None:
            if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
                raise TypeError(
                    f"max_norm must be a positive number or None, got {type(max_norm).__name__}."
                )
            if not math.isfinite(max_norm) or max_norm <= 0:
                raise ValueError(
                    "max_norm must be a finite positive number, or None to disable clipping; "
                    f"got {max_norm}."
                )
            max_norm = float(max_norm)
        self.n_tasks = n_tasks
        self.max_norm = max_norm
        self.update_weights_every = _check_positive_int(
            update_weights_every, "update_weights_every"
        )
        self.optim_niter = _check_positive_int(optim_niter, "optim_niter")
        self._step = 0
        self._previous: np.ndarray | None = None

    def compute(self, gramian: Tensor) -> Tensor:
        """The Nash-MTL weights of ``gramian`` (the previous ones between updates).

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
            If ``m`` differs from ``n_tasks`` or from the number of rows of the previous weights.
        """
        m = gramian.shape[0]
        if self.n_tasks is not None and m != self.n_tasks:
            raise ValueError(
                f"NashMTLWeighting was built with n_tasks={self.n_tasks} but received a Gramian "
                f"of {m} rows (objectives). Pass n_tasks={m} (or None)."
            )
        if self._previous is not None and self._previous.shape[0] != m:
            raise ValueError(
                f"NashMTLWeighting holds previous weights for {self._previous.shape[0]} rows "
                f"(objectives) but received a Gramian of {m} rows: they cannot be reused. Call "
                "reset() before changing the number of rows."
            )
        array = gramian_to_numpy(gramian)
        if self._previous is None or self._step % self.update_weights_every == 0:
            precision = torch.finfo(gramian.dtype).eps
            solution = solve_alpha_fair(array, 1.0, max_iter=self.optim_niter, precision=precision)
            if solution is not None:
                self._previous = solution
        self._step += 1
        weights = np.zeros(m) if self._previous is None else self._previous.copy()
        if self.max_norm is not None:
            norm = math.sqrt(max(float(weights @ array @ weights), 0.0))
            if norm > self.max_norm:
                weights *= self.max_norm / norm
        return weights_to_tensor(weights, gramian)

    def reset(self) -> None:
        """Forget the previous weights and restart the count of calls."""
        self._step = 0
        self._previous = None

    def state_dict(self) -> dict[str, Any]:
        """The count of calls and the previous weights.

        Returns
        -------
        dict
            Keys ``"step"`` and ``"previous_weights"`` (a tensor, or ``None``).
        """
        previous = None if self._previous is None else torch.from_numpy(self._previous.copy())
        return {"step": self._step, "previous_weights": previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Parameters
        ----------
        state
            A dictionary returned by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If the keys or the values are not those :meth:`state_dict` produces.
        """
        if set(state) != {"step", "previous_weights"}:
            raise ValueError(
                "NashMTLWeighting state must have exactly the keys 'previous_weights' and 'step' "
                f"(from NashMTLWeighting.state_dict()), got {sorted(state)}."
            )
        step, previous = state["step"], state["previous_weights"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"The state's 'step' must be a non-negative int, got {step!r}.")
        if previous is not None:
            if not isinstance(previous, Tensor) or previous.dim() != 1:
                raise ValueError("The state's 'previous_weights' must be None or a 1-D tensor.")
            if self.n_tasks is not None and previous.shape[0] != self.n_tasks:
                raise ValueError(
                    f"The state's 'previous_weights' has {previous.shape[0]} entries but "
                    f"n_tasks={self.n_tasks}."
                )
            previous = previous.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
        self._step = step
        self._previous = previous

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_tasks={self.n_tasks}, max_norm={self.max_norm}, "
            f"update_weights_every={self.update_weights_every}, optim_niter={self.optim_niter})"
        )


class NashMTL(GramianWeightedAggregator):
    """Nash-MTL aggregator (Navon et al., ICML 2022): ``J ↦ αᵀJ`` with ``J Jᵀ α = 1/α``.

    See :class:`NashMTLWeighting` for the solver, the clipping and the state.

    Parameters
    ----------
    n_tasks
        Expected number of objectives ``m``, or ``None``.
    max_norm
        Upper bound on the norm of the update, or ``None`` for no bound.
    update_weights_every
        Recompute the weights every this many calls.
    optim_niter
        Maximum number of Newton steps per computation.
    """

    def __init__(
        self,
        n_tasks: int | None = None,
        max_norm: float | None = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(NashMTLWeighting(n_tasks, max_norm, update_weights_every, optim_niter))
