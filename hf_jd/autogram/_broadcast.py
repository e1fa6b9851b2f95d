"""Per-example output gradients of calls whose output all examples share (broadcast over the batch).

T5's and MPNet's relative-position bias is one embedding lookup on ``[T_q, T_k]`` bucket ids whose
``[T_q, T_k, heads]`` output is reshaped (``permute``, ``unsqueeze``) and then broadcast over the
batch, e.g. ``bias + mask`` with a ``[B, 1, T_q, T_k]`` mask, or ``bias.expand(B, …)``. The output
itself carries no example index, so the gradient reaching it is summed over the examples. But the
gradient reaching the broadcasting operation's *output* is still one slice per example, and its
contribution to the shared input is, slice by slice, the per-example gradient.

This module finds such calls from the autograd graph of the losses: every path from the call's
output must go through reshaping operations (:data:`SHAPE_NODES`) or elementwise ones that keep
its shape (:data:`ELEMENTWISE_NODES`, e.g. a causal mask applied with ``where``) to an operation that
broadcasts it over ``batch_dim`` (:data:`BROADCAST_NODES`: ``+``, ``-``, ``*``, ``where``, …, and
``expand``), whose output has the batch size there while the shared tensor has size 1 or no such
dimension. A hook on each broadcasting node, run during the engine's ordinary backward pass, takes
the example slices of the gradient that node gives its shared input (before the reduction over the
batch) and maps each back to the call's output through the reshaping nodes (called one example at a
time: they neither mix entries nor depend on the example), summing over the paths. The call is then treated
like any other call split by example, with its inputs repeated once per example. Calls with any
other use of their output keep the exact per-row path of the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._accumulate import Accumulator
from ._record import Record

__all__ = ["BroadcastPlan", "attach_plans", "grouped_paths", "node_output_shape", "plan_broadcasts"]

# Nodes of operations that only move, select or convert entries (their backward is linear and
# needs no saved tensor), through which a shared output may pass before being broadcast.
SHAPE_NODES = frozenset({
    "AliasBackward0", "AsStridedBackward0", "CloneBackward0", "PermuteBackward0", "SliceBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "TBackward0", "ToCopyBackward0", "TransposeBackward0",
    "TransposeBackward1", "UnsafeViewBackward0", "UnsqueezeBackward0", "ViewBackward0",
})
# Nodes of elementwise operations, linear in the shared input, allowed on the way when their output
# has the shape of the shared input (the other operand, e.g. a causal mask, is then not batched).
ELEMENTWISE_NODES = frozenset({
    "DivBackward0", "MaskedFillBackward0", "MulBackward0", "NegBackward0", "WhereBackward0",
})
# Nodes of elementwise functions of one tensor (their backward is a fixed linear map of the gradient on a path that
# depends on the parameters only, e.g. Swinv2's ``16 * sigmoid(table)``), allowed when shape-preserving.
UNARY_NODES = frozenset({
    "AbsBackward0", "CosBackward0", "EluBackward0", "ExpBackward0", "GeluBackward0", "HardtanhBackward0",
    "LeakyReluBackward0", "LogBackward0", "LogSigmoidBackward0", "LogSoftmaxBackward0", "ReluBackward0",
    "RsqrtBackward0", "SigmoidBackward0", "SiluBackward0", "SinBackward0", "SoftmaxBackward0", "SoftplusBackward0",
    "SqrtBackward0", "TanhBackward0",
})
# An in-place operation on a view of the shared tensor (e.g. ``ReLU(inplace=True)`` on a Linear's output, a view of
# its product): allowed when shape-preserving and without another differentiable input (a value written in).
IN_PLACE_NODES = frozenset({"CopySlices"})
# Selection of entries by an index (``table[relative_position_index]``), allowed when its output has no dimension
# of the batch size along ``batch_dim`` (an index over the examples would carry them).
INDEX_NODES = frozenset({"IndexBackward0", "IndexSelectBackward0", "GatherBackward0"})
# Nodes of elementwise operations that may broadcast a shared input over the batch (e.g. the bias
# plus a [B, 1, T, T] mask, or where(mask, bias, -inf)): called on the whole gradient, their
# backward returns each input's gradient before the reduction over broadcast dimensions (the
# autograd engine does that reduction), so example e's contribution is its slice along batch_dim.
BROADCAST_NODES = frozenset({
    "AddBackward0", "DivBackward0", "MaskedFillBackward0", "MulBackward0", "SubBackward0", "WhereBackward0",
})
# ``expand`` and ``repeat`` reduce inside their backward: example e's contribution is the gradient's
# slice itself. ``repeat`` may tile a ``[k, …]`` tensor into ``[B k, …]`` (e.g. DeBERTa's position
# keys for ``[B * heads, …]`` scores): example e owns the batch-major slice ``e k … e k + k - 1``.
EXPAND_NODE = "ExpandBackward0"
REPEAT_NODE = "RepeatBackward0"
# Nodes of matrix products applying a weight to the shared input's last dimension (a Linear layer
# on a shared table, e.g. DeBERTa's relative embeddings): the input slot that may be followed.
LINEAR_NODES = {"AddmmBackward0": 1, "MmBackward0": 0}


def _name(node: Any) -> str:
    return type(node).__name__


def node_output_shape(node: Any, output_nr: int) -> torch.Size | None:
    """Shape of a node's forward output ``output_nr`` (the gradient it receives there).

    Parameters
    ----------
    node
        An autograd node.
    output_nr
        Index of the forward output.

    Returns
    -------
    torch.Size or None
        The shape, or ``None`` when the node does not expose it.
    """
    try:
        return torch.Size(node._input_metadata[output_nr].shape)
    except (AttributeError, IndexError, TypeError):
        return None


def _consumers(root: Any) -> dict[Any, list[tuple[Any, int, int]]]:
    """For every node reachable from ``root``: the nodes using its outputs, as
    ``(consumer, input slot of the consumer, output number of the node)``."""
    consumers: dict[Any, list[tuple[Any, int, int]]] = {}
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for slot, (child, output_nr) in enumerate(node.next_functions):
            if child is None:
                continue
            consumers.setdefault(child, []).append((node, slot, output_nr))
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return consumers


@dataclass
class _Step:
    """One node on the way from a broadcasting node back to the shared output: call ``node`` on the
    gradient of its output, keep its input ``slot``, reduce it to ``shape``."""

    node: Any
    slot: int
    shape: torch.Size


@dataclass
class BroadcastPlan:
    """How one call's shared output reaches the batch: each broadcasting node with the steps that
    lead from it back to the output. Filled with per-example gradients during the backward pass."""

    record: Record
    batch_dim: int
    num_examples: int
    paths: list[tuple[Any, list[_Step], int]] = field(default_factory=list)  # (node, steps, group size)
    grads: Tensor | None = None  # the per-example gradients summed over the paths fired so far
    failed: bool = False
    fired: set[int] = field(default_factory=set)
    # Called with the plan and its per-example gradients once every broadcasting node has given its
    # share exactly once (then ``grads`` is released and ``added`` set).
    on_complete: Callable[[BroadcastPlan, Tensor], None] | None = None
    added: bool = False

    def _add(self, node: Any, steps: list[_Step], group: int, grad_output: Tensor) -> None:
        if id(node) in self.fired:  # a second pass through the same node would double count
            self.failed = True
            return
        self.fired.add(id(node))
        terminal, *rest = steps
        if _name(node) in (EXPAND_NODE, REPEAT_NODE):
            full = grad_output
        else:
            grads = node(grad_output)
            full = grads if isinstance(grads, Tensor) else grads[terminal.slot]
        bd = self.batch_dim
        if full is None or full.dim() <= bd or full.shape[bd] != self.num_examples * group:
            self.failed = True  # not the unreduced, per-example gradient expected: exact path instead
            return
        per_example = []
        for example in range(self.num_examples):
            grad = _reduce(full.narrow(bd, example * group, group), terminal.shape)
            for step in rest:
                grads = step.node(grad)  # a tensor for single-input nodes, else a tuple
                grad = _reduce(grads if isinstance(grads, Tensor) else grads[step.slot], step.shape)
            per_example.append(grad)
        stacked = torch.stack(per_example, dim=self.batch_dim)
        self.grads = stacked if self.grads is None else self.grads + stacked
        if len(self.fired) == len(self.paths) and self.on_complete is not None:
            grads, self.grads = self.grads, None
            self.added = True
            self.on_complete(self, grads)  # e.g. add the contribution now and free the gradients

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Hooks on the broadcasting nodes that collect the per-example gradients (into ``grads``).

        Yields
        ------
        None
            While the hooks are registered (removed on exit).
        """

        def hook_for(steps: list[_Step], node: Any, group: int) -> Any:
            def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
                grad = grad_outputs[0]
                if grad is not None:
                    self._add(node, steps, group, grad)

            return hook

        handles = [node.register_prehook(hook_for(steps, node, group)) for node, steps, group in self.paths]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _reduce(grad: Tensor, shape: torch.Size) -> Tensor:
    """Bring a node's input gradient to the input's shape, as the autograd engine does (sum over
    broadcast dimensions; some nodes return their gradient without the size-1 dimensions)."""
    if grad.shape == shape:
        return grad
    if grad.numel() == shape.numel():
        return grad.reshape(shape)
    return grad.sum_to_size(shape)


