"""Per-example output gradients of calls whose output all examples share (broadcast over the batch).

BERT's and GPT-2's position embeddings are one lookup on ``[1, T]`` position ids whose ``[1, T, d]``
output is added to the ``[B, T, d]`` word embeddings (the engine's hooks return module outputs unchanged).
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

With per-example task losses ``[B, m]`` the pass is batched over the tasks (vmapped), whose vectors cannot
leave it: the pass then returns the gradients of the broadcasting nodes' outputs, and the same per-example
mapping runs after it, task by task. Under ``torch.compile`` the broadcasting operation may sit inside a
compiled graph (one autograd node, :data:`COMPILED_NODE`), whose backward is then called once per example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._accumulate import Accumulator
from ._record import Record

__all__ = [
    "BroadcastPlan",
    "GraphConsumers",
    "attach_plans",
    "broadcast_nodes",
    "grouped_paths",
    "node_output_shape",
    "plan_broadcasts",
    "plan_structure",
]

# Nodes of operations that only move, select or convert entries (their backward is linear and
# needs no saved tensor), through which a shared output may pass before being broadcast. Constant padding is one:
# CUDA's memory-efficient attention pads an unaligned ``attn_mask`` (BEiT's ``[1, H, T, T]`` relative-position bias),
# slices it back and only then expands it over the batch.
SHAPE_NODES = frozenset({
    "AliasBackward0", "AsStridedBackward0", "CloneBackward0", "ConstantPadNdBackward0", "PermuteBackward0",
    "SliceBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "TBackward0", "ToCopyBackward0", "TransposeBackward0",
    "TransposeBackward1", "UnsafeViewBackward0", "UnsqueezeBackward0", "ViewBackward0",
})
# Nodes of elementwise operations, linear in the shared input, allowed on the way when their output
# has the shape of the shared input (the other operand, e.g. a causal mask, is then not batched).
ELEMENTWISE_NODES = frozenset({
    "DivBackward0", "MaskedFillBackward0", "MulBackward0", "NegBackward0", "WhereBackward0",
})
# Nodes of elementwise functions of one tensor (their backward is a fixed linear map of the gradient on a path that
# depends on the parameters only, e.g. Swinv2's ``16 * sigmoid(table)``), allowed when shape-preserving. Dropout on a
# shared table draws one mask for all the examples (``native_dropout`` is what CUDA runs, a product on CPU).
UNARY_NODES = frozenset({
    "AbsBackward0", "CosBackward0", "EluBackward0", "ExpBackward0", "GeluBackward0", "HardtanhBackward0",
    "LeakyReluBackward0", "LogBackward0", "LogSigmoidBackward0", "LogSoftmaxBackward0", "NativeDropoutBackward0",
    "ReluBackward0",
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
# The node of a graph compiled by torch.compile (AOTAutograd), which the engine's hooks end at each module call:
# the operation that broadcasts a shared output (BERT's position embeddings plus the word embeddings) may sit
# inside one. It is treated as a broadcasting node when all its outputs have the examples along the batch
# dimension, and its backward is called once per example (see :func:`_compiled_per_example`).
COMPILED_NODE = "CompiledFunctionBackward"
# Compiled graphs' nodes (ids) that a plan differentiates example by example, by backward passes of their own.
_DIFFERENTIATING: set[int] = set()
# Nodes whose backward reads no saved tensor: the only ones a plan may call under non-reentrant activation
# checkpointing, whose saved tensors can be unpacked once per backward pass (BERT's position embeddings are
# added to the word embeddings outside the checkpointed layers: their plan stays possible).
STATELESS_NODES = SHAPE_NODES | {"AddBackward0", "NegBackward0", "SubBackward0"}


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


class GraphConsumers:
    """The consumers of every node of the losses' graph (see :func:`_consumers`), walked once, when first asked for.

    Parameters
    ----------
    losses
        The losses.
    """

    def __init__(self, losses: Tensor) -> None:
        self.losses = losses
        self._consumers: dict[Any, list[tuple[Any, int, int]]] | None = None

    def get(self) -> dict[Any, list[tuple[Any, int, int]]]:
        """The consumers of each node: ``(consumer, input slot of the consumer, output number of the node)``.

        Returns
        -------
        dict
            By node (empty when the losses have no graph).
        """
        if self._consumers is None:
            grad_fn = self.losses.grad_fn
            self._consumers = {} if grad_fn is None else _consumers(grad_fn)
        return self._consumers


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
    # Called with the plan and its per-example gradients (with a leading dimension of tasks, 1 in the
    # hooked pass) once every broadcasting node has given its share exactly once (then ``grads`` is
    # released and ``added`` set).
    on_complete: Callable[[BroadcastPlan, Tensor], None] | None = None
    added: bool = False

    def _per_example(
        self,
        node: Any,
        steps: list[_Step],
        group: int,
        grad_outputs: Sequence[Tensor | None],
        into: Tensor | None = None,
    ) -> Tensor | None:
        """The per-example gradients, stacked along ``batch_dim``, that one broadcasting node gives the
        shared output from the gradients of its own outputs (added to ``into`` when given, another path's, in place);
        ``None`` when they are not per example."""
        terminal, *rest = steps
        bd = self.batch_dim
        if _name(node) == COMPILED_NODE:
            slices = _compiled_per_example(node, terminal.slot, grad_outputs, bd, self.num_examples)
            if slices is None:
                return None
        else:
            grad_output = grad_outputs[0]
            if grad_output is None:
                return None
            if _name(node) in (EXPAND_NODE, REPEAT_NODE):
                full = grad_output
            else:
                grads = node(grad_output)
                full = grads if isinstance(grads, Tensor) else grads[terminal.slot]
            if full is None or full.dim() <= bd or full.shape[bd] != self.num_examples * group:
                return None  # not the unreduced, per-example gradient expected: exact path instead
            slices = [full.narrow(bd, example * group, group) for example in range(self.num_examples)]
        # Each example's gradient written into the stack as it comes (a list of them, then their stack, held two buffers
        # of the stack's size: DeBERTa's relative-position table is [B, 512, d]).
        stacked = into
        for example, piece in enumerate(slices):
            grad = _reduce(piece, terminal.shape)
            for step in rest:
                grads = _call_node(step.node, grad)  # a tensor for single-input nodes, else a tuple
                grad = _reduce(grads if isinstance(grads, Tensor) else grads[step.slot], step.shape)
            if stacked is None:
                shape = list(grad.shape)
                shape.insert(bd, len(slices))
                stacked = grad.new_zeros(shape)
            elif stacked.dtype != torch.promote_types(stacked.dtype, grad.dtype):
                # (paths of several dtypes add up in the wider one, as autograd's sum does)
                stacked = stacked.to(torch.promote_types(stacked.dtype, grad.dtype))
            target = stacked.select(bd, example)
            if target.shape != grad.shape:
                return None
            target.add_(grad)
        return stacked

    def _add(self, node: Any, steps: list[_Step], group: int, grad_outputs: Sequence[Tensor | None]) -> None:
        if id(node) in self.fired:  # a second pass through the same node would double count
            self.failed = True
            return
        self.fired.add(id(node))
        stacked = self._per_example(node, steps, group, grad_outputs, into=self.grads)
        if stacked is None:
            self.failed = True
            return
        self.grads = stacked  # (a later path's gradients added in place to the first's)
        if len(self.fired) == len(self.paths) and self.on_complete is not None:
            grads, self.grads = self.grads.unsqueeze(0), None
            self.added = True
            self.on_complete(self, grads)  # e.g. add the contribution now and free the gradients

    def edges(self) -> list[GradientEdge]:
        """The gradient edges of the broadcasting nodes' outputs (for a pass that returns their gradients
        instead of running :meth:`hooks`, e.g. one batched over tasks, whose vectors cannot leave it).

        Returns
        -------
        list of GradientEdge
            Per path, one per output of its node (several for a compiled graph's node), in the order
            :meth:`add_batched` expects their gradients.
        """
        return [GradientEdge(node, index) for node, _, _ in self.paths for index in range(_used_outputs(node))]

    def add_batched(self, grads: Sequence[Tensor | None]) -> None:
        """Compute the per-example gradients from the gradients of the broadcasting nodes' outputs, each with
        a leading dimension of ``m`` vectors (tasks), and hand them to ``on_complete`` with that dimension.

        Parameters
        ----------
        grads
            In the order of :meth:`edges`, the batched gradient of each output of a broadcasting node, or
            ``None`` when the losses do not reach it.
        """
        total: Tensor | None = None
        start = 0
        with torch.no_grad():
            for node, steps, group in self.paths:
                count = _used_outputs(node)
                outputs = list(grads[start : start + count])
                start += count
                reached = next((grad for grad in outputs if grad is not None), None)
                if reached is None:
                    continue
                rows = []
                for task in range(reached.shape[0]):
                    vectors = [None if grad is None else grad[task] for grad in outputs]
                    rows.append(self._per_example(node, steps, group, vectors))
                if any(row is None for row in rows):
                    self.failed = True
                    return
                stacked = torch.stack(rows)  # type: ignore[arg-type]
                total = stacked if total is None else total + stacked
        if total is None:
            self.failed = True
            return
        self.added = True
        if self.on_complete is not None:
            self.on_complete(self, total)

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
                if id(node) not in _DIFFERENTIATING and any(grad is not None for grad in grad_outputs):
                    self._add(node, steps, group, grad_outputs)

            return hook

        handles = [node.register_prehook(hook_for(steps, node, group)) for node, steps, group in self.paths]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _call_node(node: Any, grad: Tensor) -> Any:
    """Call an autograd node on the gradient of its output, cast to that output's dtype first as autograd does (a
    float32 gradient reaching a bf16 product under autocast, e.g. through a cast of its input)."""
    metadata = getattr(node, "_input_metadata", None)
    if metadata:
        dtype = metadata[0].dtype
        if grad.dtype != dtype and grad.is_floating_point() and dtype.is_floating_point:
            grad = grad.to(dtype)
    return node(grad)


def _used_outputs(node: Any) -> int:
    """How many outputs of a broadcasting node carry the gradient a plan reads: all of a compiled graph's, else
    the first."""
    return max(1, _output_count(node)) if _name(node) == COMPILED_NODE else 1


def _compiled_per_example(
    node: Any, slot: int, grad_outputs: Sequence[Tensor | None], batch_dim: int, num_examples: int
) -> list[Tensor] | None:
    """Example by example, the gradient that a compiled graph's node gives its input ``slot``: a backward pass
    through that node alone, from each example's slice of its outputs' gradients (the other slices zero). Every
    output holds the examples along ``batch_dim`` (see :func:`_compiled_group`), and the backward is linear in
    them, so the pieces sum to the gradient of the whole batch. (The node's own backward function also returns
    gradients for its non-tensor inputs, e.g. dynamic sizes, so its results cannot be matched to ``slot``.)
    ``None`` when an output's gradient is missing."""
    target, target_nr = node.next_functions[slot]
    if target is None or any(
        grad is None or grad.dim() <= batch_dim or grad.shape[batch_dim] != num_examples for grad in grad_outputs
    ):
        return None
    outputs = [GradientEdge(node, index) for index in range(len(grad_outputs))]
    pieces = []
    _DIFFERENTIATING.add(id(node))  # the plans' hooks on the node ignore these passes
    try:
        for example in range(num_examples):
            masked = []
            for grad in grad_outputs:
                assert grad is not None
                only = torch.zeros_like(grad)
                only.narrow(batch_dim, example, 1).copy_(grad.narrow(batch_dim, example, 1))
                masked.append(only)
            (piece,) = torch.autograd.grad(
                outputs, [GradientEdge(target, target_nr)], masked, retain_graph=True, allow_unused=True
            )
            if piece is None:
                return None
            pieces.append(piece)
    finally:
        _DIFFERENTIATING.discard(id(node))
    return pieces


