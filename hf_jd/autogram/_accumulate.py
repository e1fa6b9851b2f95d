"""Back-propagation to the captured module outputs and accumulation of the Gramian.

:func:`grads_at_once` back-propagates the losses to all captured outputs in one call (batched over
tasks when there are several); :func:`grads_streamed` (per-example losses) handles each record as
soon as the backward pass reaches its output, so that the output gradients of all layers are
never held at the same time. Either way, :class:`Accumulator` adds each record's contribution and
then the cross terms of parameters used by several calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._batched_grad import batched_grad
from ._generic import GenericRecord
from ._layout import RowLayout
from . import _outer
from ._outer import OuterProductRows
from ._record import Record, split_by_record
from ._shared import shared_gram

if TYPE_CHECKING:  # (_broadcast imports this module)
    from ._broadcast import BroadcastPlan

__all__ = [
    "MAX_UNATTRIBUTED_ENTRIES",
    "Accumulator",
    "empty_call",
    "grads_at_once",
    "grads_per_row",
    "grads_streamed",
    "other_uses_of_inputs",
    "unattributed_gram",
    "uncovered_parameters",
]

# Largest per-row gradient ([R, numel] entries) of a parameter used outside its module's calls that the
# engine computes from the losses directly; beyond it, such a parameter is an error.
MAX_UNATTRIBUTED_ENTRIES = 2**26


class Accumulator:
    """Adds the records' contributions to the Gramian as their output gradients arrive.

    Parameters
    ----------
    layout
        The engine's row layout of the losses.
    dtype, device
        Those of the Gramian.
    counts
        Number of captured calls that use each parameter (by ``id``): a parameter used once is added
        as soon as its call is bound, one used several times by :meth:`finish`.
    keep
        Single-backward mode: keep each record's per-row gradients (and its uses, in ``uses``) for
        the weighted gradient.
    """

    def __init__(
        self, layout: RowLayout, dtype: torch.dtype, device: torch.device, counts: dict[int, int], keep: bool
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        self.counts = counts
        self.keep = keep
        self.gramian = torch.zeros(layout.num_rows, layout.num_rows, dtype=dtype, device=device)
        self.shared: dict[int, list[tuple[Record, str]]] = {}
        # A parameter used by several calls, some of whose uses' per-row gradients take less memory than the output
        # gradients their records hold (the Linear layers on DeBERTa's relative-position table): those uses' per-row
        # gradients summed as they arrive, their records released (by ``id`` of the parameter).
        self.summed: dict[int, Tensor] = {}
        self.uses: dict[int, list[tuple[Record, str]]] = {}
        self.params: dict[int, nn.Parameter] = {}
        # Records whose output gradients are collected elsewhere during the pass (ids): ignored here.
        self.deferred: set[int] = set()
        self.bound = 0  # records the losses reached (bound to output gradients)

    def add(
        self,
        record: Record,
        grads: list[Tensor | None],
        layout: RowLayout | None = None,
        deferred_ok: bool = False,
        shaped: bool = False,
    ) -> None:
        """Bind a record to its batched output gradients and add what can be added now.

        Parameters
        ----------
        record
            The record.
        grads
            Its batched output gradients, one per edge (``None`` where the losses do not reach it).
        layout
            Overrides the engine's layout (for records given one gradient per loss row).
        deferred_ok
            Add a record listed in ``deferred`` (from the code collecting its gradients).
        shaped
            The gradients already have the outputs' shapes (not those of base edges).
        """
        if all(grad is None for grad in grads) or (id(record) in self.deferred and not deferred_ok):
            return  # the losses do not depend on this call, or its gradients come per example later
        record.keep_rows = self.keep
        record.bind(grads, self.layout if layout is None else layout, shaped=shaped)
        self.bound += 1
        needed_later = self.keep
        for name, param in record.params.items():
            self.params[id(param)] = param
            if self.counts[id(param)] == 1:
                self.gramian += record.gram(name).to(self.dtype)
            elif not self.keep and _rows_smaller_than_factors(record, name, param):
                rows = record.per_row(name).to(self.dtype)
                summed = self.summed.get(id(param))
                self.summed[id(param)] = rows if summed is None else summed.add_(rows)
            else:
                self.shared.setdefault(id(param), []).append((record, name))
                needed_later = True
            if self.keep:
                self.uses.setdefault(id(param), []).append((record, name))
        if not needed_later:
            record.release()
        elif self.keep and all(self.counts[id(param)] == 1 for param in record.params.values()):
            record.compact()

    def finish(self) -> Tensor:
        """Add the parameters used by several calls and return the symmetrised Gramian.

        Returns
        -------
        Tensor
            The Gramian, shape ``[R, R]``.
        """
        for key, summed in self.summed.items():
            # With the per-row gradients of the uses still held (they are no larger: each of them is the size of the
            # sum, and a sum was started only where it took less memory than a use's output gradients).
            for record, name in self.shared.pop(key, []):
                summed += record.per_row(name).to(self.dtype)
            self.gramian += summed @ summed.T
        self.summed = {}
        for param_uses in self.shared.values():
            self.gramian += shared_gram(param_uses, self.layout.num_examples, self.dtype)
        self.shared = {}
        return (self.gramian + self.gramian.T) / 2


def _rows_smaller_than_factors(record: Record, name: str, param: nn.Parameter) -> bool:
    """Whether a Linear-like call's per-row gradients of ``param`` take less memory than the output gradients its
    record holds (then they can be summed over the parameter's uses as they arrive and the record released), and
    fit the budget of per-row gradients materialised at once (the sum stays until the end of the pass, and the other
    uses' per-row gradients are then added to it: a large tied embedding, GPT-2's at full size, keeps the forms that
    never materialise them whole)."""
    factors = getattr(record, "factors", None)
    if not isinstance(factors, OuterProductRows) or name not in ("weight", "bias"):
        return False
    entries = factors.num_rows * param.numel()
    return entries < factors.grads.numel() and entries <= _outer.MAX_ROW_ENTRIES


def grads_at_once(
    losses: Tensor,
    grad_outputs: Tensor,
    records: list[Record],
    accumulator: Accumulator,
    batched: bool,
    retain_graph: bool = True,
    plans: Sequence[BroadcastPlan] = (),
) -> None:
    """Back-propagate to all the records' outputs at once, then add their contributions.

    Parameters
    ----------
    losses
        The losses.
    grad_outputs
        The output gradients of ``losses``: batched (one per row, leading dimension) if ``batched``.
    records
        The records to reach.
    accumulator
        Receives the records' gradients.
    batched
        Back-propagate a batch of vectors (:func:`batched_grad`) instead of one.
    retain_graph
        Keep the graph for a later backward pass.
    plans
        Broadcast plans, with ``batched`` only: the same pass also reaches their broadcasting nodes, whose
        gradients then give the plans their per-example gradients (:meth:`BroadcastPlan.add_batched`).
    """
    edges = [edge for record in records for edge in record.edges]
    plan_edges = [plan.edges() for plan in plans]
    if batched:
        grads = batched_grad(
            losses, edges + [edge for group in plan_edges for edge in group], grad_outputs, retain_graph=retain_graph
        )
        start = len(edges)
        for plan, group in zip(plans, plan_edges):
            plan.add_batched(grads[start : start + len(group)])
            start += len(group)
        del grads[len(edges) :]
    else:
        grads = list(
            torch.autograd.grad(
                losses, edges, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
            )
        )
    if not batched:
        assert not plans, "a pass over one vector gives the plans their gradients by hooks (BroadcastPlan.hooks)"
        grads = [None if grad is None else grad.unsqueeze(0) for grad in grads]
    for record, record_grads in split_by_record(grads, records):
        if record.confirmed_grouping is None:
            accumulator.add(record, record_grads)
            continue
        # A grouping confirmed by a [B, m] check: gradients [m, *shape] in the call's flat layout.
        how, dim = record.confirmed_grouping
        layout = accumulator.layout
        shaped = record.to_view_shapes(record_grads)
        if how == "other":
            own = RowLayout(dim, layout.num_examples, layout.num_tasks)
            accumulator.add(record, shaped, own, shaped=True)
        else:
            split = (layout.num_examples, -1)
            accumulator.add(record, [None if grad is None else grad.unflatten(dim + 1, split) for grad in shaped],
                            shaped=True)


def grads_per_row(losses: Tensor, layout: RowLayout, records: list[Record], accumulator: Accumulator) -> None:
    """Records whose tensors are not split by example: back-propagate each loss row separately
    (one batched backward pass over the ``R`` rows, graph retained) and treat the whole batch as
    one "example" with ``R`` tasks, which gives the same ``[R, R]`` row order. Calls on no example
    (:func:`empty_call`) get their empty gradients without that pass.

    Parameters
    ----------
    losses
        The losses, ``R`` entries.
    layout
        Their row layout.
    records
        The records to reach.
    accumulator
        Receives the records' gradients.
    """
    num_rows = layout.num_rows
    whole = RowLayout(None, 1, num_rows)
    passed = []
    for record in records:
        if not empty_call(record):
            passed.append(record)
            continue
        # (its output gradients have no entry: nothing to back-propagate)
        metadata = [edge.node._input_metadata[edge.output_nr] for edge in record.edges]
        accumulator.add(record, [losses.new_zeros(num_rows, *meta.shape, dtype=meta.dtype) for meta in metadata], whole)
    records = passed
    if not records:
        return
    eye = torch.eye(num_rows, dtype=losses.dtype, device=losses.device).view(num_rows, *losses.shape)
    edges = [edge for record in records for edge in record.edges]
    grads = batched_grad(losses, edges, eye)
    for record, record_grads in split_by_record(grads, records):
        accumulator.add(record, record_grads, whole)


def empty_call(record: Record) -> bool:
    """Whether every output of a call has no entry: a module called on no example (X-MOD's adapter of a language
    absent from the batch, an expert that received no token), whose output gradients are empty without a backward
    pass.

    Parameters
    ----------
    record
        The call.

    Returns
    -------
    bool
        ``True`` when it has outputs and none has an entry.
    """
    return bool(record.edges) and all(
        torch.Size(edge.node._input_metadata[edge.output_nr].shape).numel() == 0 for edge in record.edges
    )


def grads_streamed(
    losses: Tensor, grad_outputs: Tensor, records: list[Record], accumulator: Accumulator
) -> None:
    """Per-example losses: back-propagate once to the outputs of the "source" records (those
    whose inputs do not require grad) and handle every other record as soon as the backward
    pass reaches its output (a hook on its autograd node), so that the output gradients of all
    layers are never held at once. Records the pass did not reach are done afterwards.

    Parameters
    ----------
    losses
        The losses.
    grad_outputs
        Their output gradient (one vector).
    records
        The records to reach.
    accumulator
        Receives the records' gradients.
    """
    # (planned tables are asked for too, whatever their inputs: their broadcasting nodes compute their share only on a
    # path the pass follows, which, for a table computed from a parameter alone, leads to no source's output)
    direct_ids = {
        id(r) for r in records if r.is_source or isinstance(r, GenericRecord) or id(r) in accumulator.deferred
    }
    streamed = [r for r in records if id(r) not in direct_ids]
    direct = [r for r in records if id(r) in direct_ids]
    if not direct:
        grads_at_once(losses, grad_outputs, records, accumulator, batched=False)
        return
    reached: set[int] = set()

    def hook_for(record: Record, output_nr: int) -> Any:
        def hook(node_grads: tuple[Tensor | None, ...]) -> None:
            if id(record) in reached:
                return
            reached.add(id(record))
            grad = node_grads[output_nr]
            if grad is not None:
                accumulator.add(record, [grad.unsqueeze(0)])

        return hook

    handles = [
        edge.node.register_prehook(hook_for(record, edge.output_nr))
        for record in streamed
        for edge in record.edges
    ]
    try:
        edges = [edge for record in direct for edge in record.edges]
        grads: list[Tensor | None] = list(
            torch.autograd.grad(losses, edges, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
        )
    finally:
        # Removed before the direct records are added: a generic record's vector-Jacobian products run
        # through the same nodes again (e.g. a module scaling its input by its own parameter before calling
        # a child Linear), and must not fire these hooks.
        for handle in handles:
            handle.remove()
    grads = [None if grad is None else grad.unsqueeze(0) for grad in grads]
    for record, record_grads in split_by_record(grads, direct):
        accumulator.add(record, record_grads)
    missed = [record for record in streamed if id(record) not in reached]
    if missed:
        grads_at_once(losses, grad_outputs, missed, accumulator, batched=False)


def unattributed_gram(losses: Tensor, num_rows: int, params: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Gram matrix ``[R, R]`` of the per-row gradients of ``params`` computed from the losses directly
    (one batched backward pass over the ``R`` loss rows, graph retained): for parameters that no
    captured call covers, whose per-row gradients are then rows of the Jacobian like any other.

    Parameters
    ----------
    losses
        The losses, ``R`` entries.
    num_rows
        ``R``.
    params
        The parameters.
    dtype
        Dtype of the result.

    Returns
    -------
    Tensor
        Shape ``[R, R]``.
    """
    eye = torch.eye(num_rows, dtype=losses.dtype, device=losses.device).view(num_rows, *losses.shape)
    gram = torch.zeros(num_rows, num_rows, dtype=dtype, device=losses.device)
    for rows in batched_grad(losses, params, eye):
        if rows is not None:
            flat = rows.reshape(num_rows, -1).to(dtype)
            gram += flat @ flat.T
    return gram


# Autograd nodes of reentrant checkpointing (torch.utils.checkpoint(..., use_reentrant=True)): the
# block's forward ran without grad, so its module calls were not captured.
CHECKPOINT_NODES = frozenset({"CheckpointFunctionBackward"})


def uncovered_parameters(nodes: Iterable[Any], covered: dict[int, nn.Parameter]) -> list[Tensor]:
    """Trainable leaves the losses depend on that the engine did not capture.

    Parameters
    ----------
    nodes
        The autograd nodes of the losses' graph.
    covered
        The parameters of the captured calls, by ``id``.

    Returns
    -------
    list of Tensor
        The leaves that require grad and are not in ``covered``.

    Raises
    ------
    RuntimeError
        If the graph holds a reentrant checkpoint, whose module calls are never captured.
    """
    found: list[Tensor] = []
    for node in nodes:
        if type(node).__name__ in CHECKPOINT_NODES:
            raise RuntimeError(
                "The losses' graph holds a checkpointed block (torch.utils.checkpoint with use_reentrant=True, "
                "as gradient checkpointing does): its forward pass ran without gradients, so the autogram "
                "engine captured none of its module calls. Make the checkpointing non-reentrant, which the engine "
                "supports (use_reentrant=False, transformers' default: e.g. model.activation_checkpointing_enable("
                "activation_checkpointing_kwargs={'use_reentrant': False}), or checkpoint(..., use_reentrant=False)), "
                "or disable it (model.gradient_checkpointing_disable())."
            )
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in covered and variable.requires_grad:
            found.append(variable)
    return found


def other_uses_of_inputs(nodes: Iterable[Any], leaves: Mapping[int, Tensor], claimed: set[Any]) -> list[Tensor]:
    """Leaves (trainable parameters passed as a module's input, e.g. a table a LayerNorm normalises)
    that the losses also reach through another operation than the ``claimed`` nodes of the records
    that cover them (those uses would be missing from the Gramian).

    Parameters
    ----------
    nodes
        The autograd nodes of the losses' graph.
    leaves
        The parameters passed as inputs, by ``id``.
    claimed
        The nodes of the calls that cover them.

    Returns
    -------
    list of Tensor
        The leaves also used elsewhere.
    """
    found: dict[int, Tensor] = {}
    for node in nodes:
        if node in claimed:
            continue
        for next_node, _ in node.next_functions:
            variable = getattr(next_node, "variable", None)
            if variable is not None and id(variable) in leaves:
                found[id(variable)] = variable
    return list(found.values())
