"""Batched vector-Jacobian products: the engine behind every autojac function.

Given outputs ``y_1, ..., y_k`` and, for each of them, a stack of ``m`` cotangents ``V_j`` (shape
``[m] + y_j.shape``), :func:`batched_vjp` returns, for each input ``x``, the stack of the ``m``
vector-Jacobian products ``sum_j V_j[r] · ∂y_j/∂x`` (shape ``[m] + x.shape``). With identity rows
as cotangents this is the Jacobian.

The ``m`` rows are computed by ``torch.autograd.grad(..., is_grads_batched=True)`` (one backward
pass vectorised with vmap) in chunks of ``parallel_chunk_size`` rows; ``parallel_chunk_size=1``
means a plain loop of single backward passes. If vmap fails because an operation of the graph has
no batching rule, the rows are recomputed with the sequential loop (same result) and a warning is
issued once per process.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ._utils import no_gradient_writes

__all__ = ["batched_vjp", "check_chunk_size"]

_fallback_warned = False


def check_chunk_size(parallel_chunk_size: int | None) -> None:
    """Raise unless ``parallel_chunk_size`` is ``None`` or a positive integer.

    Parameters
    ----------
    parallel_chunk_size
        Number of Jacobian rows computed at once (``None``: all).

    Raises
    ------
    TypeError
        If it is not ``None`` or an int (a bool is refused).
    ValueError
        If it is smaller than 1.
    """
    if parallel_chunk_size is None:
        return
    if isinstance(parallel_chunk_size, bool) or not isinstance(parallel_chunk_size, int):
        raise TypeError(
            "parallel_chunk_size must be None (all rows at once) or a positive int, got "
            f"{type(parallel_chunk_size).__name__}."
        )
    if parallel_chunk_size < 1:
        raise ValueError(
            f"parallel_chunk_size must be None (all rows at once) or >= 1, got {parallel_chunk_size}."
        )


def _fill_unused(
    grads: Sequence[Tensor | None], inputs: Sequence[Tensor], rows: int | None
) -> list[Tensor]:
    """Replace ``None`` gradients (input not reached) by zeros of the right (batched) shape."""
    filled = []
    for grad, tensor in zip(grads, inputs):
        if grad is None:
            shape = tensor.shape if rows is None else (rows, *tensor.shape)
            grad = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        filled.append(grad)
    return filled


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    retain_graph: bool,
    batched: bool,
) -> list[Tensor]:
    with no_gradient_writes(inputs, lambda index: f"inputs[{index}]"):
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=cotangents,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
    rows = cotangents[0].shape[0] if batched else None
    return _fill_unused(grads, inputs, rows)


class _RowWriter:
    """Writes blocks of rows into one preallocated ``[m] + x.shape`` tensor per input."""

    def __init__(self, inputs: Sequence[Tensor], num_rows: int) -> None:
        self._num_rows = num_rows
        self._results: list[Tensor | None] = [None] * len(inputs)

    def write(self, start: int, grads: Sequence[Tensor], batched: bool) -> None:
        stop = start + (grads[0].shape[0] if batched else 1)
        for index, grad in enumerate(grads):
            if batched and start == 0 and stop == self._num_rows:
                self._results[index] = grad  # one block holds every row: no copy needed
                continue
            result = self._results[index]
            if result is None:
                shape = (self._num_rows, *(grad.shape[1:] if batched else grad.shape))
                result = torch.empty(shape, dtype=grad.dtype, device=grad.device)
                self._results[index] = result
            result[start:stop] = grad if batched else grad.unsqueeze(0)

    def results(self) -> tuple[Tensor, ...]:
        results = tuple(result for result in self._results if result is not None)
        assert len(results) == len(self._results)
        return results


def _sequential(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    retain_graph: bool,
) -> tuple[Tensor, ...]:
    """All rows, one ordinary backward pass each."""
    num_rows = cotangents[0].shape[0]
    writer = _RowWriter(inputs, num_rows)
    for row in range(num_rows):
        keep = retain_graph or row < num_rows - 1
        grads = _grad(outputs, inputs, [c[row] for c in cotangents], keep, batched=False)
        writer.write(row, grads, batched=False)
    return writer.results()


def _warn_fallback(error: RuntimeError) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    warnings.warn(
        f"hf_jd.autojac: the batched (vmap) backward pass failed ({message}), usually because "
        "an operation of the graph has no vmap batching rule (or because memory ran out). "
        "Falling back to one backward pass per row, which gives the same result more slowly. "
        "Pass parallel_chunk_size=1 to use the sequential loop directly (or a small chunk size "
        "if memory ran out). This warning is shown once.",
        RuntimeWarning,
        stacklevel=4,
    )


def batched_vjp(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    *,
    retain_graph: bool,
    parallel_chunk_size: int | None,
) -> tuple[Tensor, ...]:
    """Return the stacked vector-Jacobian products of ``outputs`` w.r.t. ``inputs``.

    Parameters
    ----------
    outputs
        Tensors ``y_j`` to back-propagate from.
    inputs
        Tensors ``x`` to differentiate with respect to (leaves or not); each must require grad.
    cotangents
        One tensor per output, of shape ``[m] + y_j.shape``: row ``r`` of every cotangent forms the
        ``r``-th vector of the product.
    retain_graph
        Keep the graph after the last backward pass. When all rows are computed by a single
        batched pass, the graph is always kept (so that the sequential fallback can still run if
        vmap fails); it is then freed when the outputs are garbage-collected, as usual.
    parallel_chunk_size
        Rows per batched backward pass; ``None``: all ``m`` rows at once; ``1``: sequential loop.

    Returns
    -------
    tuple[Tensor, ...]
        For each input, a tensor of shape ``[m] + x.shape``; zeros where ``x`` is not reached.
    """
    num_rows = cotangents[0].shape[0]
    chunk = num_rows if parallel_chunk_size is None else min(parallel_chunk_size, num_rows)
    if chunk == 1:
        return _sequential(outputs, inputs, cotangents, retain_graph)

    writer = _RowWriter(inputs, num_rows)
    start = 0
    while start < num_rows:
        stop = min(start + chunk, num_rows)
        # The first batched pass keeps the graph whatever the caller asked: it is the one that
        # finds out whether vmap works, and the fallback needs the graph intact.
        keep = retain_graph or stop < num_rows or start == 0
        chunk_cotangents = [c[start:stop] for c in cotangents]
        try:
            grads = _grad(outputs, inputs, chunk_cotangents, keep, batched=True)
        except RuntimeError as error:
            if start != 0:
                raise
            results = _sequential(outputs, inputs, cotangents, retain_graph)
            _warn_fallback(error)
            return results
        writer.write(start, grads, batched=True)
        start = stop
    return writer.results()