def _compiled_group(node: Any, shared: torch.Size, batch_dim: int, batch_size: int) -> int:
    """1 when a compiled graph's node takes a tensor of shape ``shared`` without the batch (size 1 or no
    dimension at ``batch_dim``) and every output it returns has ``batch_size`` examples along ``batch_dim``
    (the graph then acts as a broadcasting operation for the plan: whatever it computes, each example's
    outputs are its own, and its backward is called per example); else 0."""
    if len(shared) > batch_dim and shared[batch_dim] != 1:
        return 0
    shapes = [node_output_shape(node, index) for index in range(_output_count(node))]
    if not shapes or any(shape is None or len(shape) <= batch_dim for shape in shapes):
        return 0
    return int(all(shape[batch_dim] == batch_size for shape in shapes))  # type: ignore[index]


def _reduce(grad: Tensor, shape: torch.Size) -> Tensor:
    """Bring a node's input gradient to the input's shape, as the autograd engine does (sum over
    broadcast dimensions; some nodes return their gradient without the size-1 dimensions)."""
    if grad.shape == shape:
        return grad
    if grad.numel() == shape.numel():
        return grad.reshape(shape)
    return grad.sum_to_size(shape)


def plan_structure(plans: list[BroadcastPlan]) -> tuple[Any, ...]:
    """What decides whether plans succeed: per plan, its call and, per path, the nodes' types and output shapes.

    Parameters
    ----------
    plans
        The plans.

    Returns
    -------
    tuple
        A hashable key.
    """
    return tuple(
        (
            plan.record.module_name,
            plan.num_examples,
            tuple(
                (
                    _name(node),
                    tuple(node_output_shape(node, 0) or ()),
                    group,
                    tuple((_name(step.node), step.slot, tuple(step.shape)) for step in steps),
                )
                for node, steps, group in plan.paths
            ),
        )
        for plan in plans
    )


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


