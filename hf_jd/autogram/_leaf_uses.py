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


def _on_the_parameter_alone(node: Any, alone: set[Any]) -> bool:
    """Whether ``node`` computes from the parameter alone: every input autograd tracks is in ``alone``, and an input it
    does not track (a constant, or data that needs no gradient) leaves the output the shape of a tracked input
    (``W * 2``, not ``F.conv1d(x, W)`` on raw inputs)."""
    tracked = [(child, number) for child, number in node.next_functions if child is not None]
    if not tracked or any(child not in alone for child, _ in tracked):
        return False
    if len(tracked) == len(node.next_functions):
        return True
    try:
        out = tuple(node._input_metadata[0].shape)
        return any(tuple(child._input_metadata[number].shape) == out for child, number in tracked)
    except (AttributeError, IndexError, RuntimeError):
        return False


def _uses(
    param: Tensor, consumers: dict[Any, list[tuple[Any, int, int]]], batch_dim: int, batch_size: int
) -> tuple[list[Any], int] | None:
    """The operations that first combine the parameter with the examples, on every path from it, when each has an
    output with the same ``k`` entries per example along ``batch_dim`` (``k > 1``: flattened ``[B * T, d]`` rows, as a
    router's ``F.linear`` on the tokens has), with ``k``; ``None`` otherwise."""
    alone = {get_gradient_edge(param).node}
    stack = list(alone)
    uses: list[Any] = []
    counts: set[int] = set()
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        for consumer, _, _ in consumers.get(node, []):
            if consumer in seen:
                continue
            seen.add(consumer)
            if _on_the_parameter_alone(consumer, alone):
                alone.add(consumer)  # (a view, a transpose, a cast, a product with a constant)
                if len(alone) > MAX_PARAMETER_STEPS:
                    return None
                stack.append(consumer)
                continue
            rows = _rows_per_example(consumer, batch_dim, batch_size)
            if not rows:
                return None
            counts.add(rows)
            uses.append(consumer)
    return (uses, counts.pop()) if uses and len(counts) == 1 else None


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
        The record, to be verified like a call regrouped ``k`` per example.
    """
    found = _uses(param, consumers, batch_dim, batch_size)
    if found is None:
        return None
    uses, rows = found
    if len(uses) > 1 and any(_upstream_uses(uses, None)):
        return None
    record = GenericRecord(module, module_name, {name: param}, {name: param}, [])
    record.start_at([GradientEdge(use, 0) for use in uses])
    # (k consecutive rows per example, a grouping verified as for the calls' uses; also for k = 1, where the batch size
    # along batch_dim may be a coincidence)
    record.batched = False
    record.groups = rows
    return record
