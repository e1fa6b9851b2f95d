"""Generic calls from whose inside a tensor reaches the losses otherwise than through the call's outputs.

A generic call's per-example gradients are vector-Jacobian products from its outputs. They hold every path from its
parameters to the losses only if those paths leave the call through its outputs. A tensor computed inside the call
can also leave it another way: a forward hook on a child module that keeps the child's output (transformers records
the router logits of mixture-of-experts layers so, for the load-balancing loss), an attribute the module sets, a list
it appends to. A parameter the call uses before such a tensor (Doge's ``input_residual``, applied before the router)
then reaches the losses through a path the products miss, and its per-example gradients from the outputs are wrong.

Such paths show in the autograd graph: a node created during the call (its sequence number in the call's range) whose
output is used by a node created outside it, other than through the call's outputs. The engine then takes those
calls' parameters from the losses directly (exact).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

from ._generic import GenericRecord

__all__ = ["escaping_calls"]


def _legitimate_outputs(record: GenericRecord) -> set[tuple[Any, int]]:
    """The ``(node, output number)`` pairs through which the call's outputs leave it: its edges, and, for an edge whose
    node was made after the call (the views the engine returns in place of several outputs), that node's inputs."""
    call = record.nodes
    assert call is not None
    edges = [*record.edges, *record.view_edges]
    legitimate = {(edge.node, edge.output_nr) for edge in edges}
    for edge in edges:
        if edge.node._sequence_nr() not in call:
            legitimate.update((child, number) for child, number in edge.node.next_functions if child is not None)
    return legitimate


def escaping_calls(records: Sequence[GenericRecord], nodes: Iterable[Any]) -> list[GenericRecord]:
    """The calls among ``records`` (generic calls whose products start at their outputs) from whose inside a tensor
    reaches the losses otherwise than through their outputs.

    Parameters
    ----------
    records
        The generic calls to check (those with an unknown range of nodes are not).
    nodes
        The autograd nodes of the losses' graph.

    Returns
    -------
    list of GenericRecord
        The calls with such a path.
    """
    calls = sorted((record for record in records if record.nodes is not None), key=lambda r: r.nodes.start)  # type: ignore[union-attr]
    if not calls:
        return []
    starts = [record.nodes.start for record in calls]  # type: ignore[union-attr]
    # The largest end among the calls starting at or before each one (calls may nest: a generic call inside another).
    reach: list[int] = []
    for record in calls:
        reach.append(max(record.nodes.stop, reach[-1] if reach else 0))  # type: ignore[union-attr]
    first, last = starts[0], reach[-1]
    legitimate: dict[int, set[tuple[Any, int]]] = {}
    escaping: dict[int, GenericRecord] = {}
    for consumer in nodes:
        outside = consumer._sequence_nr()
        for node, output_nr in consumer.next_functions:
            if node is None:
                continue
            number = node._sequence_nr()
            if number < first or number >= last:
                continue
            index = bisect.bisect_right(starts, number) - 1
            while index >= 0 and reach[index] > number:
                record = calls[index]
                call = record.nodes
                assert call is not None
                index -= 1
                if number not in call or outside in call or id(record) in escaping:
                    continue
                allowed = legitimate.get(id(record))
                if allowed is None:
                    allowed = legitimate[id(record)] = _legitimate_outputs(record)
                if (node, output_nr) not in allowed:
                    escaping[id(record)] = record
    return list(escaping.values())
