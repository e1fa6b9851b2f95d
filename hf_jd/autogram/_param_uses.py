"""Check that every use of a covered parameter in the losses' graph happened inside a captured call.

A parameter's contribution to the Gramian comes from the captured calls of the modules that own it.
A use elsewhere (``F.embedding(ids, model.wte.weight)`` by the user, a parent slicing a child's
weights before passing them to it, or an earlier forward pass whose captures were replaced by a new
one) would be missing. Autograd numbers the nodes it creates in order (per thread), so the nodes
created during a call are those numbered from the call's start to its end: each node that consumes a
covered parameter must fall in the range of a captured call that covers that parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._record import Record

__all__ = ["autocast_enabled", "next_sequence_number", "uses_outside_calls"]

_get_sequence_nr = getattr(getattr(torch._C, "_autograd", None), "_get_sequence_nr", None)

# Nodes that may be created once and reused by later calls: autocast caches the casts of leaf
# parameters for the whole autocast region (possibly several forward passes). Exempt only when
# some captured call ran under autocast.
_AUTOCAST_CASTS = frozenset({"ToCopyBackward0"})


def next_sequence_number() -> int | None:
    """The sequence number autograd gives to the next node created on this thread (``None`` if this
    torch does not expose it; the check is then skipped).

    Returns
    -------
    int or None
        The sequence number.
    """
    return None if _get_sequence_nr is None else int(_get_sequence_nr())


def autocast_enabled() -> bool:
    """Whether autocast is on for the CPU or CUDA (where the device-type query exists).

    Returns
    -------
    bool
        ``True`` if autocast is on for either device type.
    """
    try:
        return bool(torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))
    except TypeError:  # pragma: no cover - torch < 2.4 has no device-type argument
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def uses_outside_calls(nodes: Iterable[Any], records: list[Record]) -> list[tuple[nn.Parameter, bool]]:
    """Covered parameters that some node of ``nodes`` (the losses' graph) uses outside every captured call
    covering them, each once, with whether that use predates all the captured calls (an earlier forward
    pass).

    Parameters
    ----------
    nodes
        The autograd nodes of the losses' graph.
    records
        The captured calls.

    Returns
    -------
    list of tuple
        ``(parameter, predates)`` pairs.
    """
    ranges: dict[int, list[range]] = {}
    params: dict[int, nn.Parameter] = {}
    first = None
    for record in records:
        if record.nodes is None:
            return []
        first = record.nodes.start if first is None else min(first, record.nodes.start)
        for param in record.params.values():
            ranges.setdefault(id(param), []).append(record.nodes)
            params[id(param)] = param
    exempt = _AUTOCAST_CASTS if any(record.autocast for record in records) else frozenset()
    found: dict[int, bool] = {}
    for node in nodes:
        if type(node).__name__ in exempt:
            continue
        for next_node, _ in node.next_functions:
            variable: Tensor | None = getattr(next_node, "variable", None)
            if variable is None or id(variable) not in ranges or id(variable) in found:
                continue
            number = node._sequence_nr()
            if not any(number in call for call in ranges[id(variable)]):
                found[id(variable)] = first is not None and number < first
    return [(params[key], earlier) for key, earlier in found.items()]
