"""``jac_to_grad``: aggregate the ``.jac`` of parameters into their ``.grad`` with an aggregator."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from hf_jd.aggregation import Aggregator
from hf_jd.aggregation._base import (
    FLOAT32_GRAMIAN_FLOOR,
    LOW_PRECISION_DTYPES,
    update_is_weighted_rows,
    weighted_rows,
)

from ._accumulate import accumulate_grad, get_jac

__all__ = ["jac_to_grad"]


def _checked_params(params: Iterable[Tensor]) -> tuple[tuple[Tensor, ...], list[Tensor], int]:
    """Validate the parameters and return them, their Jacobians and the number of rows ``m``."""
    if isinstance(params, Tensor):
        params = (params,)
    if not isinstance(params, Iterable):
        raise TypeError(
            f"params must be an iterable of tensors (e.g. model.parameters()), got "
            f"{type(params).__name__}."
        )
    param_tuple = tuple(params)
    if not param_tuple:
        raise ValueError("params is empty: pass the parameters whose .jac should be aggregated.")
    seen: set[int] = set()
    jacobians = []
    num_rows: int | None = None
    for index, param in enumerate(param_tuple):
        if not isinstance(param, Tensor):
            raise TypeError(f"params[{index}] must be a tensor, got {type(param).__name__}.")
        if id(param) in seen:
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) appears more than once; pass each "
                "parameter once."
            )
        seen.add(id(param))
        if not param.requires_grad:
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) does not require grad; only "
                "trainable parameters can receive a .grad. Leave it out."
            )
        jacobian = get_jac(param)
        if jacobian is None:
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) has no .jac: call "
                "hf_jd.autojac.backward or mtl_backward first, and pass only parameters they "
                "reached."
            )
        if not isinstance(jacobian, Tensor) or jacobian.dim() == 0:
            raise ValueError(f"params[{index}].jac must be a tensor of shape [m] + param.shape.")
        if not jacobian.dtype.is_floating_point:
            raise TypeError(
                f"params[{index}].jac has dtype {jacobian.dtype}: Jacobians must be floating-point (the weights and "
                "the update are). Store it in the parameter's dtype."
            )
        if tuple(jacobian.shape[1:]) != tuple(param.shape):
            raise ValueError(
                f"params[{index}].jac has shape {tuple(jacobian.shape)}, which is not [m] + "
                f"{tuple(param.shape)} (the parameter's shape)."
            )
        if not bool(torch.isfinite(jacobian).all()):
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) has a .jac with non-finite entries (inf or nan): a loss "
                "or its gradient is not finite. Check the losses (and the learning rate) before the backward pass."
            )
        if num_rows is None:
            num_rows = jacobian.shape[0]
        elif jacobian.shape[0] != num_rows:
            raise ValueError(
                f"params[{index}].jac has {jacobian.shape[0]} rows but params[0].jac has "
                f"{num_rows}: all Jacobians must come from the same objectives. Call backward on "
                "all the losses at once."
            )
        jacobians.append(jacobian)
    assert num_rows is not None
    if num_rows == 0:
        raise ValueError("The .jac tensors have 0 rows: there is no objective to aggregate.")
    return param_tuple, jacobians, num_rows


def _gramian(matrices: list[Tensor]) -> Tensor:
    """Return ``J Jᵀ`` for ``J`` the column-wise concatenation of ``matrices``, without building J.

    In the widest dtype of the matrices, at least float32 (parameters of mixed dtypes: the float64 blocks are not
    rounded to float32, whatever the order of the parameters); a float32 Gramian that overflows, or is
    below ``1e-30`` for a non-zero ``J``, is computed in float64 instead (as
    :func:`hf_jd.aggregation.compute_gramian` does for a whole matrix)."""
    dtype = torch.float64 if any(matrix.dtype == torch.float64 for matrix in matrices) else matrices[0].dtype
    if dtype in LOW_PRECISION_DTYPES:
        dtype = torch.float32
    gramian = _gramian_in(matrices, dtype)
    if dtype == torch.float32:
        largest = gramian.diagonal().abs().max()
        if not bool(torch.isfinite(largest)) or (
            bool(largest < FLOAT32_GRAMIAN_FLOOR) and any(bool((matrix != 0).any()) for matrix in matrices)
        ):
            gramian = _gramian_in(matrices, torch.float64)
    return (gramian + gramian.T) / 2


def _gramian_in(matrices: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``Σ_p J_p J_pᵀ`` accumulated in ``dtype`` on the first matrix's device."""
    device = matrices[0].device
    num_rows = matrices[0].shape[0]
    gramian = torch.zeros(num_rows, num_rows, dtype=dtype, device=device)
    for matrix in matrices:
        block = matrix.to(dtype)
        gramian += (block @ block.T).to(device)
    return gramian