def broadcast_nodes(plans: list[BroadcastPlan]) -> list[tuple[Any, int]]:
    """All the broadcasting nodes of ``plans`` with their entries per example (see :func:`grouped_paths`), but those
    of compiled graphs: checked for examples mixed after the broadcast (a batch statistic added to the sum of the
    examples and the table), which the per-example gradients read at these nodes assume away.

    Parameters
    ----------
    plans
        The plans.

    Returns
    -------
    list of tuple
        ``(node, k)`` pairs.
    """
    return [(node, group) for plan in plans for node, _, group in plan.paths if _name(node) != COMPILED_NODE]


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


def plan_broadcasts(
    losses: Tensor,
    records: list[Record],
    batch_dim: int,
    batch_size: int,
    stateless: bool = False,
    partial: bool = False,
    consumers: dict[Any, list[tuple[Any, int, int]]] | None = None,
) -> list[BroadcastPlan]:
    """One plan per record when every record's single output is shared and only broadcast over the
    batch, else none (all of them then take the exact paths); with ``partial``, one plan per record
    that can be planned. Only records that can repeat their inputs per example
    (:meth:`Record.insert_batch`) can be planned.

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
    stateless
        Plan only paths whose nodes read no saved tensor (:data:`STATELESS_NODES`, ``expand``, ``repeat``),
        e.g. under activation checkpointing.
    partial
        Plan the records that can be planned, whatever the others.
    consumers
        The consumers of the graph's nodes (:class:`GraphConsumers`), when already walked.

    Returns
    -------
    list of BroadcastPlan
        One per record (per plannable record with ``partial``), or empty.
    """
    if losses.grad_fn is None or batch_size < 2:
        return []
    plannable = [r for r in records if len(r.edges) == 1 and r.can_insert_batch(batch_dim)]
    if not plannable or (len(plannable) < len(records) and not partial):
        return []
    if consumers is None:
        consumers = _consumers(losses.grad_fn)
    plans: list[BroadcastPlan] = []
    for record in plannable:
        plan = _plan(record, consumers, batch_dim, batch_size, stateless)
        if plan is None and not partial:
            return []
        if plan is not None:
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

    def add(plan: BroadcastPlan, grads: Tensor) -> None:  # grads: [m, *the output's shape with the batch]
        record = plan.record
        view = record.edge_views[0] if record.edge_views else None
        dim = plan.batch_dim + 1
        shape = [size for index, size in enumerate(grads.shape) if index not in (0, dim)]  # one example's gradient
        if view is not None and torch.Size(shape) != view[0] and grads[0].numel() == num_examples * view[0].numel():
            # Walked from the base of an output changed in place (see _plan): back to the output's shape.
            grads = grads.movedim(dim, 1).reshape(grads.shape[0], num_examples, *view[0]).movedim(1, dim)
        record.insert_batch(num_examples, plan.batch_dim)
        accumulator.add(record, [grads], deferred_ok=True, shaped=True)

    for plan in plans:
        plan.on_complete = add


def _plan(
    record: Record,
    consumers: dict[Any, list[tuple[Any, int, int]]],
    batch_dim: int,
    batch_size: int,
    stateless: bool = False,
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
            if stateless and name not in STATELESS_NODES and name not in (EXPAND_NODE, REPEAT_NODE):
                return None
            if name in BROADCAST_NODES or name in (EXPAND_NODE, REPEAT_NODE):
                group = _broadcast_group(name, value_shape, consumer_shape, batch_dim, batch_size)
            elif name == COMPILED_NODE:
                group = _compiled_group(consumer, value_shape, batch_dim, batch_size)
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
