"""Shorter vector-Jacobian products for generic calls: from the operations that use the parameters.

A generic call's per-example gradients are vector-Jacobian products from its outputs to its parameters
(their aliases), one per example. When the call is a large container that uses a parameter of its own
early on — Wav2Vec2's mask embedding written into the masked frames of its ``[B, T, d]`` features before
the whole encoder, ViT's class token and position table, CLIP's class embedding — those products run
back through everything after that use, once per example. But the gradient w.r.t. the output of the
operation that uses the parameter (``index_put``, ``expand``, ``+``) is already one slice per example in
the ordinary backward pass, when that output is split by example along ``batch_dim``: the call's
vector-Jacobian products can start there instead, through that one operation.

The calls whose every use of every parameter is such an operation (one output, ``k`` times the batch size
along ``batch_dim`` and the batch size along no other dimension, the same ``k`` for all), none of which
reaches a parameter through its other inputs too (a class token concatenated to the patches before the
position table is added: the products from the addition would count the token's use twice), get those
operations' outputs as their edges; the others keep their outputs. With ``k > 1`` (rows flattened, e.g.
``[B * T, d]``), the call becomes a candidate for the batch-major grouping, which the engine verifies as for
any other call on flattened rows. Examples mixed between those operations and the losses show in the
engine's usual checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from ._generic import GenericRecord
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


def _reaches_otherwise(use: Any, aliases: set[Any], call: range | None) -> bool:
    """Whether an operation using a parameter's alias also reaches an alias through its other inputs (e.g. a
    class token concatenated to the patches before the position table is added): products from its output
    would then count that other use a second time. Only nodes created during the call are followed."""
    stack = [child for child, _ in use.next_functions if child is not None and child not in aliases]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in aliases:
            return True
        if call is not None and node._sequence_nr() not in call:
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return False


def start_at_uses(records: Iterable[Record], nodes: Iterable[Any], batch_dim: int, batch_size: int) -> list[Record]:
    """Give the generic calls whose parameters are only used by operations with outputs split by example
    those outputs as edges (see the module's docstring).

    Parameters
    ----------
    records
        The captured calls (only plain :class:`GenericRecord` ones split by example are considered).
    nodes
        The autograd nodes of the losses' graph.
    batch_dim, batch_size
        The engine's batch dimension and the number of examples.

    Returns
    -------
    list of Record
        The calls whose edges were changed.
    """
    candidates = [
        record
        for record in records
        if type(record) is GenericRecord and record.batched and record.can_start_at_uses()
    ]
    if not candidates:
        return []
    owners: dict[Any, GenericRecord] = {}
    for record in candidates:
        for alias in record.aliases.values():
            if alias.grad_fn is not None:
                owners[alias.grad_fn] = record
    uses: dict[int, list[Any]] = {}
    groups: dict[int, int] = {}
    blocked: set[int] = set()
    for node in nodes:
        for child, _ in node.next_functions:
            owner = owners.get(child)
            if owner is None or id(owner) in blocked:
                continue
            inside = owner.nodes is None or node._sequence_nr() in owner.nodes
            rows = _rows_per_example(node, batch_dim, batch_size) if inside else 0
            if not rows or groups.setdefault(id(owner), rows) != rows:
                blocked.add(id(owner))
            elif node not in uses.setdefault(id(owner), []):
                uses[id(owner)].append(node)
    changed: list[Record] = []
    for record in candidates:
        if id(record) in blocked or not uses.get(id(record)):
            continue
        aliases = {alias.grad_fn for alias in record.aliases.values() if alias.grad_fn is not None}
        if any(_reaches_otherwise(use, aliases, record.nodes) for use in uses[id(record)]):
            continue
        record.start_at([GradientEdge(node, 0) for node in uses[id(record)]])
        if groups[id(record)] > 1:  # a candidate batch-major grouping, verified like [B * T, d] rows
            record.batched = False
            record.groups = groups[id(record)]
        changed.append(record)
    return changed
