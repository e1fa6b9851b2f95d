"""Per-example gradients of a generic call's weights from the products and elementwise operations that use them
(mixtures of experts, layer scales).

A generic call's per-example gradients are vector-Jacobian products from its outputs, one per example: for
a mixture-of-experts layer (transformers' fused experts: 3-D weights ``[experts, out, in]``, tokens sorted
by expert and multiplied with ``grouped_mm``, or gathered per expert with ``W[e]``, or per token with
``W[ids]`` and ``bmm``), that is one backward pass through the whole layer per example. But each weight
reaches the losses only through matrix products whose other operand is the data, and the gradient of a
product's weight operand is a sum over the product's rows (``Σ_r x_r g_rᵀ`` for ``y = x W``; one term per
matrix for ``bmm``). When every row belongs to one example, the per-example gradient of the operand is that
sum restricted to the example's rows, slice by slice of the weight (expert by expert), and the weights'
per-example gradients follow through the operations on the weights alone (``transpose``, ``W[e]``,
``W[ids]``), a cheap batched product.

Which example a row belongs to is not assumed (tokens are routed differently on every step): one batched
backward pass through the call alone, from its per-example output gradients combined with ``1``, ``w`` and
``w'`` (distinct weights per example), gives each row's gradients ``G``, ``G_w`` and ``G_w'``. A row of
example ``e`` has ``G_w = w_e G`` and ``G_w' = w'_e G`` (up to rounding); a row that two examples reach
fails that identity (the difference is linear in the weights) and the call keeps the per-example products.
The rows' gradients per task come from the same pass. Rows with no gradient contribute nothing.

When the operations between a weight and its products only move entries (``transpose``, a view, one ``select`` per
product on distinct slices), the weight's Gram contribution is the sum over its slices of the per-example operand
gradients' Gram, built a few slices at a time: the per-example gradients of the whole weight (``B`` times its size)
are never held. The weighted gradient of the single-backward mode is a second sum over the rows, each scaled by its
example's weight. Otherwise (a weight scaled before its products, slices used by several products), the per-example
gradients of the weight come from one batched product through the operations on the weights.

Elementwise uses take the same path: ``x * W``, ``x / W``, ``x + W`` and ``x - W`` (either order) with ``W`` broadcast
over the output's leading dimensions (layer scales, hand-written channels-first norms, Swinv2's logit scale, learned
temperatures), each entry of those dimensions a block whose gradient for ``W`` is ``g ⊙ ∂y/∂W`` summed to ``W``'s
shape. Calls whose products
start at their parameters' uses (:mod:`._direct_uses`) take it too, from the gradients of those uses.

The rows' examples found for a call are kept, by the structure of the call's graph (its operations in order, where
they move entries, the shapes of its tensors, the values of the indices of its lookups in the data, digested) and the
batch size: the same code on the same shapes and indices moves the same rows, so a later call of that structure takes
them from there and back-propagates the plain vector alone (one ordinary pass instead of the batched pass over three
vectors and the check of the rows). Lookups in the weights alone (a relative-position table indexed by a buffer) move
no example's rows and are left out; a call with a sort or a large lookup in the data is not kept, and a module whose
calls never take kept rows (tokens routed to experts differently on every step) stops keeping them. Blocks that had no
gradient when the examples were found take the example that the others' pattern gives (blocks ``e``-major or
``e``-minor), and a later call that finds gradient in a block of no known example, or in a use that had none, finds the
examples again.

Only calls whose weights meet the data in these operations alone take this path (``mm``, ``bmm``,
``grouped_mm``, ``addmm`` with coefficients 1 as ``F.linear`` computes 2-D rows, the weight on the right of a
row-major product or either side of ``bmm``; biases added to the rows, whole or gathered per row; the elementwise
uses above), in float32 or float64, with more than
:data:`FEW_ROWS` loss rows or large weights. The weights ``w`` and ``w'`` are drawn independently in ``(1, 2)``, one
slot of width ``1 / E`` per example at an irregular offset, from a fixed seed (see :func:`check_weights`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._batched_grad import batched_grad, one_vector_at_a_time
from ._conv_uses import CONVOLUTION_NODES, convolution_blocks
from ._layout import RowLayout
from ._node_structure import MAX_INDEX_ENTRIES, described_node, digest, index_digest
from ._norm_uses import NORM_NODES, norm_blocks
from ._precision import full_float32_precision
from ._use_blocks import Factors, UseBlocks

if TYPE_CHECKING:
    from ._generic import GenericRecord

__all__ = ["RTOL_FLOAT32", "MatmulFactors", "check_weights", "examples_of_rows", "matmul_factors", "weights_only"]

# Largest number of entries of the per-row operand gradients built at once for a Gram contribution (slices at a
# time beyond that).
MAX_ENTRIES = 2**24
# Up to this many loss rows, with per-row gradients of at most MAX_ENTRIES entries, the usual path is taken: its one
# product per row through the call costs less than the batched pass over three vectors and the sums over the rows
# (measured on tiny mixtures of experts: 1.3-1.6x slower at B = 2, about even at B = 8, faster beyond).
FEW_ROWS = 8
# Modules for which the path did not apply once (a use that is not a product, rows of several examples): they keep
# the usual path on later steps without the walk through their graph or the batched pass being repeated.
_DECLINED: weakref.WeakSet[Any] = weakref.WeakSet()
# Structures whose rows' examples a module remembers (the last ones: e.g. one per sequence length under dynamic
# padding).
KNOWN_STRUCTURES = 8
# A module whose calls found their rows' examples this many times without ever taking remembered ones (tokens routed
# by the data, which changes the structure's lookups on every step) stops remembering.
UNSTABLE_AFTER = 32
# A row's gradients must satisfy G_w = w_e G to this relative precision (float32; float64 scales with eps).
RTOL_FLOAT32 = 3e-5


@dataclass
class _RowsMemory:
    """What a module remembers of its calls' rows (see the module's docstring)."""

    structures: dict[tuple[Any, ...], list[Tensor | None]] = field(default_factory=dict)  # examples per use
    found: int = 0  # calls that found their rows' examples
    taken: int = 0  # calls that took remembered ones

    @property
    def unstable(self) -> bool:
        """Whether the module stopped remembering (see UNSTABLE_AFTER)."""
        return self.found >= UNSTABLE_AFTER and self.taken == 0


_MEMORY: weakref.WeakKeyDictionary[Any, _RowsMemory] = weakref.WeakKeyDictionary()


@dataclass
class _CallGraph:
    """A generic call's graph, walked from its output edges down to its parameters' aliases."""

    walked: list[Any]  # the call's nodes, in the order of the walk (the same for every call of the same code)
    consumers: dict[Any, list[Any]]  # the nodes that take each node's output
    closure: set[Any]  # the nodes computed from the call's weights alone (see weights_only)


@dataclass
class _Use:
    """A matrix product using a weight-derived operand, seen as sums over row blocks ``r`` of ``L_rᵀ R_r``
    (the gradient of the weight-derived operand's slice ``slices[r]``)."""

    node: Any
    data: Tensor | None  # the other operand's blocks [N, features] ([N, *block]: "elementwise"; None: an addition)
    kind: str  # "rows": y = x @ W, a block per row of y; "columns": y = W @ x (bmm's self), a block per column of y
    # (each y_s's column c gets W_s x_s[:, c]); "bias": y = x + W; "elementwise": y = x * W or x ± W, W broadcast over
    # y's first dimension (a block per entry of it) and reduced to ``reduced`` within a block
    slices: Tensor | None  # per block, the slice of ``target`` it uses (None: the whole target)
    num_slices: int
    target: tuple[Any, int]  # the (node, output_nr) of the weight-derived tensor that receives the gradients
    target_shape: torch.Size
    num_blocks: int = 0
    scale: float = 1.0  # an addition's alpha
    reduced: tuple[int, ...] = ()  # "elementwise": the weight-derived operand's shape within a block
    # Maps the use's output gradients [K, *out] to its blocks' [K, blocks, F] when they are not a reshape of them, and
    # the blocks' gradients to their factors when they are not those of ``kind`` (a convolution's, a group norm's:
    # a block per sample, see _conv_uses and _norm_uses)
    to_blocks: Callable[[Tensor], Tensor] | None = None
    factors: Factors | None = None

    def __post_init__(self) -> None:
        if self.data is not None and self.kind != "elementwise":  # (elementwise: data shaped as the output)
            self.num_blocks = self.data.shape[0]


def _walk_call(record: GenericRecord) -> tuple[list[Any], dict[Any, list[Any]]]:
    """The nodes of the call's graph in walk order (from its output edges down to its parameters' aliases), and the
    consumers of each."""
    assert record.nodes is not None
    consumers: dict[Any, list[Any]] = {}
    walked: list[Any] = []
    stack = [edge.node for edge in record.edges]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        walked.append(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            consumers.setdefault(child, []).append(node)
            if child._sequence_nr() in record.nodes:
                stack.append(child)
    return walked, consumers


def weights_only(record: GenericRecord, consumers: dict[Any, list[Any]]) -> set[Any]:
    """The nodes computed from a generic call's parameters alone (their aliases, ``transpose``, ``W[e]``,
    ``clamp(logit_scale).exp()``...).

    Parameters
    ----------
    record
        The call.
    consumers
        The nodes that take each node's output (at least those of the call's graph).

    Returns
    -------
    set
        The autograd nodes.
    """
    closure = {alias.grad_fn for alias in record.aliases.values() if alias.grad_fn is not None}
    stack = list(closure)
    while stack:  # (a node joins once all its inputs have: it is looked at again each time one of them joins)
        for consumer in consumers.get(stack.pop(), []):
            if consumer not in closure and all(
                child in closure for child, _ in consumer.next_functions if child is not None
            ) and not _meets_untracked_data(consumer):
                closure.add(consumer)
                stack.append(consumer)
    return closure


# The operations that may use a weight with data (products and the elementwise uses, see _use_of).
USE_NODES = frozenset({
    "MmBackward0", "AddmmBackward0", "BmmBackward0", "GroupedMmBackward0", "MulBackward0", "DivBackward0",
    "AddBackward0", "SubBackward0",
})


# Operations described by their own modules, by node type: convolutions and norms of the data.
_BLOCK_NODES: dict[str, Callable[[Any, set[int]], list[UseBlocks] | None]] = {
    **dict.fromkeys(CONVOLUTION_NODES, convolution_blocks),
    **dict.fromkeys(NORM_NODES, norm_blocks),
}
# Every operation that may use a weight with data.
_ALL_USE_NODES = USE_NODES | frozenset(_BLOCK_NODES)


def _meets_untracked_data(node: Any) -> bool:
    """Whether ``node`` combines its weight-derived inputs with a tensor that autograd does not track (an input that
    requires no gradient, such as continuous features fed to the first layer) into an output larger than each of
    them: ``x @ W`` or ``x * W`` with ``x`` of the data. Such a node is a use of the weights, not an operation on them
    alone; one that keeps a weight-derived input's shape (``W * mask`` with a constant mask) stays one."""
    if type(node).__name__ not in _ALL_USE_NODES:
        return False  # (e.g. a table concatenated with a constant stays an operation on the weights)
    if all(child is not None for child, _ in node.next_functions) or not node._input_metadata:
        return False
    out = node._input_metadata[0].shape
    return all(
        tuple(child._input_metadata[nr].shape) != tuple(out) for child, nr in node.next_functions if child is not None
    )


def _selected_slices(producer: Any, output_nr: int, count: int) -> tuple[Tensor, int, tuple[Any, int],
                                                                         torch.Size] | None:
    """For ``bmm`` on ``W[ids]`` (one index tensor along dim 0): the ids, the number of slices, and ``W``'s edge."""
    if type(producer).__name__ != "IndexBackward0" or output_nr != 0:
        return None
    indices = producer._saved_indices
    if len(indices) != 1 or indices[0] is None or indices[0].dim() != 1 or indices[0].numel() != count:
        return None
    ids = indices[0]
    if ids.dtype not in (torch.int64, torch.int32):
        return None
    sizes = torch.Size(producer._saved_self_sym_sizes)
    child, nr = producer.next_functions[0]
    if child is None:
        return None
    return ids.long(), int(sizes[0]), (child, nr), sizes


def _use_of(node: Any, closure: set[Any]) -> _Use | None:
    """Describe a product that takes a weight-derived operand (``None`` if it is not one this module handles)."""
    name = type(node).__name__
    operands = [node.next_functions[i] for i in range(min(2, len(node.next_functions)))]
    weighted = [child in closure for child, _ in operands]
    if name in ("MmBackward0", "GroupedMmBackward0") and weighted == [False, True]:
        data = node._saved_self
        if data is None or data.dim() != 2:
            return None
        child, nr = operands[1]
        shape = torch.Size(node._saved_mat2_sym_sizes)
        if name == "MmBackward0":
            return _Use(node, data, "rows", None, 1, (child, nr), shape)
        if len(shape) != 3:
            return None
        offsets = node._saved_offs
        if offsets is None or offsets.dim() != 1 or offsets.numel() != shape[0]:
            return None
        rows = torch.arange(data.shape[0], device=data.device)
        # Row r is in group g when offs[g - 1] <= r < offs[g]; rows past the last offset use no weight.
        slices = torch.bucketize(rows, offsets.to(rows.dtype), right=True)
        return _Use(node, data, "rows", slices, int(shape[0]), (child, nr), shape)
    if name == "BmmBackward0" and weighted in ([True, False], [False, True]):
        # Each row of y_s = x_s W_s (each column of y_s = W_s x_s) is a block: the rows of one matrix may belong to
        # several examples (a whole expert's tokens in one matrix, as Llama 4's experts multiply them).
        side = 0 if weighted[0] else 1
        saved = node._saved_mat2 if side == 0 else node._saved_self
        if saved is None or saved.dim() != 3:
            return None
        child, nr = operands[side]
        count, per_matrix = saved.shape[0], saved.shape[2] if side == 0 else saved.shape[1]
        data = saved.mT.reshape(-1, saved.shape[1]) if side == 0 else saved.reshape(-1, saved.shape[2])
        kind = "columns" if side == 0 else "rows"
        selected = _selected_slices(child, nr, count)
        if selected is not None:
            ids, num_slices, target, shape = selected
            return _Use(node, data, kind, ids.repeat_interleave(per_matrix), num_slices, target, shape)
        meta = child._input_metadata[nr] if child is not None else None
        if meta is None:
            return None
        slices = torch.arange(count, device=saved.device).repeat_interleave(per_matrix)
        return _Use(node, data, kind, slices, count, (child, nr), torch.Size(meta.shape))
    if name == "AddBackward0" and sum(weighted) == 1:  # a bias: ``y = x + b`` (b: [out], or gathered [rows, out])
        side = 0 if weighted[0] else 1
        child, nr = operands[side]
        out_shape, shape = torch.Size(node._input_metadata[0].shape), torch.Size(child._input_metadata[nr].shape)
        scale = float(node._saved_alpha) if side == 1 else 1.0
        if len(out_shape) == 2 and shape == out_shape:
            selected = _selected_slices(child, nr, out_shape[0])
            if selected is None:
                return None
            ids, num_slices, target, shape = selected
            return _Use(node, None, "bias", ids, num_slices, target, shape, out_shape[0], scale)
        if len(out_shape) == 2 and shape in (out_shape[1:], torch.Size([1, out_shape[1]])):
            return _Use(node, None, "bias", None, 1, (child, nr), shape, out_shape[0], scale)
    if name in ("MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0") and sum(weighted) == 1:
        return _elementwise_use(node, name, 0 if weighted[0] else 1, operands)
    return None


def _elementwise_use(node: Any, name: str, side: int, operands: list[tuple[Any, int]]) -> _Use | None:
    """``y = x * W``, ``x / W``, ``x + W`` or ``x - W`` (either order) with ``W`` broadcast over ``y``'s leading
    dimensions: a block per entry of those dimensions (all but the last at most: ``[B, T]`` positions, or ``[T, B]``
    ones of a time-major tensor), whose gradient for ``W`` is ``g ⊙ ∂y/∂W`` (``x``, ``-x / W²``, ``1 / x``, ``± 1``)
    summed to ``W``'s shape."""
    child, nr = operands[side]
    out_shape, shape = torch.Size(node._input_metadata[0].shape), torch.Size(child._input_metadata[nr].shape)
    if len(out_shape) < 1 or len(shape) > len(out_shape) or out_shape.numel() == 0:
        return None
    padded = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    if padded[0] != 1 or any(size not in (1, full) for size, full in zip(padded, out_shape)):
        return None  # W varies along the blocks (or does not broadcast to y)
    lead = 1
    while lead < len(out_shape) - 1 and padded[lead] == 1:
        lead += 1
    data: Tensor | None = None
    scale = 1.0
    if name in ("MulBackward0", "DivBackward0"):
        # (the factor of g in W's gradient: x for x * W, 1 / x for W / x, -x / W² for x / W)
        self_saved, other_saved = node._saved_self, node._saved_other
        if name == "MulBackward0":
            saved = other_saved if side == 0 else self_saved
        elif self_saved is None or other_saved is None:
            return None
        else:  # y = a / b: ∂y/∂a = 1 / b, ∂y/∂b = -a / b²
            saved = 1 / other_saved if side == 0 else -self_saved / other_saved.square()
        if saved is None or not saved.is_floating_point():
            return None
        try:
            data = saved.expand(out_shape)
        except RuntimeError:
            return None
    elif side == 1:  # x + alpha W, x - alpha W
        alpha = float(node._saved_alpha)
        scale = alpha if name == "AddBackward0" else -alpha
    blocks = math.prod(out_shape[:lead])
    return _Use(node, data, "elementwise", None, 1, (child, nr), shape, blocks, scale, padded[lead:])


def _find_uses(record: GenericRecord) -> tuple[list[_Use], _CallGraph] | None:
    """The uses of the call's weights, and the call's graph (``None``: a use that is not a product or an elementwise
    operation, or a weight-derived tensor that leaves the call)."""
    walked, consumers = _walk_call(record)
    closure = weights_only(record, consumers)
    assert record.nodes is not None
    uses: dict[Any, list[_Use]] = {}
    # (in the order of the walk, the same on every call of the same code: remembered rows are matched by position)
    order = {node: position for position, node in enumerate(consumers)}
    for node in sorted(closure, key=lambda node: order.get(node, len(order))):
        for consumer in consumers.get(node, []):
            if consumer in closure or consumer in uses:
                continue
            if consumer._sequence_nr() not in record.nodes:
                return None  # a weight-derived tensor leaves the call
            kind = type(consumer).__name__
            found = (
                _addmm_uses(consumer, closure) if kind == "AddmmBackward0"
                else _described_uses(consumer, closure) if kind in _BLOCK_NODES
                else None
            )
            if found is None:
                use = _use_of(consumer, closure)
                if use is None:
                    return None
                found = [use]
            uses[consumer] = found
    found_uses = [use for found in uses.values() for use in found]
    return (found_uses, _CallGraph(walked, consumers, closure)) if found_uses else None


def _addmm_uses(node: Any, closure: set[Any]) -> list[_Use] | None:
    """``y = b + x @ W`` (``addmm``, as ``F.linear`` computes 2-D inputs): a product whose rows are blocks, and a bias
    added to every row, each when its operand is weight-derived (the data ``x`` must not be)."""
    bias, data, weight = (node.next_functions[i] for i in range(3))
    if data[0] in closure or (bias[0] not in closure and weight[0] not in closure):
        return None
    if float(node._saved_alpha) != 1.0 or float(node._saved_beta) != 1.0:
        return None
    uses = []
    if weight[0] in closure:
        rows = node._saved_mat1  # (saved since the weight-derived operand requires grad)
        if rows is None or rows.dim() != 2:
            return None
        uses.append(_Use(node, rows, "rows", None, 1, weight, torch.Size(node._saved_mat2_sym_sizes)))
    if bias[0] in closure:
        out_shape = torch.Size(node._input_metadata[0].shape)
        shape = torch.Size(bias[0]._input_metadata[bias[1]].shape)
        if shape not in (out_shape[1:], torch.Size([1, out_shape[1]])):
            return None
        uses.append(_Use(node, None, "bias", None, 1, bias, shape, out_shape[0]))
    return uses


def _described_uses(node: Any, closure: set[Any]) -> list[_Use] | None:
    """A convolution or a norm of the data with weight-derived operands (see :mod:`._conv_uses`, :mod:`._norm_uses`)."""
    operands = {index for index, (child, _) in enumerate(node.next_functions) if child is not None and child in closure}
    described = _BLOCK_NODES[type(node).__name__](node, operands)
    if described is None:
        return None
    uses = []
    for blocks in described:
        child, nr = node.next_functions[blocks.operand]
        shape = torch.Size(child._input_metadata[nr].shape)
        uses.append(_Use(
            node, blocks.data, blocks.kind, blocks.slices, blocks.num_slices, (child, nr), shape, blocks.num_blocks,
            reduced=blocks.reduced, to_blocks=blocks.to_blocks, factors=blocks.factors,
        ))
    return uses


def check_weights(num_examples: int) -> Tensor:
    """The weights ``w`` and ``w'`` (``[2, E]``, float64) of the check of the rows' examples: each example gets a slot
    of width ``1 / E`` in ``(1, 2)``, shuffled, at an irregular offset inside it (between 0.2 and 0.8 of the slot),
    drawn independently for ``w`` and ``w'`` from a fixed seed. The weights of two examples differ by at least
    ``0.4 / E``; an average of several examples' weights (a row that they all reach) is no example's in both ``w`` and
    ``w'``, as it could be with evenly spaced weights (the middle example's, for a row reached by all)."""
    generator = torch.Generator().manual_seed(0x5EED)
    size = max(num_examples, 1)
    rows = []
    for _ in range(2):
        slots = torch.randperm(num_examples, generator=generator).double()
        offsets = 0.2 + 0.6 * torch.rand(num_examples, generator=generator, dtype=torch.float64)
        rows.append(1.0 + (slots + offsets) / size)
    return torch.stack(rows)


def examples_of_rows(grads: Tensor, weights: Tensor, rtol: float) -> Tensor | None:
    """Example of each row block from its gradients ``[3, R, F]`` under the weights ``1, w, w'`` (``[2, E]``);
    ``-1`` for blocks with no gradient; ``None`` if a block is reached by several examples."""
    plain, scaled = grads[0], grads[1:]
    square = (plain * plain).sum(1)
    # Rows whose gradients may be rounding noise of the largest row's (e.g. 1e-12 where the others are 1e-3) can give
    # meaningless ratios: such a row that fits no example is taken for a row without gradient (its share of the
    # Gramian is below rounding too). One that fits an example is that example's: rows of different examples may
    # differ by many orders of magnitude for real (Gemma-4's experts: rows of 1e7 on padding tokens beside others of
    # 10, whose share of their own examples' Gramian entries is anything but rounding).
    noise = (64 * torch.finfo(plain.dtype).eps) ** 2 * square.amax() if square.numel() else square.new_tensor(0.0)
    small = square <= noise
    if bool(((scaled[:, small] ** 2).sum(2) > 9 * noise).any()):
        return None
    ratios = (scaled * plain).sum(2) / square.clamp_min(torch.finfo(plain.dtype).tiny)  # [2, R]
    residual = (scaled - ratios.unsqueeze(2) * plain).norm(dim=2)
    distance = (ratios.unsqueeze(2) - weights.unsqueeze(1)).abs()  # [2, R, E]
    closest, examples = distance.min(2)
    # To rounding only: a row that several examples reach with parallel gradients (a loss linear in the call's
    # output) has ratios that average their weights, which match no single example's in both w and w' (see
    # check_weights).
    fits = (
        (residual <= rtol * scaled.norm(dim=2)).all(0)
        & (closest <= rtol * weights.abs().amax()).all(0)
        & (examples[0] == examples[1])
        & (square > 0)
    )
    if bool((~fits & ~small).any()):
        return None
    return torch.where(fits, examples[0], torch.full_like(examples[0], -1))


def _block_sums(left: Tensor, right: Tensor, keys: Tensor, num_keys: int) -> Tensor:
    """``Σ_{r: keys[r] = k} left_rᵀ right_r`` for each key ``k`` (``-1``: left out): ``[num_keys, a, b]`` from
    ``left [R, n, a]`` and ``right [R, n, b]``, as one batched product over the blocks grouped (padded if their counts
    differ) per key."""
    keep = keys >= 0
    if not bool(keep.all()):
        left, right, keys = left[keep], right[keep], keys[keep]
    if keys.numel() == 0:
        return left.new_zeros(num_keys, left.shape[2], right.shape[2])
    if keys.numel() > 1 and bool((keys[1:] < keys[:-1]).any()):  # (rows already in key order: no copy)
        keys, order = torch.sort(keys, stable=True)
        left, right = left[order], right[order]
    counts = torch.bincount(keys, minlength=num_keys)
    longest = int(counts.max())
    if int(counts.min()) == longest:  # as many rows per key (an example's positions): no padding
        left = left.reshape(num_keys, longest, *left.shape[1:])
        right = right.reshape(num_keys, longest, *right.shape[1:])
        return torch.bmm(left.flatten(1, 2).mT, right.flatten(1, 2))
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(keys.numel(), device=keys.device) - starts[keys]
    padded_left = left.new_zeros(num_keys, longest, *left.shape[1:])
    padded_right = right.new_zeros(num_keys, longest, *right.shape[1:])
    padded_left[keys, positions] = left
    padded_right[keys, positions] = right
    return torch.bmm(padded_left.flatten(1, 2).mT, padded_right.flatten(1, 2))


def _factors(use: _Use, grad: Tensor) -> tuple[Tensor, Tensor]:
    """``L [N, 1, a]`` and ``R [N, 1, b]`` of the use's blocks, from one task's block gradients ``[N, F]``
    (``[N, n, a]`` and ``[N, n, b]`` for a use with factors of its own)."""
    if use.factors is not None:
        return use.factors(grad)
    if use.kind == "elementwise":  # the gradient of W within a block: g ⊙ x (or ± g) summed to W's shape
        block_shape = _block_shape(use)
        blocks = grad.reshape(use.num_blocks, *block_shape)
        if use.data is not None:
            blocks = blocks * use.data.detach().to(grad.dtype).reshape(use.num_blocks, *block_shape)
        reduced = blocks.sum_to_size(use.num_blocks, *use.reduced) * use.scale
        return grad.new_ones(use.num_blocks, 1, 1), reduced.reshape(use.num_blocks, 1, -1)
    if use.data is None:  # y = x + b: the gradient of b is Σ_r g_r
        return grad.new_ones(use.num_blocks, 1, 1), use.scale * grad.reshape(use.num_blocks, 1, -1)
    data = use.data.detach().to(grad.dtype).unsqueeze(1)
    grad = grad.reshape(use.num_blocks, 1, -1)
    if use.kind == "rows":  # y = x W: the gradient of W is Σ_r x_rᵀ g_r
        return data, grad
    return grad, data  # y = W x, column by column: the gradient of W is Σ_c g_c x_cᵀ


def _block_shape(use: _Use) -> tuple[int, ...]:
    """The shape of an elementwise use's output within a block (its output's shape without the blocks' dimensions)."""
    shape = tuple(use.node._input_metadata[0].shape)
    return shape[len(shape) - len(use.reduced):]


def _block_grads(use: _Use, grads: Tensor) -> Tensor:
    """The gradients ``[K, *out]`` of the use's output, as ``[K, N, F]`` per block."""
    if use.to_blocks is not None:
        return use.to_blocks(grads)
    if use.kind == "columns":  # y [S, p, n]: one block per column of each matrix
        return grads.mT.reshape(grads.shape[0], use.num_blocks, -1)
    return grads.reshape(grads.shape[0], use.num_blocks, -1)


# Node types that move a tensor's entries without changing their values or sums of squares (between a weight's alias
# and the operand of a product): a Gram matrix is the same on either side of them.
_ISOMETRIC_NODES = frozenset({
    "TransposeBackward0", "TBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0", "AliasBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "ReshapeAliasBackward0",
})


@dataclass
class _Rows:
    """A use and what its rows give: each block's example (``-1``: none) and each task's output gradient."""

    use: _Use
    examples: Tensor
    grads: Tensor  # [m, blocks, F]: the output gradients of Σ_e L_{e,k}, task by task


class MatmulFactors:
    """What the call's products give, from which its Gramian contributions, per-row gradients and weighted gradients
    follow (see the module's docstring).

    Parameters
    ----------
    record
        The generic call.
    layout
        The rows of the Gramian.
    dtype
        The dtype of the computation.
    rows
        The call's uses with their rows' examples and gradients.
    """

    def __init__(self, record: GenericRecord, layout: RowLayout, dtype: torch.dtype, rows: list[_Rows]) -> None:
        self.aliases = dict(record.aliases)
        self.layout, self.dtype, self.rows = layout, dtype, rows
        self.at_target: dict[tuple[Any, int], list[_Rows]] = {}
        for entry in rows:
            self.at_target.setdefault(entry.use.target, []).append(entry)
        by_node = {alias.grad_fn: name for name, alias in self.aliases.items() if alias.grad_fn is not None}
        # The targets each parameter reaches, and the part of the parameter each target is (None: not known).
        self.targets: dict[str, list[tuple[Any, int]]] = {}
        self.regions: dict[str, list[tuple[int, int] | None] | None] = {}
        for target in dict.fromkeys(entry.use.target for entry in rows):
            found = _region(target, by_node)
            names = _reached_names(target, by_node) if found is None else [found[0]]
            for name in names:
                self.targets.setdefault(name, []).append(target)
                if found is None or self.regions.get(name, []) is None:
                    self.regions[name] = None
                else:
                    self.regions.setdefault(name, []).append(found[1])  # type: ignore[union-attr]

    def used(self) -> set[str]:
        """The parameters that some product uses."""
        return set(self.targets)

    def _operand_grads(self, target: tuple[Any, int], first: int, last: int, table: Tensor | None) -> Tensor:
        """The target's gradients restricted to its slices ``first .. last - 1``: per row ``[R, count, a, b]``, or,
        given the loss weights ``table [E, m]``, that of ``Σ w L`` (``[count, a, b]``)."""
        num_examples, num_tasks = self.layout.num_examples, self.layout.num_tasks
        count = last - first
        total: Tensor | None = None
        for entry in self.at_target[target]:
            use = entry.use
            slices = torch.zeros_like(entry.examples) if use.slices is None else use.slices
            inside = (entry.examples >= 0) & (slices >= first) & (slices < last)
            if table is None:
                keys = torch.where(inside, entry.examples * count + slices - first, -1)
                parts = []
                for task in range(num_tasks):
                    left, right = _factors(use, entry.grads[task])
                    sums = _block_sums(left, right, keys, num_examples * count)
                    parts.append(sums.view(num_examples, count, *sums.shape[1:]))
                # rows (e, k), e-major
                part = parts[0] if num_tasks == 1 else torch.stack(parts, 1).flatten(0, 1)
            else:
                keys = torch.where(inside, slices - first, -1)
                scale = table.to(self.dtype)[entry.examples.clamp_min(0)]  # [blocks, m]
                weighted = (entry.grads * scale.T.reshape(num_tasks, -1, 1)).sum(0)
                left, right = _factors(use, weighted)
                part = _block_sums(left, right, keys, count)
            total = part if total is None else total + part
        assert total is not None
        return total

    def _num_slices(self, target: tuple[Any, int]) -> int:
        return self.at_target[target][0].use.num_slices

    def _target_shape(self, target: tuple[Any, int]) -> torch.Size:
        return self.at_target[target][0].use.target_shape

    def per_row(self) -> dict[str, Tensor]:
        """``[R, numel]`` per used parameter, through the operations on the weights alone (batched over the rows)."""
        targets = list(self.at_target)
        if not targets:
            return {}  # (no use of the weights has gradient: the losses do not depend on them, e.g. an unused output)
        names = list(self.aliases)
        vectors = [
            self._operand_grads(target, 0, self._num_slices(target), None)
            .reshape(self.layout.num_rows, *self._target_shape(target))
            .to(target[0]._input_metadata[target[1]].dtype)
            for target in targets
        ]
        grads = batched_grad([GradientEdge(*target) for target in targets], [self.aliases[n] for n in names], vectors)
        return {name: grad.reshape(self.layout.num_rows, -1) for name, grad in zip(names, grads) if grad is not None}

    def gram(self, name: str) -> Tensor | None:
        """The ``[R, R]`` contribution of parameter ``name``, slices at a time, without its per-row gradients (``None``
        when its products reach it through other operations than moving entries, or overlapping parts of it)."""
        if not _separate_parts(self.regions.get(name)):
            return None
        num_rows = self.layout.num_rows
        gramian = torch.zeros(num_rows, num_rows, dtype=self.dtype, device=self.rows[0].grads.device)
        for target in self.targets[name]:
            shape = self._target_shape(target)
            num_slices = self._num_slices(target)
            per_slice = shape.numel() // num_slices
            step = max(1, MAX_ENTRIES // max(1, num_rows * per_slice))
            for first in range(0, num_slices, step):
                last = min(first + step, num_slices)
                rows = self._operand_grads(target, first, last, None).reshape(num_rows, -1)
                gramian += rows @ rows.T
        return gramian

    def weighted_grad(self, name: str, table: Tensor) -> Tensor | None:
        """The gradient of ``Σ w L`` for parameter ``name`` (``table [E, m]``), ``None`` if no product uses it."""
        targets = self.targets.get(name)
        if not targets:
            return None
        vectors = [
            self._operand_grads(target, 0, self._num_slices(target), table)
            .reshape(1, *self._target_shape(target))
            .to(target[0]._input_metadata[target[1]].dtype)
            for target in targets
        ]
        (grad,) = batched_grad([GradientEdge(*target) for target in targets], [self.aliases[name]], vectors)
        assert grad is not None
        return grad[0]


def _separate_parts(regions: list[tuple[int, int] | None] | None) -> bool:
    """Whether the targets of a parameter are known parts of it that do not overlap: one target, or selects of it
    along one dimension at distinct indices."""
    if regions is None or len(regions) == 1:
        return regions is not None
    selects = [region for region in regions if region is not None]
    return len(selects) == len(regions) == len(set(selects)) and len({dim for dim, _ in selects}) == 1


def _region(target: tuple[Any, int], aliases: dict[Any, str]) -> tuple[str, tuple[int, int] | None] | None:
    """The parameter a target is, through entry-moving operations and at most one ``select``, and that select's
    ``(dim, index)``; ``None`` through anything else."""
    node, region = target[0], None
    while node not in aliases:
        name = type(node).__name__
        children = [child for child, _ in node.next_functions if child is not None]
        if len(children) != 1:
            return None
        if name == "SelectBackward0" and region is None and children[0] in aliases:
            # (only a select of the parameter itself says which part of it the target is; autograd keeps a negative
            # dim or index as an unsigned 64-bit integer)
            sizes = list(node._saved_self_sym_sizes)
            dim, index = (int(value) - 2**64 if int(value) >= 2**63 else int(value)
                          for value in (node._saved_dim, node._saved_index))
            dim %= len(sizes)
            region = (dim, index % int(sizes[dim]))
        elif name not in _ISOMETRIC_NODES:
            return None
        node = children[0]
    return aliases[node], region


def _reached_names(target: tuple[Any, int], aliases: dict[Any, str]) -> list[str]:
    """The parameters whose aliases a target depends on."""
    found, stack, seen = [], [target[0]], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in aliases:
            found.append(aliases[node])
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return found


def matmul_factors(record: GenericRecord, layout: RowLayout, dtype: torch.dtype) -> MatmulFactors | None:
    """What the matrix products that use the call's parameters give (see the module's docstring).

    Parameters
    ----------
    record
        A generic call on its usual path (vector-Jacobian products from its outputs), after binding.
    layout
        The rows of the Gramian.
    dtype
        The dtype the rows are computed in.

    Returns
    -------
    MatmulFactors or None
        ``None`` when the path does not apply: a parameter used otherwise than by a matrix product, a row reached by
        several examples, low precision. A module for which the path did not apply keeps the usual path on later
        calls.
    """
    if record.nodes is None or record._shared_output or dtype not in (torch.float32, torch.float64):
        return None
    if not hasattr(record, "grad_rows"):  # a closed form took the output gradients (an RMS norm's)
        return None
    if record.module in _DECLINED:
        return None
    if layout.num_rows <= FEW_ROWS and layout.num_rows * sum(p.numel() for p in record.params.values()) <= MAX_ENTRIES:
        return None  # a few rows of small weights: one product per row is cheaper than the batched pass and the sums
    factors = _factors_from_uses(record, layout, dtype)
    if factors is None:
        _DECLINED.add(record.module)
    return factors


def _factors_from_uses(record: GenericRecord, layout: RowLayout, dtype: torch.dtype) -> MatmulFactors | None:
    found_uses = _find_uses(record)
    if found_uses is None:
        return None
    uses, graph = found_uses
    if record.serves is not None and _use_edges(record, uses) is None:
        return None  # (nested uses whose gradients cannot be told apart: see _use_grads)
    memory = _MEMORY.setdefault(record.module, _RowsMemory())
    remember = layout.batched and not memory.unstable
    structure = _call_structure(record, uses, graph, layout) if remember else None
    known = memory.structures.get(structure) if structure is not None else None
    if known is not None:
        found = _rows_from_known(record, layout, dtype, uses, known)
        if found is not None:
            memory.taken += 1
            return MatmulFactors(record, layout, dtype, found)
    found_rows = _rows_found(record, layout, dtype, uses)
    if found_rows is None:
        return None
    if structure is not None:
        remembered = memory.structures
        if len(remembered) >= KNOWN_STRUCTURES:  # (the oldest goes)
            del remembered[next(iter(remembered))]
        by_use = {id(entry.use): entry.examples for entry in found_rows}
        remembered[structure] = [  # (one per use, None for a use without gradient)
            None if id(use) not in by_use else _completed(by_use[id(use)], layout.num_examples) for use in uses
        ]
        memory.found += 1
        if memory.unstable:
            remembered.clear()
    return MatmulFactors(record, layout, dtype, found_rows)


def _output_vectors(record: GenericRecord, layout: RowLayout, coefficients: Tensor) -> list[Tensor]:
    """Per output of the call, the output gradients of ``Σ_e c_e L_{e,k}`` for each task ``k`` and each row ``c`` of
    ``coefficients`` (``[C, E]``), task-major: ``[m * C, *output]``."""
    num_examples, num_tasks = layout.num_examples, layout.num_tasks
    vectors: list[Tensor] = []
    for index, rows in record.grad_rows:
        per_task = []
        for task in range(num_tasks):
            for coefficient in coefficients:
                table = rows.new_zeros(num_examples, num_tasks)
                table[:, task] = coefficient.to(rows.dtype)
                grad = record.weighted_output(index, rows, table)
                if record._grouped_dim is not None:
                    grad = grad.flatten(record._grouped_dim, record._grouped_dim + 1)
                per_task.append(grad.to(record.output_dtypes[index]))
        vectors.append(per_task[0].unsqueeze(0) if len(per_task) == 1 else torch.stack(per_task))
    return vectors


def _use_edges(record: GenericRecord, uses: list[_Use]) -> dict[Any, frozenset[int]] | None:
    """For a call whose products start at nested uses (:attr:`GenericRecord.serves`): per use node, the indices of the
    call's edges its gradient comes from: the edge at the node itself, else those serving the parameters its
    weight-derived operand comes from; ``None`` when one of those lies upstream of another (the products from both
    would count a path twice)."""
    assert record.serves is not None and record.upstream is not None
    alias_names = {alias.grad_fn: name for name, alias in record.aliases.items() if alias.grad_fn is not None}
    at_node = {edge.node: index for index, edge in enumerate(record.edges)}
    found: dict[Any, frozenset[int]] = {}
    for use in uses:
        if use.node in at_node:  # (its gradient is that edge's)
            found[use.node] = frozenset({at_node[use.node]})
            continue
        names = set(_reached_names(use.target, alias_names))
        served = found.get(use.node, frozenset()) | {
            index for index, names_at in enumerate(record.serves) if names & names_at
        }
        if any(record.upstream[index] & served for index in served):
            return None
        found[use.node] = served
    return found


def _use_grads(record: GenericRecord, uses: list[_Use], vectors: list[Tensor]) -> list[Tensor | None]:
    """The gradients at each use's node of the call's outputs under ``vectors`` (one batched pass; for a call whose
    products start at nested uses, one per group of edges: a pass from all of them at once would add a later use's
    gradient to an earlier one's, see :meth:`GenericRecord.start_at`)."""
    edges = [record.edges[index] for index, _ in record.grad_rows]
    if record.serves is None:
        groups = {tuple(range(len(edges))): [use.node for use in uses]}
    else:
        serving = _use_edges(record, uses)
        assert serving is not None
        positions = {index: position for position, (index, _) in enumerate(record.grad_rows)}
        groups = {}
        for node, indices in serving.items():
            key = tuple(positions[index] for index in sorted(indices) if index in positions)
            groups.setdefault(key, []).append(node)
    node_grads: dict[Any, Tensor | None] = {}
    for key, group in groups.items():
        nodes = list(dict.fromkeys(group))  # (addmm: a product and a bias at one node)
        if not key:  # (no gradient reaches the edges of these uses)
            node_grads.update((node, None) for node in nodes)
            continue
        node_grads.update(zip(nodes, batched_grad(
            [edges[position] for position in key],
            [GradientEdge(node, 0) for node in nodes],
            [vectors[position] for position in key],
        )))
    return [node_grads[use.node] for use in uses]


def _rows_found(record: GenericRecord, layout: RowLayout, dtype: torch.dtype, uses: list[_Use]) -> list[_Rows] | None:
    """Each use's rows with their examples, found by the batched pass over ``1, w, w'`` (``None``: a row reached by
    several examples)."""
    num_examples, num_tasks = layout.num_examples, layout.num_tasks
    device = uses[0].node._input_metadata[0].device
    weights = check_weights(num_examples).to(dtype=dtype, device=device)
    coefficients = torch.cat([torch.ones_like(weights[:1]), weights])  # [3, E]
    # (in full float32 precision: the rows' check holds to float32's rounding, which TF32 products would exceed)
    with full_float32_precision(device):
        use_grads = _use_grads(record, uses, _output_vectors(record, layout, coefficients))
    rtol = RTOL_FLOAT32 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    found: list[_Rows] = []
    for use, grads in zip(uses, use_grads):
        if grads is None or use.num_blocks == 0:  # (an expert that received no token)
            continue
        grads = _block_grads(use, grads.to(dtype)).reshape(num_tasks, 3, use.num_blocks, -1)
        examples = torch.full((use.num_blocks,), -1, dtype=torch.long, device=grads.device)
        if layout.batched:
            for task in range(num_tasks):
                assigned = examples_of_rows(grads[task], weights, rtol)
                if assigned is None:
                    return None
                clash = (examples >= 0) & (assigned >= 0) & (examples != assigned)
                if bool(clash.any()):
                    return None
                examples = torch.where(assigned >= 0, assigned, examples)
        else:
            examples = torch.where((grads[:, 0] != 0).any(2).any(0), 0, -1)
        if use.slices is not None:  # (rows past grouped_mm's last offset use no weight)
            examples = torch.where(use.slices < use.num_slices, examples, -1)
        found.append(_Rows(use, examples, grads[:, 0]))
    return found


def _rows_from_known(
    record: GenericRecord, layout: RowLayout, dtype: torch.dtype, uses: list[_Use], known: list[Tensor | None]
) -> list[_Rows] | None:
    """Each use's rows with the examples found on an earlier call of the same structure, from one pass over the plain
    vector (``None``: a use without gradient then has some now, or a block of no known example has gradient)."""
    num_tasks = layout.num_tasks
    device = uses[0].node._input_metadata[0].device
    ones = torch.ones(1, layout.num_examples, dtype=dtype, device=device)
    # (one vector: an ordinary backward pass; several keep the mode of the engine's passes)
    with one_vector_at_a_time(True) if num_tasks == 1 else nullcontext():
        use_grads = _use_grads(record, uses, _output_vectors(record, layout, ones))
    if len(known) != len(uses):
        return None
    found: list[_Rows] = []
    for use, grads, examples in zip(uses, use_grads, known):
        if grads is None or use.num_blocks == 0:
            continue
        if examples is None or examples.shape[0] != use.num_blocks:
            return None  # (a use without gradient when the rows were found has some now)
        grads = _block_grads(use, grads.to(dtype)).reshape(num_tasks, use.num_blocks, -1)
        unknown = examples < 0
        if bool(unknown.any()) and bool((grads[:, unknown] != 0).any()):
            return None
        found.append(_Rows(use, examples, grads))
    return found


def _completed(examples: Tensor, num_examples: int) -> Tensor:
    """``examples`` with the blocks of no known example (``-1``) given the one that the known blocks' pattern gives:
    ``e``-major (``k`` consecutive blocks per example) or ``e``-minor (block ``r`` of example ``r mod E``); unchanged
    when neither fits."""
    unknown = examples < 0
    count = examples.shape[0]
    if not bool(unknown.any()) or bool(unknown.all()) or count % num_examples:
        return examples
    positions = torch.arange(count, device=examples.device)
    for pattern in (positions // (count // num_examples), positions % num_examples):
        if torch.equal(pattern[~unknown], examples[~unknown]):
            return pattern
    return examples


def _call_structure(
    record: GenericRecord, uses: list[_Use], graph: _CallGraph, layout: RowLayout
) -> tuple[Any, ...] | None:
    """The structure of the call's graph (see the module's docstring), or ``None`` when an operation of the call picks
    entries by the data. Lookups in the weights alone (a relative-position table indexed by a buffer) move no
    example's rows; a lookup in the data by a small index (XLNet's relative shift, an ``index_select`` of an
    ``arange``) is part of the structure with its index's values."""
    entries: list[Any] = []
    for node in graph.walked:
        if node in graph.closure:
            entries.append(type(node).__name__)
        else:
            described = described_node(node)
            if "?" in described:
                described = (described[0], index_digest(node))
            entries.extend(described)
        entries.append(tuple(tuple(metadata.shape) for metadata in node._input_metadata))
    if "?" in entries:
        return None
    for use in uses:
        if use.slices is not None and use.slices.numel() > MAX_INDEX_ENTRIES:
            return None
        slices = None if use.slices is None else digest(use.slices)
        entries.append((use.kind, use.num_blocks, use.num_slices, tuple(use.target_shape), use.reduced,
                        type(use.node).__name__, slices))
    outputs = tuple((index, tuple(rows.shape)) for index, rows in record.grad_rows)
    # Output rows whose examples were found from gradients (see GenericRecord.take_row_examples): which example each
    # row belongs to may change from step to step on the same shapes (tokens sorted by a routing key), so it is part of
    # the structure (a small digest of it; a call with too many rows is not kept).
    rows_found = None
    if record.row_examples is not None:
        if record.row_examples.numel() > MAX_INDEX_ENTRIES:
            return None
        rows_found = digest(record.row_examples)
    return (*entries, outputs, record._grouped_dim, rows_found, layout.num_examples, layout.num_tasks)
