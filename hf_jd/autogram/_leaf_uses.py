"""Products started at the uses of a parameter that no captured call covers.

A parameter read outside the calls of its module (LFM2's and Kimi-Linear's short convolutions pass
``self.conv.weight`` to ``causal_conv1d_fn``, whose reference implementation calls ``F.conv1d`` with it, and the
module ``conv`` itself is never called) has no record; its per-row gradients came from a batched backward pass over
the loss rows, through the whole network. When every path from the parameter reaches the losses through operations
whose outputs are split by example (the convolution of the examples' features), after operations on the parameter
alone (a ``view``, a transpose), its per-example gradients are the vector-Jacobian products from those operations'
outputs alone, one per example: the products of a generic call started at its parameters' uses (see
:mod:`._direct_uses`), which a :class:`GenericRecord` of that parameter computes. Whether the operations' outputs are
split by example is verified on the first step, as for those calls.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ._direct_uses import _rows_per_example, _upstream_uses
from ._generic import GenericRecord

__all__ = ["record_of_uses"]

# Largest number of operations on the parameter alone walked before its uses (views, transposes, casts).
MAX_PARAMETER_STEPS = 16


def _uses(
    param: Tensor, consumers: dict[Any, list[tuple[Any, int, int]]], batch_dim: int, batch_size: int
) -> list[Any] | None:
    """The operations that first combine the parameter with the examples, on every path from it, when each has an
    output split by example along ``batch_dim`` (one entry per example); ``None`` otherwise."""
    alone = {get_gradient_edge(param).node}
    stack = list(alone)
    uses: list[Any] = []
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        for consumer, _, _ in consumers.get(node, []):
            if consumer in seen:
                continue
            seen.add(consumer)
            children = [child for child, _ in consumer.next_functions]
            if children and all(child in alone for child in children):
                alone.add(consumer)  # (an operation on the parameter alone: a view, a transpose)
                if len(alone) > MAX_PARAMETER_STEPS:
                    return None
                stack.append(consumer)
                continue
            if _rows_per_example(consumer, batch_dim, batch_size) != 1:
                return None
            uses.append(consumer)
    return uses or None


def record_of_uses(
    module: nn.Module,
    module_name: str,
    name: str,
    param: nn.Parameter,
    consumers: dict[Any, list[tuple[Any, int, int]]],
    batch_dim: int,
    batch_size: int,
) -> GenericRecord | None:
    """A generic record of ``param`` whose products start at its uses (see the module's docstring), or ``None`` when
    some path from it does not go through an operation split by example first, or one use lies upstream of another.

    Parameters
    ----------
    module
        The module that owns the parameter (named in messages).
    module_name
        Its qualified name.
    name
        The parameter's attribute name in ``module``.
    param
        The parameter.
    consumers
        The consumers of each node of the losses' graph (see :class:`._broadcast.GraphConsumers`).
    batch_dim, batch_size
        The engine's batch dimension and the number of examples.

    Returns
    -------
    GenericRecord or None
        The record, to be verified like a call regrouped ``k = 1`` per example.
    """
    uses = _uses(param, consumers, batch_dim, batch_size)
    if uses is None or (len(uses) > 1 and any(_upstream_uses(uses, None))):
        return None
    record = GenericRecord(module, module_name, {name: param}, {name: param}, [])
    record.start_at([GradientEdge(use, 0) for use in uses])
    # (the batch size along batch_dim may be a coincidence: the grouping is verified, as for the calls' uses)
    record.batched = False
    record.groups = 1
    return record