def jac_to_grad(
    params: Iterable[Tensor],
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
) -> Tensor | None:
    r"""Aggregate the Jacobians stored in ``.jac`` into ``.grad``: one step of Jacobian descent.

    The ``.jac`` tensors (shape ``[m] + p.shape``) of ``params`` are seen, in order, as the
    column blocks of one matrix :math:`J \in \mathbb{R}^{m \times n}`. The aggregator maps
    :math:`J` to an update vector of :math:`\mathbb{R}^n` (Quinton & Rey, "Jacobian Descent For
    Multi-Objective Optimization", arXiv:2406.16232), which is split back per parameter and added
    to ``.grad``, so that any ``torch.optim`` optimizer can then take the step.

    For a :class:`~hf_jd.aggregation.GramianWeightedAggregator` (e.g. ``UPGrad``), :math:`J` is
    never concatenated: the Gramian :math:`J J^\top = \sum_p J_p J_p^\top` is accumulated block by
    block (in float32 at least), the weights :math:`w` come from ``aggregator.weighting`` and each
    parameter receives :math:`w^\top J_p` (float32 Gramians that overflow or underflow are redone in
    float64). Other aggregators, and subclasses that override ``aggregate``, receive the
    concatenated :math:`J`.

    Parameters
    ----------
    params
        The parameters whose ``.jac`` to aggregate, e.g. ``model.parameters()``. Each must require
        grad, have a ``.jac``, and all ``.jac`` must have the same number of rows ``m``.
    aggregator
        The aggregator, e.g. ``hf_jd.aggregation.UPGrad()``.
    retain_jac
        Keep the ``.jac`` attributes (by default they are deleted, like the graph after backward).

    Returns
    -------
    Tensor or None
        The weights ``w`` (shape ``[m]``) for a Gramian-weighted aggregator (whose ``aggregate`` is
        not overridden), else ``None``.

    Raises
    ------
    ValueError
        If ``params`` is empty or repeats a tensor, a parameter does not require grad or has no
        ``.jac``, a ``.jac`` has the wrong shape, or the ``.jac`` do not all have ``m`` rows.
    TypeError
        If ``aggregator`` is not an :class:`~hf_jd.aggregation.Aggregator`, or a ``.jac`` is not
        floating-point.

    Examples
    --------
    >>> import torch
    >>> from hf_jd.aggregation import GramianWeightedAggregator, Weighting
    >>> from hf_jd.autojac import backward, jac_to_grad
    >>> class Average(Weighting):
    ...     def compute(self, gramian):
    ...         return torch.full_like(gramian[0], 1 / gramian.shape[0])
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> backward(torch.stack([w.sum(), w @ w]))
    >>> jac_to_grad([w], GramianWeightedAggregator(Average()))
    tensor([0.5000, 0.5000])
    >>> w.grad
    tensor([1.5000, 2.5000])
    >>> hasattr(w, "jac")
    False
    """
    if isinstance(aggregator, type) and issubclass(aggregator, Aggregator):
        raise TypeError(
            f"aggregator is the class {aggregator.__name__}, not an aggregator: pass an instance, e.g. "
            f"{aggregator.__name__}()."
        )
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            "aggregator must be an hf_jd.aggregation.Aggregator (e.g. UPGrad()), got "
            f"{type(aggregator).__name__}."
        )
    param_tuple, jacobians, num_rows = _checked_params(params)
    with torch.no_grad():
        matrices = [jacobian.detach().reshape(num_rows, -1) for jacobian in jacobians]
        weights: Tensor | None = None
        if update_is_weighted_rows(aggregator):
            weights = aggregator.weighting(_gramian(matrices))
            updates = [weighted_rows(weights, matrix) for matrix in matrices]
        else:
            matrix = matrices[0] if len(matrices) == 1 else torch.cat(matrices, dim=1)
            update = aggregator(matrix)
            if update.untyped_storage().data_ptr() == matrix.untyped_storage().data_ptr():
                update = update.clone()  # a view of J would keep the whole Jacobian alive
            updates = list(update.split([m.shape[1] for m in matrices]))
        for param, update in zip(param_tuple, updates):
            accumulate_grad(param, update.reshape(param.shape))
    if not retain_jac:
        for param in param_tuple:
            del param.jac  # type: ignore[attr-defined]
    return weights
