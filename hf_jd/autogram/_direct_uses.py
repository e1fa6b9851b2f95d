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
``batch_dim``; the grouping is verified). The products of each parameter then start at its own
uses. Each path from a parameter to the losses must cross exactly one of its uses, so none of them may lie
upstream of another of the same parameter.

Uses with different ``k`` (a Mamba mixer's ``dt_proj.weight @ x`` on ``[B * T, r]`` rows beside its ``x * D`` on
``[B, d, T]``), or a use of one parameter upstream of a use of another (a class token concatenated to the patches
before the position table is added; a Mamba mixer's convolution before its product with the time-step weights),
are taken too (a parent adding a child's query table and a parameter of its own to its states, as Deformable DETR's
model does) when the call goes on for a while after them (:data:`MIN_SKIPPED_NODES`); with nested uses, each
parameter's products run from its own uses, separately. But when all the uses
are products or elementwise operations and one with ``k > 1`` takes rows picked by the data (a mixture of experts'
tokens gathered by expert: as many rows as a grouping by example would have, in another order, which the check would
reject only after the fact, the step then taking the per-row pass), such a call keeps the products' path from its
outputs (:mod:`._matmul_uses`), which needs no grouping of the uses' rows.

Calls where all this holds get those operations' outputs as their edges (the products from them are exact
whatever lies between the parameters and them), the others keep their outputs. With ``k > 1`` (rows flattened,
e.g. ``[B * T, d]``), the call becomes a candidate for the batch-major grouping, which the engine verifies as for
any other call on flattened rows. Examples mixed between those operations and the losses show in the engine's
usual checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from ._generic import GenericRecord
from ._matmul_uses import USE_NODES, weights_only
from ._node_structure import DATA_DEPENDENT_NODES
from ._record import Record

__all__ = ["start_at_uses"]


def _rows_per_example(node: Any, batch_dim: int, batch_size: int, coincident: bool = False) -> int:
    """``k`` when a one-output node's output has ``k * batch_size`` entries along ``batch_dim`` and the batch size
    along no other dimension (``k > 1``: rows flattened, e.g. an in-place write into a view of a Linear's
    ``[B * T, d]`` output, whose grouping by example the engine then verifies), else 0; with ``coincident``, also
    when other dimensions have the batch size."""
    metadata = getattr(node, "_input_metadata", None)
    if metadata is None or len(metadata) != 1:
        return 0
    shape = torch.Size(metadata[0].shape)
    if len(shape) <= batch_dim or shape[batch_dim] == 0 or shape[batch_dim] % batch_size:
        return 0
    if not coincident and _other_sizes_equal(shape, batch_dim, batch_size):
        return 0
    return int(shape[batch_dim]) // batch_size


def _other_sizes_equal(shape: torch.Size, batch_dim: int, batch_size: int) -> bool:
    """Whether a dimension of ``shape`` other than ``batch_dim`` has the batch size (``batch_size > 1``)."""
    return batch_size > 1 and any(size == batch_size for dim, size in enumerate(shape) if dim != batch_dim)


def _upstream_uses(uses: list[Any], call: range | None) -> list[frozenset[int]]:
    """Per chosen operation, the positions of the others that lie upstream of it (within the call): the products
    from both at once would count the paths through both twice."""
    position = {node: index for index, node in enumerate(uses)}
    found: list[frozenset[int]] = []
    for use in uses:
        stack = [child for child, _ in use.next_functions if child is not None]
        seen: set[Any] = set()
        upstream: set[int] = set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in position:
                upstream.add(position[node])
            if call is not None and node._sequence_nr() not in call:
                continue
            stack.extend(child for child, _ in node.next_functions if child is not None)
        found.append(frozenset(upstream))
    return found


# How far down a use's other operands are followed (through operations of one input) for a lookup in the data.
_PICKED_DEPTH = 8


def _picked_by_the_data(node: Any) -> bool:
    """Whether ``node`` or the operations of one input below it (views, casts) pick rows by the data (an index, a
    sort): a mixture of experts' tokens gathered by expert."""
    for _ in range(_PICKED_DEPTH):
        if node is None:
            return False
        if type(node).__name__ in DATA_DEPENDENT_NODES:
            return True
        children = [child for child, _ in node.next_functions if child is not None]
        if len(children) != 1:
            return False
        node = children[0]
    return False


# Nested uses, or uses with different rows per example, are taken only when the products from them skip at least
# this many autograd nodes of the call (those after the first use): the verification of their grouping may cost a
# backward pass on every step (rows picked by the data), which a short call (ViLT's embeddings) does not repay.
MIN_SKIPPED_NODES = 16


def _skips_enough(record: GenericRecord, uses: list[Any]) -> bool:
    """Whether the call has at least :data:`MIN_SKIPPED_NODES` autograd nodes after its first use."""
    if record.nodes is None:
        return True
    return record.nodes.stop - min(use._sequence_nr() for use in uses) >= MIN_SKIPPED_NODES