def grouped_paths(plans: list[BroadcastPlan]) -> list[tuple[Any, int]]:
    """The broadcasting nodes of ``plans`` whose output has ``k > 1`` entries per example along the batch
    dimension without a ``repeat`` defining them (a table added to Swin's ``[B * windows, …]`` attention
    scores), with ``k``: their batch-major grouping is an assumption the engine verifies.

    Parameters
    ----------
    plans
        The plans.

    Returns
    -------
    list of tuple
        ``(node, k)`` pairs.
    """
    return [
        (node, group) for plan in plans for node, _, group in plan.paths if group > 1 and _name(node) != REPEAT_NODE
    ]


def _broadcast_group(name: str, shared: torch.Size, output: torch.Size, batch_dim: int, batch_size: int) -> int:
    """How many entries along ``batch_dim`` each example owns when node ``name`` broadcasts a
    tensor of shape ``shared`` to ``output``: 1 for a broadcast over ``[B, …]``, ``k`` for a
    broadcast over ``[B k, …]`` (e.g. Swin's windows: a grouping verified by the engine) and for a
    ``repeat`` of a ``[k, …]`` tensor into ``[B k, …]``; 0 when it does not spread it over the batch."""
    if len(output) <= batch_dim or len(shared) > len(output):
        return 0
    if name == REPEAT_NODE:
        same_rank = len(shared) == len(output)
        others_equal = same_rank and all(
            a == b for i, (a, b) in enumerate(zip(shared, output)) if i != batch_dim
        )
        if others_equal and output[batch_dim] == batch_size * shared[batch_dim]:
            return shared[batch_dim]
        return 0
    if output[batch_dim] % batch_size:
        return 0
    offset = len(output) - len(shared)  # broadcasting aligns trailing dimensions
    index = batch_dim - offset
    return output[batch_dim] // batch_size if index < 0 or shared[index] == 1 else 0


