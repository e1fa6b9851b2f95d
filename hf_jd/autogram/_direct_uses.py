"""Shorter vector-Jacobian products for generic calls: from the operations that use the parameters.

A generic call's per-example gradients are vector-Jacobian products from its outputs to its parameters
(their aliases), one per example. When the call is a large container that uses a parameter of its own
early on — Wav2Vec2's mask embedding written into the masked frames of its ``[B, T, d]`` features before
the whole encoder, ViT's class token and position table, CLIP's class embedding — those products run
back through everything after that use, once per example. But the gradient w.r.t. the output of the
operation that uses the parameter (``index_put``, ``expand``, ``+``) is already one slice per example in
the ordinary backward pass, when that output is split by example along ``batch_dim``: the call's
vector-Jacobian products can start there instead, through that one operation.

The walk follows each parameter forward through the operations on the parameters alone
(``clamp(logit_scale).exp()`` in Swinv2's attention) to the first operations on every path that take another
input too; all of them must have outputs split by example (one output, ``k`` times the batch size along
``batch_dim`` and the batch size along no other dimension, the same ``k`` for all). Each path from a parameter
to the losses crosses exactly one of them unless one lies upstream of another (a class token concatenated to the
patches before the position table is added: the products from the addition would count the token's use twice);
calls where that holds get those operations' outputs as their edges (the products from them are exact whatever
lies between the parameters and them), the others keep their outputs. With ``k > 1`` (rows flattened, e.g. ``[B
* T, d]``), the call becomes a candidate for the batch-major grouping, which the engine verifies as for any
other call on flattened rows. Examples mixed between those operations and the losses show in the engine's usual
checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from ._generic import GenericRecord
from ._matmul_uses import weights_only
from ._record import Record

__all__ = ["start_at_uses"]


def _rows_per_example(node: Any, batch_dim: int, batch_size: int) -> int:
    """``k`` when a one-output node's output has ``k * batch_size`` entries along ``batch_dim`` and the batch size
    along no other dimension (``k > 1``: rows flattened, e.g. an in-place write into a view of a Linear's
    ``[B * T, d]`` output, whose grouping by example the engine then verifies), else 0."""
    metadata = getattr(node, "_input_metadata", None)
    if metadata is None or len(metadata) != 1:
        return 0
    shape = torch.Size(metadata[0].shape)
    if len(shape) <= batch_dim or shape[batch_dim] == 0 or shape[batch_dim] % batch_size:
        return 0
    if batch_size > 1 and any(size == batch_size for dim, size in enumerate(shape) if dim != batch_dim):
        return 0
    return int(shape[batch_dim]) // batch_size


def _upstream_of(use: Any, others: set[Any], call: range | None) -> bool:
    """Whether another chosen operation lies upstream of ``use`` (within the call): the paths through both
    would be counted twice."""
    stack = [child for child, _ in use.next_functions if child is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in others:
            return True
        if call is not None and node._sequence_nr() not in call:
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return False


def _uses_of(
    record: GenericRecord, consumers: dict[Any, list[Any]], batch_dim: int, batch_size: int
) -> tuple[list[Any], int] | None:
    """The first operations split by example on every path from the call's parameters to the losses, and their rows
    per example; ``None`` when a path leaves the call first, or their rows per example differ.

    The operations on the parameters alone (``clamp(logit_scale).exp()``) are walked through first: a tensor
    computed from the parameters alone may have the batch size along ``batch_dim`` by coincidence (``heads = B``),
    so it is never taken for one split by example. Then the walk goes on through the operations that combine them
    with the examples, until their outputs are split by example (a product on flattened ``[T * B, d]`` rows is
    passed for the view ``[T, B, n, d]`` of its result)."""
    parameters_only = weights_only(record, consumers)
    stack = list(parameters_only)
    walked: set[Any] = set()
    uses: list[Any] = []
    groups = 0
    while stack:
        for consumer in consumers.get(stack.pop(), []):
            if consumer in parameters_only or consumer in walked:
                continue
            walked.add(consumer)
            if record.nodes is not None and consumer._sequence_nr() not in record.nodes:
                return None  # (e.g. a parameter returned by the call)
            rows = _rows_per_example(consumer, batch_dim, batch_size)
            if not rows:
                stack.append(consumer)  # not split by example (yet): its products are followed further
                continue
            if groups and rows != groups:
                return None
            groups = rows
            uses.append(consumer)
    return (uses, groups) if uses else None


def start_at_uses(
    records: Iterable[Record], nodes: Iterable[Any], batch_dim: int, batch_size: int, skip: set[int] | None = None
) -> list[Record]:
    """Give the generic calls whose parameters reach the losses through operations with outputs split by example
    those outputs as edges (see the module's docstring).

    Parameters
    ----------
    records
        The captured calls (only plain :class:`GenericRecord` ones are considered).
    nodes
        The autograd nodes of the losses' graph.
    batch_dim, batch_size
        The engine's batch dimension and the number of examples.
    skip
        Ids of modules left as they are (their products from the uses failed a check on an earlier step).

    Returns
    -------
    list of Record
        The calls whose edges were changed.
    """
    candidates = [
        record
        for record in records
        if type(record) is GenericRecord and record.can_start_at_uses() and id(record.module) not in (skip or ())
    ]
    if not candidates:
        return []
    consumers: dict[Any, list[Any]] = {}
    for node in nodes:
        for child, _ in node.next_functions:
            if child is not None:
                consumers.setdefault(child, []).append(node)
    changed: list[Record] = []
    for record in candidates:
        if len(record.other_batch_dims) > 1:
            continue  # (several candidate dimensions: the check picks one, on the call's outputs)
        # A time-major call ([T, B, d]: XLNet's attention) has its examples along its other candidate dimension.
        dim = batch_dim if record.other_batch_dim is None else record.other_batch_dim
        found = _uses_of(record, consumers, dim, batch_size)
        if found is None or (dim != batch_dim and found[1] != 1):
            continue
        uses, groups = found
        chosen = set(uses)
        if any(_upstream_of(use, chosen - {use}, record.nodes) for use in uses):
            continue
        record.start_at([GradientEdge(node, 0) for node in uses])
        if dim == batch_dim:
            # A candidate batch-major grouping of k rows per example, verified like [B * T, d] rows (also for a call
            # whose outputs were regrouped, e.g. Swin's attention on [B * windows, ...] rows). Also for k = 1: the
            # batch size along dim 0 may be a coincidence (W @ x.T on [B * T, d] rows, with B output features).
            record.batched = False
            record.groups = groups
        else:
            record.groups = 0  # verified along the other dimension only
        changed.append(record)
    return changed
