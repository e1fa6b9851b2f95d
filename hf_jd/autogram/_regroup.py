"""Per-example output gradients of calls whose rows are examples regrouped with another axis.

Some models flatten ``[B, T, d]`` activations to ``[B * T, d]`` before a Linear layer or LayerNorm
(OPT), or split images into windows ``[B * windows, tokens, d]`` (Swin). If the grouping is batch-
major, example ``i`` owns the ``k`` consecutive rows ``i k … i k + k - 1``, and the per-example
output gradients are slices of the gradient of the summed losses, as for ordinary batched calls.

The grouping is not assumed but verified: with ``G`` the output gradient of ``Σ_i L_i`` and
``G_w`` that of ``Σ_i w_i L_i`` for random positive weights ``w`` (both from one backward pass
batched over the two vectors), the identity ``G_w[j] = w_{⌊j / k⌋} G[j]`` for every row ``j``
holds for all ``w`` exactly when no other example's loss reaches row ``j`` (the difference is
``Σ_{i ≠ ⌊j/k⌋} (w_i - w_{⌊j/k⌋}) ∂L_i/∂y_j``, linear in ``w``). Calls that fail the check (e.g.
a time-major ``[T * B, d]`` layout) are returned for the exact per-row path.

The same check with ``k = 1`` confirms that the ordinary batched calls' examples are not mixed
downstream; the engine runs it on every call of a forward pass that had calls not split by
example (a sign that the model may move examples around), in place of the plain backward pass.
Otherwise, on the first step of each loss computation, it runs it on the :func:`frontier` calls,
those whose outputs the losses reach through parameter-free operations alone: a loss that mixes the
examples (an in-batch contrastive loss, losses normalised by their batch sum) fails the identity
there, for the price of two backward passes through the loss computation; every call of such a
computation is then verified on every step, and the failures take the exact per-row path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._accumulate import Accumulator
from ._batched_grad import batched_grad, plain_grad
from ._node_structure import DATA_DEPENDENT_NODES, described_node, index_digest
from ._layout import RowLayout
from ._record import Record, split_by_record

__all__ = ["frontier", "grads_verified", "regrouping_structure"]

# Largest deviation from the identity, relative to the largest weighted output gradient, that is
# taken for float rounding (a wrong grouping deviates by about the gradient's own magnitude).
IDENTITY_RTOL = 1e-4
# The same under bf16/fp16 products (autocast or half-precision parameters), whose output gradients
# hold the identity to their rounding only (measured ~1e-2 relative on tiny bf16 models).
LOW_PRECISION_IDENTITY_RTOL = 5e-2
# The same where float32 products may run in TF32 (cuDNN convolutions and recurrent layers by default on CUDA, or
# TF32 matrix products; see _precision): about 1e-3 relative rounding per product.
TF32_IDENTITY_RTOL = 2e-2
_SEED = 2406_16232
# Deviations from the identity, relative to the largest weighted output gradient, below which a failed check is taken
# for a possible effect of rounding and measured again (see :func:`grads_verified`): gradients computed with heavy
# cancellation (a chunked linear attention's decay gates: entries around 1e-7 from terms many orders of magnitude
# larger) hold the identity to 1e-2 relative only, while examples that are truly mixed deviate by about the gradient
# itself.
NEAR_MISS_RTOL = 0.1
# The plain vector's scale in the pass that measures the rounding (not a power of two, whose products are exact), and
# how many times that rounding a deviation may reach and still count as rounding.
NOISE_SCALE = 1.7
NOISE_FACTOR = 16.0


def grads_verified(
    losses: Tensor,
    layout: RowLayout,
    records: list[Record],
    accumulator: Accumulator,
    add: bool = True,
    rtol: float = IDENTITY_RTOL,
    trusted: Sequence[bool] | None = None,
    chosen: list[bool] | None = None,
    vacuous: list[Record] | None = None,
    nodes: Sequence[tuple[Any, int]] = (),
    nodes_grouped: list[bool] | None = None,
    confirm: bool = False,
    passing: Sequence[GradientEdge] = (),
    measure_rounding: bool = True,
) -> list[Record]:
    """Add the records whose per-example grouping the identity confirms; return the others.

    With ``add=False`` (per-example task losses ``[B, m]``, whose contributions need one output gradient
    per task) the confirmed records are only checked, not added; with ``confirm``, those confirmed along another
    dimension or in groups of ``k`` get :attr:`Record.confirmed_grouping` (and the latter are regrouped), which
    the pass over the tasks (:func:`hf_jd.autogram._accumulate.grads_at_once`) follows.

    Records split by example along ``batch_dim`` are checked with ``k = 1`` (their examples may
    still be mixed further on, e.g. by a layer applied across the batch); records with
    ``groups = k`` are checked for the batch-major grouping and regrouped. Adding needs per-example
    losses ``[B]`` (``layout.num_tasks == 1``); ``batch_dim`` must be set. The graph is retained.

    ``chosen``, when given, receives for each record (one entry each, in order) whether it was split along its
    other batch dimension (see :attr:`Record.other_batch_dim`). ``trusted``, when given, is such a list from an
    earlier step of the same computation in which every record passed: the records are then added
    that way without the check, from a backward pass over the plain vector alone.

    Parameters
    ----------
    losses
        The per-example losses, ``[B]`` or ``[B, m]``.
    layout
        Their row layout (``batch_dim`` set).
    records
        The records to check.
    accumulator
        Receives the confirmed records' contributions (when ``add``).
    add
        Add the confirmed records (else only check them).
    rtol
        Relative tolerance of the identity.
    trusted
        Per record, the split of an earlier step that passed (see above), or ``None``.
    chosen
        Receives, per record, whether it was split along its other batch dimension (``False`` for a failure).
    vacuous
        Receives the records that passed a check that could not fail (one example, or all-zero gradients):
        their grouping must not be remembered for later steps.
    nodes
        ``(node, k)`` pairs of autograd nodes whose output gradient must have its ``k`` entries per example
        along ``batch_dim`` grouped batch-major (see :func:`hf_jd.autogram._broadcast.grouped_paths`), checked
        in the same backward pass.
    nodes_grouped
        Receives whether every one of ``nodes`` passed.
    confirm
        With ``add=False``: record the confirmed groupings in the records (see above).
    passing
        With ``trusted``: edges that the pass must also reach, whose gradients are dropped (planned tables'
        calls: the caller's hooks on their broadcasting nodes collect what they need from the same pass).
    measure_rounding
        Measure the rounding of the pass for checks that fail by little (see :data:`NEAR_MISS_RTOL`); not for a
        loss computation already found to mix the examples (in-batch contrastive losses), whose checks fail anyway.

    Returns
    -------
    list of Record
        The records the identity did not confirm.
    """
    assert layout.batch_dim is not None and (layout.num_tasks == 1 or not add)
    bd = layout.batch_dim
    num_examples = layout.num_examples
    assert trusted is None or not nodes
    assert trusted is not None or not passing
    weights, vectors = _check_vectors(losses, num_examples)
    vectors = vectors[: 1 if trusted is not None else 2]
    edges = [edge for record in records for edge in record.edges]
    node_edges = [GradientEdge(node, 0) for node, _ in nodes]
    if not edges and not node_edges and not passing:  # e.g. every trainable call is not split by example
        return []
    # (a trusted grouping needs the plain vector alone: an ordinary backward pass, cheaper than a vmapped one; the
    # contributions added below, and those that hooks add during the pass, keep the caller's mode)
    inputs = edges + node_edges + list(passing)
    grads = batched_grad(losses, inputs, vectors) if trusted is None else plain_grad(losses, inputs, vectors)
    grads, node_grads = grads[: len(edges)], grads[len(edges) : len(edges) + len(node_edges)]
    # A check that fails by little (see NEAR_MISS_RTOL) is measured against the rounding of the same pass, from one
    # more ordinary backward pass over the plain vector scaled by NOISE_SCALE, run at the first such failure.
    measured: list[list[Tensor | None]] = []

    def grouped(grad: Tensor, dim: int, rounding: Callable[[], Tensor | None]) -> bool:
        if _grouped_by_example(grad, weights, dim, rtol):
            return True
        if not measure_rounding or not _grouped_by_example(grad, weights, dim, NEAR_MISS_RTOL):
            return False
        if not measured:
            measured.append(plain_grad(losses, inputs, NOISE_SCALE * vectors[:1]))
        return _grouped_by_example(grad, weights, dim, rtol, rounding())

    if nodes_grouped is not None:
        nodes_grouped.append(
            all(
                grad is None
                or (
                    grad.shape[bd + 1] == group * num_examples
                    and grouped(grad, bd, _entry(measured, position))
                )
                for position, (grad, (_, group)) in enumerate(zip(node_grads, nodes), start=len(edges))
            )
        )
    failed: list[Record] = []
    offset = 0
    for index, (record, record_grads) in enumerate(split_by_record(grads, records)):
        record_grads = record.to_view_shapes(record_grads)
        start, offset = offset, offset + len(record.edges)

        def rounding_of(edge: int, record: Record = record, start: int = start) -> Callable[[], Tensor | None]:
            return lambda: record.to_view_shapes(measured[0][start : start + len(record.edges)])[edge]

        other = record.other_batch_dim
        if all(grad is None for grad in record_grads):
            if chosen is not None:
                chosen.append(False)
            continue  # the losses do not depend on this call
        if trusted is not None:
            use_other = trusted[index] and other is not None
        else:
            # Split by example along another dimension (time-major; the first of several candidates that passes),
            # else grouped along batch_dim.
            use_other = False
            for candidate in record.other_batch_dims:
                if all(
                    grad is None or grouped(grad, candidate, rounding_of(edge))
                    for edge, grad in enumerate(record_grads)
                ):
                    record.other_batch_dim = other = candidate
                    use_other = True
                    break
            # A record not split along batch_dim is regrouped there only if it can be (a generic record whose
            # other candidate dimension, e.g. a hidden size equal to the batch size, failed cannot).
            if not use_other and (
                not (record.batched or record.can_split_batch(bd))
                or not all(
                    grad is None or grouped(grad, dim, rounding_of(edge))
                    for edge, (grad, dim) in enumerate(zip(record_grads, record.example_dims(bd)))
                )
            ):
                failed.append(record)
                if chosen is not None:
                    chosen.append(False)
                continue
            if vacuous is not None and (num_examples < 2 or _uninformative(record_grads)):
                vacuous.append(record)
        if chosen is not None:
            chosen.append(use_other)
        if not add:
            if not confirm:
                continue
            if use_other:
                assert other is not None
                record.confirmed_grouping = ("other", other)
            elif not record.batched:
                record.split_batch(num_examples, bd)
                record.confirmed_grouping = ("split", bd)
            continue
        plain = [None if grad is None else grad[0] for grad in record_grads]
        if use_other:
            assert other is not None
            own = RowLayout(other, layout.num_examples, layout.num_tasks)  # the record's own layout
            accumulator.add(record, [None if grad is None else grad.unsqueeze(0) for grad in plain], own, shaped=True)
        elif record.batched:
            accumulator.add(record, [None if grad is None else grad.unsqueeze(0) for grad in plain], shaped=True)
        else:
            record.split_batch(num_examples, bd)
            accumulator.add(
                record,
                [None if grad is None else grad.unflatten(bd, (num_examples, -1)).unsqueeze(0) for grad in plain],
                shaped=True,
            )
    return failed


def _check_vectors(losses: Tensor, num_examples: int) -> tuple[Tensor, Tensor]:
    """The per-example weights ``w`` of the grouping check and the two vectors ``[1, w]`` (per loss row)
    back-propagated for it."""
    # Evenly spread over [1, 3] and shuffled: two examples that a wrong grouping confuses have weights at least
    # 2 / (B - 1) apart (random weights could be arbitrarily close, which hides the error of a small example).
    generator = torch.Generator().manual_seed(_SEED)
    order = torch.randperm(num_examples, generator=generator).to(torch.float64)
    weights = (1.0 + 2.0 * order / max(num_examples - 1, 1)).to(device=losses.device, dtype=losses.dtype)
    per_row = weights.reshape(-1, *([1] * (losses.dim() - 1))).expand_as(losses)  # the same for every task
    return weights, torch.stack([torch.ones_like(losses), per_row])


def frontier(losses: Tensor, records: list[Record]) -> tuple[list[Record], tuple[str, ...]]:
    """The records whose outputs the losses reach without passing through another record's output
    (a walk of the autograd graph from ``losses`` that stops at every record's output nodes), and the
    structure of that loss computation: the types of the nodes walked through and the names of the
    modules reached, in walk order (the same code computing the losses from the same modules gives the
    same structure, whatever the values and sizes), with the positions of rows picked one by one; a
    ``"?"`` entry marks an operation that selects rows by the data (an index, a sort).

    Parameters
    ----------
    losses
        The losses.
    records
        The captured calls.

    Returns
    -------
    tuple
        The frontier records, and the structure (a tuple of strings).
    """
    at_node: dict[object, list[Record]] = {}
    for record in records:
        for edge in record.edges:
            at_node.setdefault(edge.node, []).append(record)
    found: dict[int, Record] = {}
    structure: list[str] = []
    seen: set[object] = set()
    stack = [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        reached = at_node.get(node)
        if reached is not None:
            structure.extend("@" + record.module_name for record in reached)
            found.update((id(record), record) for record in reached)
            continue
        structure.extend(described_node(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values()), tuple(structure)


def regrouping_structure(
    nodes: list[object], records: list[Record], constant_storages: frozenset[int] = frozenset()
) -> tuple[str, ...] | None:
    """The structure of a forward pass whose calls' grouping by example was verified: the types of all
    its autograd nodes and the names of the checked calls, in order (the same code on the same modules
    gives the same structure, hence the same reshapes), with a digest of the index of each small lookup in the data
    (XLNet's relative shift, an ``index_select`` of an ``arange``: the same values move the same rows). ``None`` when
    a node selects rows by the data otherwise (a sort, a large index): such a pass is verified on every step.

    Parameters
    ----------
    nodes
        The autograd nodes of the forward pass, in order.
    records
        The checked calls.
    constant_storages
        Storage addresses of the modules' buffers: lookups of parameters at indices read from them
        (BERT's position ids, Swin's relative-position index) are the same on every step.

    Returns
    -------
    tuple of str or None
        The structure, or ``None``.
    """
    # (an index into a table of parameters, e.g. Swin's relative-position table, moves no example's rows)
    tables = _parameters_only(nodes, constant_storages)
    entries: list[str] = []
    for node in nodes:
        described = described_node(node) if node not in tables else (type(node).__name__,)
        if "?" in described:
            described = (described[0], index_digest(node))
        entries.extend(described)
    if "?" in entries or any(len(record.other_batch_dims) > 1 for record in records):
        return None  # (a call with several candidate dimensions is checked on every step: see Record.other_batch_dims)
    # With the candidate dimensions each call offered (a batch size that now equals a hidden size or a number of
    # heads changes them, and with them the choice the check made), and the operations its gradients are read at (a
    # generic call's products may start at other operations when the batch size equals a feature size).
    return (*entries, *(
        f"@{record.module_name}:{record.groups}:{record.other_batch_dim}:"
        + ",".join(type(edge.node).__name__ for edge in record.edges)
        for record in records
    ))


def _parameters_only(nodes: list[object], constant_storages: frozenset[int] = frozenset()) -> set[object]:
    """The nodes computed from parameters alone (every path down from them ends at a parameter), and
    from no data: a lookup of parameters at indices that are not a buffer of the modules (token ids, a
    sort order), which autograd does not show as an input, counts as data."""
    known: dict[object, bool] = {}
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in known:
                continue
            children = [child for child, _ in node.next_functions]  # type: ignore[attr-defined]
            if type(node).__name__ == "AccumulateGrad":
                known[node] = True
            elif any(child is None for child in children) or not children:
                known[node] = False  # (an input that needs no gradient: data, or a constant)
            elif expanded:
                known[node] = all(known.get(child, False) for child in children) and not _looks_up_data(
                    node, constant_storages
                )
            else:
                stack.append((node, True))
                stack.extend((child, False) for child in children if child not in known)
    return {node for node, alone in known.items() if alone}


# Nodes whose operations read integer or boolean tensors that autograd does not list as inputs.
_LOOKUP_NODES = DATA_DEPENDENT_NODES | frozenset({
    "EmbeddingBackward0", "EmbeddingBagBackward0", "EmbeddingDenseBackward0", "MaskedFillBackward0",
    "MaskedFillBackward1", "WhereBackward0",
})


def _looks_up_data(node: object, constant_storages: frozenset[int]) -> bool:
    """Whether a node picks or masks entries with integer or boolean tensors other than views of the
    modules' buffers (unreadable saved tensors count as data)."""
    if type(node).__name__ not in _LOOKUP_NODES:
        return False
    for attribute in dir(node):
        if not attribute.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attribute)
        except RuntimeError:  # (freed by an earlier backward pass)
            return True
        for tensor in value if isinstance(value, (list, tuple)) else (value,):
            if (
                isinstance(tensor, Tensor)
                and not (tensor.is_floating_point() or tensor.is_complex())
                and tensor.untyped_storage().data_ptr() not in constant_storages
            ):
                return True
    return False


def _entry(measured: list[list[Tensor | None]], position: int) -> Callable[[], Tensor | None]:
    """Entry ``position`` of the gradients of the rounding pass, once it has run."""
    return lambda: measured[0][position]


def _grouped_by_example(
    grad: Tensor, weights: Tensor, batch_dim: int, rtol: float, rounding: Tensor | None = None
) -> bool:
    """Whether ``grad = [G, G_w]`` satisfies ``G_w[j] = w_{⌊j / k⌋} G[j]`` along ``batch_dim``; with ``rounding`` (the
    gradient ``[1, ...]`` of the same pass over the plain vector scaled by :data:`NOISE_SCALE`), to within
    :data:`NOISE_FACTOR` times the rounding that pass shows against ``NOISE_SCALE * G``."""
    plain, weighted = grad[0], grad[1]
    num_examples = weights.numel()
    if plain.dim() <= batch_dim or plain.shape[batch_dim] % num_examples:
        return False
    if plain.numel() == 0:
        return True  # nothing to group (e.g. an expert that received no token)
    shape = [1] * plain.dim()
    shape[batch_dim] = plain.shape[batch_dim]
    scale = weights.to(plain.dtype).repeat_interleave(plain.shape[batch_dim] // num_examples).view(shape)
    # Per example (its k entries along batch_dim), relative to that example's own largest entry: an example whose
    # gradient is much smaller than the others' is checked as strictly as they are.
    deviation = (weighted - scale * plain).abs().movedim(batch_dim, 0).reshape(num_examples, -1).amax(dim=1)
    reference = weighted.abs().movedim(batch_dim, 0).reshape(num_examples, -1).amax(dim=1)
    # Gradients in the subnormal range (vanished through tiny weights) carry a few bits: a deviation of a few of
    # their steps is rounding, not mixing (their products underflow in the Gramian anyway).
    info = torch.finfo(plain.dtype)
    floor = SUBNORMAL_STEPS * info.tiny * info.eps
    # An example whose gradient here is only rounding noise beside the others' (its losses do not depend on this call,
    # analytically, but the two passes round differently) tells nothing either: deviations within a few rounding steps
    # of the largest gradient of the batch are not taken for mixing (they would move the Gramian by as little).
    if reference.numel() and bool(torch.isfinite(reference).all()):
        floor = max(floor, ROUNDING_STEPS * info.eps * float(reference.max()))
    if rounding is not None and rounding.shape[1:] == plain.shape and plain.numel():
        measured = float((rounding[0] - NOISE_SCALE * plain).abs().max())
        if math.isfinite(measured):
            floor = max(floor, NOISE_FACTOR * measured)
    # Non-finite gradients (a NaN loss) say nothing about the grouping: not taken for mixed examples (the
    # Gramian then holds the NaN, which the weightings reject with a clear error).
    return not bool((deviation > rtol * reference + floor).any())


# Steps of the smallest subnormal number that a deviation from the grouping may reach and still count as rounding.
SUBNORMAL_STEPS = 64
# Rounding steps (of the dtype's epsilon times the batch's largest gradient) that a deviation may reach and still count
# as rounding.
ROUNDING_STEPS = 64


def _uninformative(grads: list[Tensor | None]) -> bool:
    """Whether a record's checked gradients ``[G, G_w]`` are all zero (or empty, or not finite): they pass the
    check whatever the grouping (e.g. the output gradients of a LoRA ``A`` matrix while ``B`` is still zero)."""
    return all(grad is None or grad.numel() == 0 or not bool(grad[1].abs().amax() > 0) for grad in grads)