def plan_broadcasts(losses: Tensor, records: list[Record], batch_dim: int, batch_size: int) -> list[BroadcastPlan]:
    """One plan per record when every record's single output is shared and only broadcast over the
    batch, else none (all of them then take the exact paths). Only records that can repeat their
    inputs per example (:meth:`Record.insert_batch`) can be planned.

    Parameters
    ----------
    losses
        The losses.
    records
        The captured calls.
    batch_dim
        The engine's batch dimension.
    batch_size
        Number of examples.

    Returns
    -------
    list of BroadcastPlan
        One per record, or empty.
    """
    if losses.grad_fn is None or batch_size < 2:
        return []
    if not all(len(r.edges) == 1 and r.can_insert_batch(batch_dim) for r in records):
        return []
    consumers = _consumers(losses.grad_fn)
    plans: list[BroadcastPlan] = []
    for record in records:
        plan = _plan(record, consumers, batch_dim, batch_size)
        if plan is None:
            return []
        plans.append(plan)
    return plans


def attach_plans(plans: list[BroadcastPlan], accumulator: Accumulator) -> None:
    """Have ``accumulator`` ignore the summed output gradients the pass gives the planned calls and
    add each call's per-example contribution as soon as its plan is complete.

    Parameters
    ----------
    plans
        The plans of :func:`plan_broadcasts`.
    accumulator
        The accumulator of the pass.
    """
    accumulator.deferred = {id(plan.record) for plan in plans}
    num_examples = accumulator.layout.num_examples

    def add(plan: BroadcastPlan, grads: Tensor) -> None:
        record = plan.record
        view = record.edge_views[0] if record.edge_views else None
        if view is not None and grads.shape[plan.batch_dim + 1 :] != view[0]:
            # Walked from the base of an output changed in place (see _plan): back to the output's shape.
            grads = grads.movedim(plan.batch_dim, 0).reshape(num_examples, *view[0]).movedim(0, plan.batch_dim)
        record.insert_batch(num_examples, plan.batch_dim)
        accumulator.add(record, [grads.unsqueeze(0)], deferred_ok=True, shaped=True)

    for plan in plans:
        plan.on_complete = add


