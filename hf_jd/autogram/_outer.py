"""Gramian of per-row gradients of the form ``Σ_t g_t a_tᵀ`` (Linear, Conv1D, unfolded Conv2d).

For a weight applied position-wise (``y_t = W a_t``), the gradient of row ``r = (e, k)`` is
``Σ_t g_{ekt} a_{et}ᵀ`` with ``a`` the inputs of example ``e`` (shape ``[E, T, d_in]``) and ``g``
the gradients of task ``k`` w.r.t. the outputs (shape ``[E, m, T, d_out]``). The Gram entries are

    K_{(e,k),(f,l)} = Σ_{t,s} ⟨a_{et}, a_{fs}⟩ ⟨g_{ekt}, g_{fls}⟩

which is either computed in this "ghost" form (cost ~ (R T)² (d_in + d_out)) or by materialising
the per-row gradients (cost ~ R T d_in d_out + R² d_in d_out, plus memory traffic), whichever is
estimated cheaper; materialised rows are computed in chunks that fit a memory budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._record import Record

__all__ = ["OuterProductRecord", "OuterProductRows"]

# Largest number of entries of materialised per-row gradients [R, numel] held at once (beyond it
# they are computed in chunks of the weight's first dimension, and not kept for Engine.backward).
MAX_ROW_ENTRIES = 2**24
# The same on the CPU for rows that are only multiplied into the Gramian (not kept): 8 MB of float32. A buffer larger
# than glibc's largest threshold for recycling freed memory (32 MB) is a fresh mapping whose pages fault in on every
# step, which costs about as much as the products themselves (one CPU thread, [32, 256 x 1024] rows of a BERT
# feed-forward layer at T=128: 8193 page faults and 40 ms a call in one chunk against none and 27 ms in 8 MB chunks).
CPU_CHUNK_ENTRIES = 2**21
# Cost, in multiply-adds, of writing and reading back one entry of materialised per-row gradients
# (that path is bound by memory traffic when the rows are large; calibrated on CPU).
MEMORY_WEIGHT = 100
# The same for per-row gradients of fewer than CACHED_ENTRIES entries (4 MB of float32), which stay in the caches:
# measured on CPU (one thread), [16, 17] rows of 256 x 64 weights (ViT's MLP at 32-pixel images) take 0.32 ms
# materialised against 0.53 ms in the ghost form, which the weight of large rows chose.
SMALL_MEMORY_WEIGHT = 30
CACHED_ENTRIES = 2**20
# Largest [chunk, R*T] block of the ghost form held at once.
MAX_GHOST_BLOCK = 2**24
# Ratio of the energy of an example's mean input to that of its inputs' deviations from it above which the ghost form
# centres the inputs (see OuterProductRows._ghost_parts).
CENTRING_RATIO = 100.0
# Products of a matrix with itself at least this large are computed block-triangularly.
SYMMETRIC_MIN_ROWS = 256
SYMMETRIC_MIN_INNER = 1024
SYMMETRIC_BLOCKS = 4


def _products(rows: Tensor, other_rows: Tensor, symmetric: bool) -> Tensor:
    """``rows @ other_rowsᵀ``; when ``rows`` is ``other_rows`` and the product is large (e.g. the
    ``[B T, B T]`` products over the vocabulary of an output projection), only the blocks on and
    above the diagonal are multiplied and the others mirrored (about 40% fewer flops)."""
    size, inner = rows.shape
    if not symmetric or size < SYMMETRIC_MIN_ROWS or inner < SYMMETRIC_MIN_INNER:
        return rows @ other_rows.T
    out = rows.new_empty(size, size)
    block = -(-size // SYMMETRIC_BLOCKS)
    for start in range(0, size, block):
        products = rows[start : start + block] @ rows[start:].T  # [block, size - start]
        out[start : start + block, start:] = products
        out[start + block :, start : start + block] = products[:, block:].T
    return out


def _ghost(left: Tensor, right: Tensor, other_left: Tensor, other_right: Tensor, symmetric: bool) -> Tensor:
    """``[E, m, E', m']`` sums ``Σ_{t,s} ⟨left_{ekt}, other_left_{fls}⟩ ⟨right_{ekt}, other_right_{fls}⟩`` of factors
    ``[E, m or 1, T, ·]`` and ``[E', m' or 1, T', ·]``, a chunk of examples at a time (``symmetric``: the two sides are
    the same tensors)."""
    num_examples = left.shape[0]
    num_tasks = max(left.shape[1], right.shape[1])
    other_tasks = max(other_left.shape[1], other_right.shape[1])
    length = left.shape[2]
    other_flat_left = other_left.reshape(-1, other_left.shape[-1])
    other_flat_right = other_right.reshape(-1, other_right.shape[-1])
    other_shape = tuple(other_left.shape[:3])
    other_right_shape = tuple(other_right.shape[:3])
    per_example = num_tasks * length * other_flat_left.shape[0] * other_tasks
    chunk = max(1, MAX_GHOST_BLOCK // max(1, per_example))
    blocks = []
    for start in range(0, num_examples, chunk):
        part_left, part_right = left[start : start + chunk], right[start : start + chunk]
        count = part_left.shape[0]
        whole = symmetric and count == num_examples  # products of a matrix with itself
        left_products = _products(part_left.reshape(-1, left.shape[-1]), other_flat_left, whole).view(
            count, part_left.shape[1], length, *other_shape
        )
        right_products = _products(part_right.reshape(-1, right.shape[-1]), other_flat_right, whole).view(
            count, part_right.shape[1], length, *other_right_shape
        )
        block = (left_products * right_products).sum(dim=(2, 5))  # [count, m, E', m']
        blocks.append(block.expand(count, num_tasks, other_shape[0], other_tasks))
    return torch.cat(blocks)


class OuterProductRows:
    """Per-row gradients ``Σ_t g_{ekt} a_{et}ᵀ`` given by their factors.

    Parameters
    ----------
    inputs
        ``a``, shape ``[E, T, d_in]``.
    grads
        ``g``, shape ``[E, m, T, d_out]``, same dtype as ``inputs``.
    transposed
        Whether the weight is stored as ``[d_in, d_out]`` (transformers' ``Conv1D``) instead of
        ``[d_out, d_in]``.
    """

    def __init__(self, inputs: Tensor, grads: Tensor, transposed: bool = False) -> None:
        self.inputs = inputs
        # Laid out once as the products read them: an output gradient arriving as a permuted view (T5's logits under a
        # loss on their [B, V, T] transpose) would otherwise be copied by every reshape of it.
        self.grads = grads.contiguous()
        self.transposed = transposed
        self._rows: Tensor | None = None
        # Inputs shared by all the examples (a table broadcast over the batch, repeated per example as a stride-0
        # view, e.g. DeBERTa's relative-position embeddings under the attention's projections): the products take the
        # table once ([E * d_out, T] @ [T, d_in] instead of E products on copies of it).
        self.shared: Tensor | None = inputs[0] if inputs.shape[0] > 1 and inputs.stride(0) == 0 else None

    @property
    def num_rows(self) -> int:
        """Number ``R = E m`` of rows."""
        return self.grads.shape[0] * self.grads.shape[1]

    def prefers_ghost(self) -> bool:
        """Whether the ghost form needs fewer flops than materialising per-row gradients.

        Returns
        -------
        bool
            ``True`` for the ghost form.
        """
        num_examples, num_tasks, length, d_out = self.grads.shape
        d_in = self.inputs.shape[-1]
        rows = num_examples * num_tasks
        entries = rows * d_in * d_out
        memory = SMALL_MEMORY_WEIGHT if entries < CACHED_ENTRIES else MEMORY_WEIGHT
        materialise = entries * (length + rows + memory)
        ghost = (num_examples * length) ** 2 * d_in + (rows * length) ** 2 * (d_out + 1)
        return self.shared is None and ghost < materialise

    @property
    def _leading(self) -> int:
        """Size of the weight's first dimension (``d_out``, or ``d_in`` when transposed)."""
        return self.inputs.shape[-1] if self.transposed else self.grads.shape[-1]

    def _chunks(self) -> list[slice]:
        """Slices of the weight's first dimension whose per-row gradients fit the budget (the smaller one on the CPU,
        :data:`CPU_CHUNK_ENTRIES`)."""
        leading = self._leading
        per_slice = self.num_rows * (self.inputs.shape[-1] * self.grads.shape[-1] // leading)
        budget = CPU_CHUNK_ENTRIES if self.grads.device.type == "cpu" else MAX_ROW_ENTRIES
        size = max(1, budget // max(1, per_slice))
        return [slice(start, min(start + size, leading)) for start in range(0, leading, size)]

    def weight_rows(self, keep: bool = False, part: slice | None = None) -> Tensor:
        """Materialised per-row weight gradients, ``[R, numel]`` in the weight's layout (of the
        ``part`` of its first dimension only, when given).

        Parameters
        ----------
        keep
            Keep the result for :meth:`weighted_weight_grad`.
        part
            A slice of the weight's first dimension, or ``None`` for all of it.

        Returns
        -------
        Tensor
            Shape ``[R, numel]`` (of the part).
        """
        if self._rows is not None and part is None:
            return self._rows
        if self.shared is not None:
            rows = self._shared_weight_rows(part)
        elif self.transposed:
            inputs = self.inputs if part is None else self.inputs[..., part]
            rows = inputs.transpose(1, 2).unsqueeze(1) @ self.grads  # [E, m, d_in, d_out]
        else:
            grads = self.grads if part is None else self.grads[..., part]
            rows = grads.transpose(2, 3) @ self.inputs.unsqueeze(1)  # [E, m, d_out, d_in]
        rows = rows.reshape(self.num_rows, -1)
        if keep and part is None:
            self._rows = rows
        return rows

    def _shared_weight_rows(self, part: slice | None) -> Tensor:
        """:meth:`weight_rows` of inputs shared by all the examples: batched products with the table as a stride-0
        operand (no copy of it per example)."""
        assert self.shared is not None
        table = self.shared  # [T, d_in]
        num_rows, length = self.num_rows, table.shape[0]
        grads = self.grads.reshape(num_rows, length, -1)  # [R, T, d_out]
        if self.transposed:  # [R, d_in, d_out] rows: tableᵀ @ g of each row
            table = table if part is None else table[:, part]
            rows = torch.bmm(table.T.expand(num_rows, -1, -1), grads)
        else:  # [R, d_out, d_in] rows: gᵀ @ table of each row
            grads = grads if part is None else grads[..., part]
            rows = torch.bmm(grads.transpose(1, 2), table.expand(num_rows, -1, -1))
        return rows.reshape(num_rows, -1)

    def weight_gram(self, keep_rows: bool = False) -> Tensor:
        """Gram matrix ``[R, R]`` of the per-row weight gradients.

        With ``keep_rows``, materialised per-row gradients are kept for
        :meth:`weighted_weight_grad` when they are no larger than the output gradients they replace
        (see :meth:`compact`), so that keeping them costs no memory.

        Parameters
        ----------
        keep_rows
            Keep materialised per-row gradients (see above).

        Returns
        -------
        Tensor
            Shape ``[R, R]``.
        """
        if self._rows is None and self.prefers_ghost():
            return self.cross_gram(self)
        entries = self.num_rows * self.inputs.shape[-1] * self.grads.shape[-1]
        # (rows kept for the single backward's weighted gradient are no larger than the output gradients they replace,
        # and are computed whole within the larger budget)
        keep = keep_rows and entries <= self.grads.numel() and entries <= MAX_ROW_ENTRIES
        chunks = self._chunks()
        if keep or len(chunks) == 1:
            rows = self.weight_rows(keep=keep)
            return rows @ rows.T
        gram = self.grads.new_zeros(self.num_rows, self.num_rows)
        for part in chunks:
            rows = self.weight_rows(part=part)
            gram += rows @ rows.T
        return gram

    def _factors(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with per-row weight gradient ``Σ_t left_t ⊗ right_t`` in the weight's
        layout, each shaped ``[E, m or 1, T, dim]``."""
        inputs = self.inputs.unsqueeze(1)
        return (inputs, self.grads) if self.transposed else (self.grads, inputs)

    def cross_gram(self, other: OuterProductRows, force_ghost: bool = False) -> Tensor:
        """``[R, R]`` matrix of inner products between this object's per-row gradients and
        ``other``'s (two uses of the same weight; ``other`` may be ``self``), in ghost form when
        cheaper for both (or when ``force_ghost``), else materialised chunk by chunk.

        Parameters
        ----------
        other
            The factors of another use of the same weight (same rows).
        force_ghost
            Use the ghost form whatever its cost.

        Returns
        -------
        Tensor
            Shape ``[R, R]``.
        """
        if not force_ghost and not (self.prefers_ghost() and other.prefers_ghost()):
            chunks = self._chunks() if len(self._chunks()) >= len(other._chunks()) else other._chunks()
            gram = self.grads.new_zeros(self.num_rows, self.num_rows)
            for part in chunks:
                gram += self.weight_rows(part=part) @ other.weight_rows(part=part).T
            return gram
        parts = self._ghost_parts()
        other_parts = parts if other is self else other._ghost_parts()
        blocks = []
        for index, (left, right) in enumerate(parts):
            for other_index, (other_left, other_right) in enumerate(other_parts):
                if other is self and other_index < index:
                    continue  # (the transpose of a pair already added)
                same = other is self and other_index == index
                block = _ghost(left, right, other_left, other_right, same).reshape(self.num_rows, other.num_rows)
                blocks.append(block if same or other is not self else block + block.T)
        return torch.stack(blocks).sum(dim=0) if len(blocks) > 1 else blocks[0]

    def _ghost_parts(self) -> list[tuple[Tensor, Tensor]]:
        """``(left, right)`` factor pairs, each ``[E, m or 1, T', dim]`` in the weight's layout, whose ghost sums add up
        to the per-row gradients: ``Σ_t g_t ⊗ a_t = (Σ_t g_t) ⊗ ā + Σ_t g_t ⊗ (a_t - ā)`` with ``ā`` the mean of the
        example's inputs. The two forms are equal; the centred one keeps the terms of the ghost sum about as large as
        its result when the inputs share a large component and the gradients nearly cancel over the positions (the
        choices of a multiple-choice head, whose softmax gradients sum to zero, on nearly equal pooled inputs): there
        the terms ``⟨a_t, a_s⟩ ⟨g_t, g_s⟩`` are many orders of magnitude larger than their sum, whose float32 rounding
        then swamps it. The centred form is used when some example's inputs are nearly equal (see
        :data:`CENTRING_RATIO`), the plain one ``[(g, a)]`` otherwise."""
        inputs = self.inputs.unsqueeze(1)
        pairs = [(inputs, self.grads)]
        if inputs.shape[2] > 1:
            mean = inputs.mean(dim=2, keepdim=True)
            deviations = inputs - mean
            # Centred only where an example's inputs are nearly equal (their common part's energy above
            # CENTRING_RATIO times that of their deviations): elsewhere the terms cannot cancel by more than about
            # that ratio, and the summed output gradients would cost another pass over them (GPT-2's [B, T, V]).
            common = mean.square().sum(dim=(2, 3)) * inputs.shape[2]
            if bool((common > CENTRING_RATIO * deviations.square().sum(dim=(2, 3))).any()):
                pairs = [(deviations, self.grads), (mean, self.grads.sum(dim=2, keepdim=True))]
        return pairs if self.transposed else [(grads, inputs) for inputs, grads in pairs]

    def compact(self) -> None:
        """Drop the factors once the per-row weight gradients are kept (single-backward mode)."""
        if self._rows is not None:
            self.inputs = self.grads = self.shared = None  # type: ignore[assignment]

    def bias_rows(self) -> Tensor:
        """Per-row bias gradients ``Σ_t g_{ekt}``, shape ``[R, d_out]``.

        Returns
        -------
        Tensor
            Shape ``[R, d_out]``.
        """
        return self.grads.sum(dim=2).reshape(self.num_rows, -1)

    def weighted_weight_grad(self, weights: Tensor) -> Tensor:
        """``Σ_r w_r (Σ_t g_{rt} a_{rt}ᵀ)``, flattened in the weight's layout (``weights`` ``[E, m]``).

        Parameters
        ----------
        weights
            The loss weights, shape ``[E, m]``.

        Returns
        -------
        Tensor
            The weighted gradient, flattened, shape ``[numel]``.
        """
        if self._rows is not None:
            return weights.reshape(-1).to(self._rows.dtype) @ self._rows
        weights = weights.to(self.grads.dtype)
        grads, inputs = self.grads, self.inputs
        if self.shared is not None:  # Σ_r w_r g_r first, then one product with the shared table
            combined = torch.einsum("ek,ektd->td", weights, grads)
            table = self.shared
            return (table.T @ combined if self.transposed else combined.T @ table).reshape(-1)
        if grads.shape[1] == 1 and inputs.shape[-1] < grads.shape[-1]:
            # One task: scale the smaller factor (e.g. the inputs of a [V, d] output projection).
            inputs = inputs * weights.view(-1, 1, 1)
            combined = grads[:, 0]
        elif grads.shape[1] == 1:
            combined = grads[:, 0] * weights.view(-1, 1, 1)
        else:
            combined = torch.einsum("ek,ektd->etd", weights, grads)
        combined = combined.reshape(-1, combined.shape[-1])
        inputs = inputs.reshape(-1, inputs.shape[-1])
        return (inputs.T @ combined if self.transposed else combined.T @ inputs).reshape(-1)


class OuterProductRecord(Record):
    """Record whose ``weight`` (and optional ``bias``) gradients are given by
    :class:`OuterProductRows` factors, set by the subclass in ``_bind``."""

    factors: OuterProductRows | None = None

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self.factors = None

    def compact(self) -> None:
        """Drop the factors :meth:`weighted_grad` no longer needs once every parameter's rows are kept."""
        super().compact()
        if self.factors is not None and set(self.kept_rows) >= set(self.params) - {"weight"}:
            self.factors.compact()

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of ``weight`` (materialised from the factors) or ``bias``.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        assert self.factors is not None
        if name == "weight":
            return self.factors.weight_rows()
        return self.factors.bias_rows()

    def gram(self, name: str) -> Tensor:
        """Gram matrix ``[R, R]`` of parameter ``name``: ghost or materialised for ``weight``.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, R]``.
        """
        assert self.factors is not None
        if name == "weight":
            return self.factors.weight_gram(keep_rows=self.keep_rows)
        return super().gram(name)

    def weighted_grad(self, name: str, weights: Tensor) -> Tensor:
        """Gradient of ``Σ_r w_r L_r`` w.r.t. parameter ``name`` (from the factors for ``weight``).

        Parameters
        ----------
        name
            The parameter's name in ``params``.
        weights
            The loss weights, shaped ``[E, m]`` in this record's layout.

        Returns
        -------
        Tensor
            Shaped as the parameter.
        """
        assert self.factors is not None
        if name == "weight":
            return self.factors.weighted_weight_grad(weights).view(self.params[name].shape)
        return super().weighted_grad(name, weights)
