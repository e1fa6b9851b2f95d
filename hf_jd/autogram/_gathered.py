"""Calls on rows that the data picks from the examples, or lays out in another order: each row's example, found
from gradients.

A module called on a subset of the batch chosen by the data — X-MOD's adapter of one language on
``hidden[lang_ids == k]``, an expert of a mixture on the tokens routed to it, a projection of the non-padded
tokens ``hidden[mask]`` — captures tensors whose rows along ``batch_dim`` are not the examples: neither
``B`` of them nor ``k`` consecutive ones per example. The engine's fallback for such calls back-propagates
every loss row separately (a batched backward pass over the ``R`` rows). But when each row of the call's
output belongs to one example, the gradients of three weighted sums of the losses (weights ``1``, ``w``
and ``w'`` per example, as in :mod:`._matmul_uses`) tell which: a row of example ``e`` gets ``w_e`` and
``w'_e`` times its plain gradient. With each row's example known, the call's inputs and plain output
gradients are scattered into a ``[B, L, ...]`` layout (``L`` the most rows of any example, the others
padded with zeros, which add nothing), and the call is then an ordinary call split by example: its closed
form gives the exact per-example gradients. Linear layers, layer norms, embeddings and convolutions (a
vision-language model's images or crops, a different number per example, run through its vision tower as one
batch) take this path. A row reached by several examples (examples mixed further on) makes the call keep the
per-row pass.

Generic calls with one output take the same check on their output's rows along dimension 0 (Llama-4's experts,
which process every token scaled by its router score, their ``[E * B * T, d]`` rows laid out expert-major): each
example's products then run from the output gradient of its own rows (see :meth:`GenericRecord.take_row_examples`),
or from the factors of the call's matrix products when those apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._accumulate import Accumulator, empty_call
from ._batched_grad import batched_grad
from ._conv import Conv2dRecord
from ._embedding import EmbeddingRecord
from ._generic import GenericRecord
from ._layer_norm import LayerNormRecord
from ._layout import RowLayout
from ._linear import LinearRecord
from ._matmul_uses import RTOL_FLOAT32, check_weights, examples_of_rows
from ._precision import full_float32_precision
from ._record import Record

__all__ = ["add_gathered"]

# Below this many examples the per-row pass (one vector per loss row) costs no more than the three vectors here.
MIN_EXAMPLES = 4


# Closed forms whose calls, with the rows along dimension 0 of their captured input (by attribute name) and of their
# output gradients scattered into a ``[E, L, ...]`` layout, are ordinary calls split by example: position-wise ones (a
# Linear layer, a layer norm over trailing dimensions, an embedding's lookups, ``L`` rows per example; a padding row
# looks up id 0 with a zero gradient), and convolutions, whose samples (images, patches) then come ``L`` per example
# (see Conv2dRecord.split_batch).
_CAPTURED = {LinearRecord: "inputs", LayerNormRecord: "inputs", Conv2dRecord: "inputs", EmbeddingRecord: "ids"}


def _gatherable(record: Record) -> bool:
    """A plain Linear, layer-norm, embedding or convolution call with one output, on at least one row (its rows along
    dimension 0), whose input is not a parameter (a layer norm's table) nor already grouped, or a generic call with
    one output on its usual path (see :meth:`GenericRecord.can_take_row_examples`)."""
    if isinstance(record, GenericRecord):  # (an RMS norm's too: its closed form then gives way, see RMSNormRecord)
        return record.can_take_row_examples()
    captured = _CAPTURED.get(type(record))
    return (
        captured is not None
        and len(record.edges) == 1
        and isinstance(getattr(record, captured, None), Tensor)
        and getattr(record, "group", None) is None
        and getattr(record, "inverse_std", None) is None
        and not any(name not in ("weight", "bias") for name in record.params)
        and not empty_call(record)
    )


def _padded(rows: Tensor, examples: Tensor, num_examples: int) -> Tensor:
    """``rows [N, ...]`` scattered into ``[E, L, ...]`` by their examples (``-1``: left out), zeros elsewhere."""
    keep = examples >= 0
    rows, examples = rows[keep], examples[keep]
    counts = torch.bincount(examples, minlength=num_examples)
    longest = max(int(counts.max()), 1) if examples.numel() else 1
    order = torch.argsort(examples, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(examples.numel(), device=rows.device) - starts[examples[order]]
    padded = rows.new_zeros(num_examples, longest, *rows.shape[1:])
    padded[examples[order], slots] = rows[order]
    return padded


def add_gathered(
    losses: Tensor, layout: RowLayout, records: Sequence[Record], accumulator: Accumulator, declined: set[int]
) -> list[Record]:
    """Add the Linear and generic calls among ``records`` whose output rows each belong to one example (found by one
    batched backward pass over three vectors), as calls split by example; return the others (for the per-row pass).

    Parameters
    ----------
    losses
        The per-example losses ``[B]`` or ``[B, m]`` (graph retained).
    layout
        Their row layout (``batch_dim`` 0).
    records
        Calls not split by example along ``batch_dim``.
    accumulator
        Receives the contributions of the calls it takes.
    declined
        Ids of modules whose rows were reached by several examples on an earlier step (the examples are mixed after
        them, e.g. by an in-batch contrastive loss): not tried again. Those found so now are added to it.

    Returns
    -------
    list of Record
        The calls not taken.
    """
    num_examples, num_tasks = layout.num_examples, layout.num_tasks
    candidates = [record for record in records if _gatherable(record) and id(record.module) not in declined]
    if layout.batch_dim != 0 or num_examples < MIN_EXAMPLES or not candidates:
        return list(records)
    weights = check_weights(num_examples).to(dtype=losses.dtype, device=losses.device)  # [2, E]
    # The check's three weighted sums (each example's weight on all its tasks), then for [B, m] losses one vector per
    # task (the rows' gradients of each task).
    scales = torch.cat([torch.ones_like(weights[:1]), weights])  # [3, E]
    vectors = scales.view(3, num_examples, 1).expand(3, num_examples, num_tasks)
    if num_tasks > 1:
        tasks = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
        vectors = torch.cat([vectors, tasks.view(num_tasks, 1, num_tasks).expand(num_tasks, num_examples, num_tasks)])
    vectors = vectors.reshape(vectors.shape[0], *losses.shape)
    with full_float32_precision(losses.device):
        grads = batched_grad(losses, [record.edges[0] for record in candidates], vectors)
    taken: set[int] = set()
    for record, base_grad in zip(candidates, grads):
        (grad,) = record.to_view_shapes([base_grad])  # ([3 (+ m), *output shape])
        if grad is None or grad.dim() < 2 or grad.dtype not in (torch.float32, torch.float64):
            continue  # (low precision: its rounding would hide rows of several examples; the per-row pass then)
        dtype = grad.dtype
        rtol = RTOL_FLOAT32 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
        # (each row's entries, [3, N, F]; one entry per row for a 1-D output, e.g. a parametrised bias)
        examples = examples_of_rows(grad[:3].reshape(3, grad.shape[1], -1), weights.to(dtype), rtol)
        if examples is None:
            declined.add(id(record.module))  # (a row reached by several examples)
            continue
        rows = grad[:1] if num_tasks == 1 else grad[3:]  # [m, *output shape]
        if isinstance(record, GenericRecord):
            # (its products run from the output, each example's from the entries of its rows)
            record.take_row_examples(examples)
            accumulator.add(record, [rows], shaped=True)
            taken.add(id(record))
            continue
        captured = _CAPTURED[type(record)]
        setattr(record, captured, _padded(getattr(record, captured), examples, num_examples))
        per_task = torch.stack([_padded(task_rows, examples, num_examples) for task_rows in rows])
        if isinstance(record, Conv2dRecord):  # (samples [E * L, C, ...], L per example, the padding ones zero)
            record.inputs = record.inputs.flatten(0, 1)
            record.group = per_task.shape[2]
        accumulator.add(record, [per_task], shaped=True)
        taken.add(id(record))
    return [record for record in records if id(record) not in taken]
