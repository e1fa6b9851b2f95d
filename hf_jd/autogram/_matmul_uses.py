"""Per-example gradients of a generic call's weights from the matrix products that use them (mixtures of experts).

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
``w'`` (random weights per example), gives each row's gradients ``G``, ``G_w`` and ``G_w'``. A row of
example ``e`` has ``G_w = w_e G`` and ``G_w' = w'_e G`` (up to rounding); a row that two examples reach
fails that identity (the difference is linear in the weights) and the call keeps the per-example products.
The rows' gradients per task come from the same pass. Rows with no gradient contribute nothing.

Only calls whose weights meet the data in matrix products alone take this path (``mm``, ``bmm``,
``grouped_mm``, the weight on the right of a row-major product or either side of ``bmm``), in float32 or
float64.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._batched_grad import batched_grad
from ._layout import RowLayout

if TYPE_CHECKING:
    from ._generic import GenericRecord

__all__ = ["matmul_use_rows"]

# Largest number of entries of the per-example operand gradients built for one call (else: the usual path).
MAX_ENTRIES = 2**26
# Modules for which the path did not apply once (a use that is not a product, rows of several examples): they keep
# the usual path on later steps without the walk through their graph or the batched pass being repeated.
_DECLINED: weakref.WeakSet[Any] = weakref.WeakSet()
# A row's gradients must satisfy G_w = w_e G to this relative precision (float32; float64 scales with eps).
_RTOL_FLOAT32 = 3e-5


@dataclass
class _Use:
    """A matrix product using a weight-derived operand, seen as sums over row blocks ``r`` of ``L_rᵀ R_r``
    (the gradient of the weight-derived operand's slice ``slices[r]``)."""

    node: Any
    data: Tensor | None  # the other operand, as saved by the node (None for an addition)
    kind: str  # "rows": y = x @ W, one row per block; "left" / "right": W is bmm's self / mat2; "bias": y = x + W
    slices: Tensor | None  # per block, the slice of ``target`` it uses (None: the whole target)
    num_slices: int
    target: tuple[Any, int]  # the (node, output_nr) of the weight-derived tensor that receives the gradients
    target_shape: torch.Size
    num_blocks: int = 0
    scale: float = 1.0  # an addition's alpha

    def __post_init__(self) -> None:
        if self.data is not None:
            self.num_blocks = self.data.shape[0]


def _walk_call(record: GenericRecord) -> dict[Any, list[Any]]:
    """Consumers of each node of the call's graph (from its output edges down to its parameters' aliases)."""
    assert record.nodes is not None
    consumers: dict[Any, list[Any]] = {}
    stack = [edge.node for edge in record.edges]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            consumers.setdefault(child, []).append(node)
            if child._sequence_nr() in record.nodes:
                stack.append(child)
    return consumers


def _weights_only(record: GenericRecord, consumers: dict[Any, list[Any]]) -> set[Any]:
    """The nodes computed from the call's parameters alone (their aliases, ``transpose``, ``W[e]``...)."""
    closure = {alias.grad_fn for alias in record.aliases.values() if alias.grad_fn is not None}
    stack = list(closure)
    while stack:
        for consumer in consumers.get(stack.pop(), []):
            if consumer not in closure and all(
                child in closure for child, _ in consumer.next_functions if child is not None
            ):
                closure.add(consumer)
                stack.append(consumer)
    return closure


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
        side = 0 if weighted[0] else 1
        data = node._saved_mat2 if side == 0 else node._saved_self
        if data is None or data.dim() != 3:
            return None
        child, nr = operands[side]
        count = data.shape[0]
        selected = _selected_slices(child, nr, count)
        if selected is not None:
            ids, num_slices, target, shape = selected
            return _Use(node, data, "left" if side == 0 else "right", ids, num_slices, target, shape)
        meta = child._input_metadata[nr] if child is not None else None
        if meta is None:
            return None
        shape = torch.Size(meta.shape)
        slices = torch.arange(count, device=data.device)
        return _Use(node, data, "left" if side == 0 else "right", slices, count, (child, nr), shape)
    if name == "AddBackward0" and sum(weighted) == 1:  # a bias: ``y = x + b`` (b: [out], or gathered [rows, out])
        side = 0 if weighted[0] else 1
        child, nr = operands[side]
        out_shape, shape = torch.Size(node._input_metadata[0].shape), torch.Size(child._input_metadata[nr].shape)
        if len(out_shape) != 2:
            return None
        scale = float(node._saved_alpha) if side == 1 else 1.0
        if shape == out_shape:
            selected = _selected_slices(child, nr, out_shape[0])
            if selected is None:
                return None
            ids, num_slices, target, shape = selected
            return _Use(node, None, "bias", ids, num_slices, target, shape, out_shape[0], scale)
        if shape in (out_shape[1:], torch.Size([1, out_shape[1]])):
            return _Use(node, None, "bias", None, 1, (child, nr), shape, out_shape[0], scale)
    return None


def _find_uses(record: GenericRecord) -> list[_Use] | None:
    consumers = _walk_call(record)
    closure = _weights_only(record, consumers)
    assert record.nodes is not None
    uses: dict[Any, _Use] = {}
    for node in closure:
        for consumer in consumers.get(node, []):
            if consumer in closure or consumer in uses:
                continue
            if consumer._sequence_nr() not in record.nodes:
                return None  # a weight-derived tensor leaves the call
            use = _use_of(consumer, closure)
            if use is None:
                return None
            uses[consumer] = use
    return list(uses.values()) or None


def _examples_of_rows(grads: Tensor, weights: Tensor, rtol: float) -> Tensor | None:
    """Example of each row block from its gradients ``[3, R, F]`` under the weights ``1, w, w'`` (``[2, E]``);
    ``-1`` for blocks with no gradient; ``None`` if a block is reached by several examples."""
    plain, scaled = grads[0], grads[1:]
    square = (plain * plain).sum(1)
    zero = square == 0
    if bool((scaled[:, zero] != 0).any()):
        return None
    ratios = (scaled * plain).sum(2) / square.clamp_min(torch.finfo(plain.dtype).tiny)  # [2, R]
    residual = (scaled - ratios.unsqueeze(2) * plain).norm(dim=2)
    if bool((residual[:, ~zero] > rtol * scaled.norm(dim=2)[:, ~zero]).any()):
        return None
    distance = (ratios.unsqueeze(2) - weights.unsqueeze(1)).abs()  # [2, R, E]
    closest, examples = distance.min(2)
    spacing = weights.sort(1).values.diff(dim=1).min() if weights.shape[1] > 1 else weights.new_tensor(1.0)
    fits = closest <= torch.maximum(0.1 * spacing, rtol * weights.abs().amax())
    if bool((~fits[:, ~zero]).any()) or bool((examples[0] != examples[1])[~zero].any()):
        return None
    return torch.where(zero, torch.full_like(examples[0], -1), examples[0])


def _block_sums(left: Tensor, right: Tensor, keys: Tensor, num_keys: int) -> Tensor:
    """``Σ_{r: keys[r] = k} left_rᵀ right_r`` for each key ``k`` (``-1``: left out): ``[num_keys, a, b]`` from
    ``left [R, n, a]`` and ``right [R, n, b]``, as one batched product over the blocks padded per key."""
    keep = keys >= 0
    left, right, keys = left[keep], right[keep], keys[keep]
    out = left.new_zeros(num_keys, left.shape[2], right.shape[2])
    if keys.numel() == 0:
        return out
    keys, order = torch.sort(keys, stable=True)
    left, right = left[order], right[order]
    counts = torch.bincount(keys, minlength=num_keys)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(keys.numel(), device=keys.device) - starts[keys]
    longest = int(counts.max())
    padded_left = left.new_zeros(num_keys, longest, *left.shape[1:])
    padded_right = right.new_zeros(num_keys, longest, *right.shape[1:])
    padded_left[keys, positions] = left
    padded_right[keys, positions] = right
    return torch.bmm(padded_left.flatten(1, 2).mT, padded_right.flatten(1, 2))


def _factors(use: _Use, grad: Tensor) -> tuple[Tensor, Tensor]:
    """``L [R, n, a]`` and ``R [R, n, b]`` of the use's blocks, from one task's output gradient."""
    if use.data is None:  # y = x + b: the gradient of b is Σ_r g_r
        return grad.new_ones(use.num_blocks, 1, 1), use.scale * grad.reshape(use.num_blocks, 1, -1)
    data = use.data.detach().to(grad.dtype)
    if use.kind == "rows":  # y = x W: the gradient of W is Σ_r x_rᵀ g_r
        return data.unsqueeze(1), grad.reshape(data.shape[0], 1, -1)
    if use.kind == "left":  # y_s = W_s x_s ([p, n] = [p, q] @ [q, n]): the gradient of W_s is g_s x_sᵀ
        grad = grad.reshape(data.shape[0], -1, data.shape[2])
        return grad.mT, data.mT
    grad = grad.reshape(data.shape[0], data.shape[1], -1)
    return data, grad  # y_s = x_s W_s: the gradient of W_s is x_sᵀ g_s


def matmul_use_rows(record: GenericRecord, layout: RowLayout, dtype: torch.dtype) -> dict[str, Tensor] | None:
    """Per-row gradients of the call's parameters from the matrix products that use them.

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
    dict of str to Tensor, or None
        ``[R, numel]`` per parameter the call uses (absent: not used), or ``None`` when the path does not apply:
        a parameter used otherwise than by a matrix product, a row reached by several examples, low precision,
        or more memory than :data:`MAX_ENTRIES`. A module for which the path did not apply keeps the usual path on
        later calls.
    """
    if record.nodes is None or record.started_at or record._shared_output or dtype not in (torch.float32,
                                                                                           torch.float64):
        return None
    if record.module in _DECLINED:
        return None
    rows = _rows_from_uses(record, layout, dtype)
    if rows is None:
        _DECLINED.add(record.module)
    return rows


def _rows_from_uses(record: GenericRecord, layout: RowLayout, dtype: torch.dtype) -> dict[str, Tensor] | None:
    uses = _find_uses(record)
    if uses is None:
        return None
    num_rows = layout.num_rows
    if sum(num_rows * use.target_shape.numel() for use in uses) > MAX_ENTRIES:
        return None
    num_examples, num_tasks = layout.num_examples, layout.num_tasks
    generator = torch.Generator().manual_seed(0x5EED)
    spread = (torch.randperm(num_examples, generator=generator).double() + 0.5) / max(num_examples, 1)
    device = uses[0].node._input_metadata[0].device
    weights = torch.stack([1.0 + spread, 1.0 + spread.flip(0)]).to(dtype=dtype, device=device)
    # Output gradients of Σ_e c_e L_{e,k} for each task k and c in (1, w, w').
    coefficients = torch.cat([torch.ones_like(weights[:1]), weights])  # [3, E]
    vectors: list[Tensor] = []
    edges = []
    for index, rows in record.grad_rows:
        per_task = []
        for task in range(num_tasks):
            for coefficient in coefficients:
                table = rows.new_zeros(num_examples, num_tasks)
                table[:, task] = coefficient.to(rows.dtype)
                grad = layout.weighted_grad_output(rows, table)
                if record._grouped_dim is not None:
                    grad = grad.flatten(record._grouped_dim, record._grouped_dim + 1)
                per_task.append(grad.to(record.output_dtypes[index]))
        vectors.append(torch.stack(per_task))
        edges.append(record.edges[index])
    use_grads = batched_grad(edges, [GradientEdge(use.node, 0) for use in uses], vectors)
    rtol = _RTOL_FLOAT32 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    injected: dict[tuple[Any, int], Tensor] = {}
    for use, grads in zip(uses, use_grads):
        if grads is None:
            continue
        grads = grads.to(dtype).reshape(num_tasks, 3, use.num_blocks, -1)
        examples = torch.full((use.num_blocks,), -1, dtype=torch.long, device=grads.device)
        if layout.batched:
            for task in range(num_tasks):
                found = _examples_of_rows(grads[task], weights, rtol)
                if found is None:
                    return None
                clash = (examples >= 0) & (found >= 0) & (examples != found)
                if bool(clash.any()):
                    return None
                examples = torch.where(found >= 0, found, examples)
        else:
            examples = torch.where((grads[:, 0] != 0).any(2).any(0), 0, -1)
        slices = torch.zeros_like(examples) if use.slices is None else use.slices
        keys = torch.where((examples >= 0) & (slices < use.num_slices), examples * use.num_slices + slices, -1)
        per_task = []
        for task in range(num_tasks):
            left, right = _factors(use, grads[task, 0])
            sums = _block_sums(left, right, keys, num_examples * use.num_slices)
            per_task.append(sums.view(num_examples, use.num_slices, *sums.shape[1:]))
        operand = torch.stack(per_task, 1).reshape(num_rows, *use.target_shape)  # rows (e, k), e-major
        injected[use.target] = injected[use.target] + operand if use.target in injected else operand
    if not injected:
        return {}
    names = list(record.aliases)
    targets = list(injected)
    per_parameter = batched_grad(
        [GradientEdge(node, nr) for node, nr in targets],
        [record.aliases[name] for name in names],
        [injected[(node, nr)].to(node._input_metadata[nr].dtype) for node, nr in targets],
    )
    return {name: grad.reshape(num_rows, -1) for name, grad in zip(names, per_parameter) if grad is not None}