def _plan(
    record: Record, consumers: dict[Any, list[tuple[Any, int, int]]], batch_dim: int, batch_size: int
) -> BroadcastPlan | None:
    """The plan of one record, or ``None`` when a use of its output is not a broadcast path."""
    edge = record.shape_edges()[0]
    if record.edge_views and not any(nr == edge.output_nr for _, _, nr in consumers.get(edge.node, [])):
        # The output (a view of the product, e.g. a Linear's) was changed in place (Swinv2's ReLU(inplace=True)):
        # its gradient reaches the product's edge, from which the walk starts.
        edge = record.edges[0]
    shape = node_output_shape(edge.node, edge.output_nr)
    if shape is None or len(shape) < batch_dim:
        return None
    plan = BroadcastPlan(record, batch_dim, batch_size)
    # Walk the uses of the output; every one must end at a broadcasting node.
    stack: list[tuple[Any, int, torch.Size, list[_Step]]] = [(edge.node, edge.output_nr, shape, [])]
    while stack:
        node, output_nr, value_shape, steps = stack.pop()
        uses = [(c, slot) for c, slot, nr in consumers.get(node, []) if nr == output_nr]
        if not uses:
            return None  # the losses do not reach it (or through a path the walk cannot see)
        for consumer, slot in uses:
            name = _name(consumer)
            step = _Step(consumer, slot, value_shape)
            consumer_shape = node_output_shape(consumer, 0)
            if consumer_shape is None or len(consumer.next_functions) == 0:
                return None
            group = 0
            if name in BROADCAST_NODES or name in (EXPAND_NODE, REPEAT_NODE):
                group = _broadcast_group(name, value_shape, consumer_shape, batch_dim, batch_size)
            if group:
                plan.paths.append((consumer, [step, *steps], group))
            elif _output_count(consumer) == 1 and (
                name in SHAPE_NODES
                or (name in (ELEMENTWISE_NODES | UNARY_NODES) and consumer_shape == value_shape)
                or (name in IN_PLACE_NODES and consumer_shape == value_shape and _writes_nothing_else(consumer, slot))
                or (
                    name in INDEX_NODES
                    and slot == 0
                    and (len(consumer_shape) <= batch_dim or consumer_shape[batch_dim] != batch_size)
                )
                or (
                    LINEAR_NODES.get(name) == slot
                    and len(consumer_shape) == len(value_shape)
                    and consumer_shape[:-1] == value_shape[:-1]
                )
            ):
                stack.append((consumer, 0, consumer_shape, [step, *steps]))
            else:
                return None
        if len(plan.paths) > 64:
            return None
    return plan if plan.paths else None


def _writes_nothing_else(node: Any, slot: int) -> bool:
    """Whether an in-place operation on a view of the shared tensor takes no other differentiable input (e.g. an
    in-place ReLU, not ``table[0] = x.mean(0)``, which would make the table depend on the examples)."""
    return all(child is None for index, (child, _) in enumerate(node.next_functions) if index != slot)


def _output_count(node: Any) -> int:
    try:
        return len(node._input_metadata)
    except (AttributeError, TypeError):
        return 0