def _uses_of(
    record: GenericRecord, consumers: dict[Any, list[Any]], batch_dim: int, batch_size: int
) -> tuple[dict[str, list[Any]], set[int], bool] | None:
    """Per parameter, the first operations split by example on every path from it to the losses, their numbers of
    rows per example, and whether the operations that first take the parameters with other inputs are all
    products or elementwise operations taking rows picked by the data (see :func:`_picked_by_the_data`) where they
    have several rows per example; ``None`` when a path leaves the call first.

    The operations on the parameters alone (``clamp(logit_scale).exp()``) are walked through first: a tensor
    computed from the parameters alone may have the batch size along ``batch_dim`` by coincidence (``heads = B``),
    so it is never taken for one split by example. Then the walk goes on through the operations that combine them
    with the examples, until their outputs are split by example (a product on flattened ``[T * B, d]`` rows is
    passed for the view ``[T, B, n, d]`` of its result)."""
    parameters_only = weights_only(record, consumers)
    found: dict[str, list[Any]] = {}
    counts: set[int] = set()
    products_only = True
    picked = False
    for name, alias in record.aliases.items():
        uses: list[Any] = []
        walked: set[Any] = set()
        stack = [] if alias.grad_fn is None else [alias.grad_fn]
        while stack:
            node = stack.pop()
            for consumer in consumers.get(node, []):
                if consumer in walked:
                    continue
                walked.add(consumer)
                if consumer in parameters_only:
                    stack.append(consumer)
                    continue
                if (node is alias.grad_fn or node in parameters_only) and type(consumer).__name__ not in USE_NODES:
                    products_only = False  # (e.g. a convolution through the weight)
                if record.nodes is not None and consumer._sequence_nr() not in record.nodes:
                    return None  # (e.g. a parameter returned by the call)
                # A use with the batch size along other dimensions too (Mamba's [B, d, T, N] time steps with T = B or
                # N = B) is taken as well, its grouping verified as every use's: passing it over sent the products
                # through the selective scan's loop after it, once per example and position. Unless it takes rows
                # picked by the data (sorted, gathered): then the walk goes on as for a tensor not split by example.
                rows = _rows_per_example(consumer, batch_dim, batch_size, coincident=True)
                if rows and _other_sizes_equal(torch.Size(consumer._input_metadata[0].shape), batch_dim, batch_size):
                    if any(
                        _picked_by_the_data(child)
                        for child, _ in consumer.next_functions
                        if child is not None and child not in parameters_only and child is not alias.grad_fn
                    ):
                        rows = 0
                if not rows:
                    stack.append(consumer)  # not split by example (yet): its products are followed further
                    continue
                counts.add(rows)
                uses.append(consumer)
                if rows > 1 and not picked:
                    picked = any(
                        _picked_by_the_data(child)
                        for child, _ in consumer.next_functions
                        if child is not None and child not in parameters_only and child is not alias.grad_fn
                    )
        if uses:
            found[name] = uses
    return (found, counts, products_only and picked) if found else None


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
        if found is None:
            continue
        by_name, counts, picked_products = found
        if dim != batch_dim and counts != {1}:
            continue
        nodes_used = list(dict.fromkeys(use for uses in by_name.values() for use in uses))
        upstream = _upstream_uses(nodes_used, record.nodes)
        position = {node: index for index, node in enumerate(nodes_used)}
        own = [{position[use] for use in uses} for uses in by_name.values()]
        if any(upstream[index] & indices for indices in own for index in indices):
            continue  # (a parameter whose products would count a path twice)
        nested = any(upstream)
        if (nested or len(counts) > 1) and (picked_products or not _skips_enough(record, nodes_used)):
            # Kept from the outputs (see the module's docstring): products on rows picked by the data (a mixture of
            # experts' tokens, in another order than a grouping by example, which the check would find only after the
            # fact), or a short call, where little is skipped for a check that may cost a pass on every step.
            continue
        record.start_at(
            [GradientEdge(node, 0) for node in nodes_used],
            # (nested uses of different parameters: each parameter's products run from its own uses only)
            [frozenset(name for name, uses in by_name.items() if node in uses) for node in nodes_used]
            if nested
            else None,
            upstream if nested else None,
        )
        if dim == batch_dim:
            # A candidate batch-major grouping of k rows per example, verified like [B * T, d] rows (also for a call
            # whose outputs were regrouped, e.g. Swin's attention on [B * windows, ...] rows). Also for k = 1: the
            # batch size along dim 0 may be a coincidence (W @ x.T on [B * T, d] rows, with B output features).
            record.batched = False
            record.groups = max(counts)
        else:
            record.groups = 0  # verified along the other dimension only
        changed.append(record)
    return changed
