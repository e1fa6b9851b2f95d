"""Record of ``nn.Embedding`` calls: sparse per-row gradients, never a dense ``[R, V, d]`` tensor.

Row ``r = (e, k)``'s gradient is ``S_r[u] = Σ_{t: id_{et} = u} g_{ekt}`` on the rows ``u`` of the
table used by example ``e`` (zero elsewhere). Hence

    K_{(e,k),(f,l)} = Σ_u ⟨S_{ek}[u], S_{fl}[u]⟩.

Ids used by a single example only contribute to that example's diagonal block; only ids shared by
several examples (usually few: padding, special and frequent tokens) need the cross terms, computed
on a dense ``[E, U_shared, m, d]`` tensor. Ids common to all examples (position or token-type
ids broadcast over the batch, recognised by a zero stride along it, or a single example) make
every row dense over those ids: one ``[R, U d]`` product.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._layout import RowLayout
from ._record import Record, compute_dtype

__all__ = [
    "EmbeddingRecord",
    "Tokens",
    "embedding_gram",
    "embedding_scale",
    "is_embedding",
    "is_embedding_subclass",
]


class Tokens(NamedTuple):
    """The looked-up tokens of one or several calls of the same embedding table."""

    ids: Tensor  # [N]
    example: Tensor  # [N], example index of each token
    grads: Tensor  # [N, m, d], gradient of each task w.r.t. the token's embedding

    @staticmethod
    def cat(parts: list[Tokens]) -> Tokens:
        """Concatenate the tokens of several calls.

        Parameters
        ----------
        parts
            The tokens of each call (same number of tasks and embedding size).

        Returns
        -------
        Tokens
            All the tokens, in the order of ``parts``.
        """
        return Tokens(*(torch.cat(tensors) for tensors in zip(*parts)))


def embedding_gram(tokens: Tokens, num_examples: int, vocab: int) -> Tensor:
    """Gram matrix ``[E m, E m]`` of the per-row gradients of an embedding table.

    Parameters
    ----------
    tokens
        The looked-up tokens.
    num_examples
        ``E``.
    vocab
        Number of rows of the table (ids are below it).

    Returns
    -------
    Tensor
        Shape ``[E m, E m]``.
    """
    num_tasks, dim = tokens.grads.shape[1:]
    key = tokens.example * vocab + tokens.ids
    pair_key, inverse = torch.unique(key, return_inverse=True)
    sums = tokens.grads.new_zeros(pair_key.shape[0], num_tasks, dim)
    sums.index_add_(0, inverse, tokens.grads)  # gradient per distinct (example, id) pair
    pair_example, pair_id = pair_key // vocab, pair_key % vocab
    _, id_index, id_count = torch.unique(pair_id, return_inverse=True, return_counts=True)
    shared = id_count[id_index] > 1
    # Ids used by one example only: contributions within that example's diagonal block.
    private = sums[~shared]
    blocks = sums.new_zeros(num_examples, num_tasks, num_tasks)
    blocks.index_add_(0, pair_example[~shared], (private.unsqueeze(2) * private.unsqueeze(1)).sum(-1))
    gram = sums.new_zeros(num_examples, num_tasks, num_examples, num_tasks)
    diagonal = torch.arange(num_examples, device=sums.device)
    gram[diagonal, :, diagonal, :] = blocks
    num_rows = num_examples * num_tasks
    gram = gram.reshape(num_rows, num_rows)
    # Ids shared by several examples: dense over those ids only.
    if bool(shared.any()):
        _, shared_index = torch.unique(id_index[shared], return_inverse=True)
        num_shared = int(shared_index.max()) + 1
        dense = sums.new_zeros(num_examples, num_shared, num_tasks, dim)
        dense[pair_example[shared], shared_index] = sums[shared]
        dense = dense.permute(0, 2, 1, 3).reshape(num_rows, num_shared * dim)
        gram = gram + dense @ dense.T
    return gram


def is_embedding(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Embedding`` with the stock forward.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a stock ``nn.Embedding``.
    """
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


def is_embedding_subclass(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Embedding`` subclass with a forward of its own (e.g. BART's and
    Gemma's scaled word embeddings, ``W[ids] · c``): a candidate for the closed form, verified on its
    first call by :func:`embedding_scale`.

    Parameters
    ----------
    module
        The module.

    Returns
    -------
    bool
        ``True`` for a candidate subclass.
    """
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is not nn.Embedding.forward
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def _ids_in_range(ids: Tensor, num_embeddings: int) -> bool:
    """Whether every id indexes a row of a table of ``num_embeddings`` rows (else looking them up raises)."""
    return ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < num_embeddings)


def computes_scaled_lookup(module: nn.Module, ids: Tensor, output: Tensor, scale: float) -> bool:
    """Whether ``output`` is ``W[ids] · scale`` for the module's weight ``W`` (the check of a later call of an
    ``nn.Embedding`` subclass whose first call :func:`embedding_scale` verified).

    Parameters
    ----------
    module
        The ``nn.Embedding`` (subclass).
    ids
        The ids of the call (or a slice of them).
    output
        The matching output (or slice).
    scale
        The scale found on the first call.

    Returns
    -------
    bool
        ``True`` when the output matches (relative tolerance ``1e-4``).
    """
    assert isinstance(module, nn.Embedding)
    if ids.dtype not in (torch.int32, torch.int64) or output.shape != (*ids.shape, module.weight.shape[1]):
        return False
    if not _ids_in_range(ids, module.weight.shape[0]):
        return False  # (a subclass looking up something else than its input, e.g. the positions of token ids)
    with torch.no_grad():
        expected = nn.functional.embedding(ids, module.weight).to(output.dtype) * scale
        tolerance = 1e-5 * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-12)
        return bool(torch.allclose(expected, output.detach(), rtol=1e-4, atol=tolerance))


def embedding_scale(module: nn.Module, args: tuple[Any, ...], output: Any, table: Tensor) -> float | None:
    """``c`` when a call's output is ``W[ids] · c`` for its first input ``ids`` and a scalar ``c``
    (checked on the values, and, when padding tokens occur, on the gradient the padding row gets from
    the call's graph through ``table``, the weight as the call used it); else ``None``.

    Parameters
    ----------
    module
        The ``nn.Embedding`` (subclass) that was called.
    args
        The call's positional arguments.
    output
        The call's output.
    table
        The weight as the call used it.

    Returns
    -------
    float or None
        ``c``, or ``None`` when the output is not of that form.
    """
    assert isinstance(module, nn.Embedding)
    if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return None
    ids = args[0]
    if ids.dtype not in (torch.int32, torch.int64) or output.shape != (*ids.shape, module.weight.shape[1]):
        return None
    if not _ids_in_range(ids, module.weight.shape[0]):
        return None  # (a subclass looking up something else than its input, e.g. the positions of token ids)
    with torch.no_grad():
        looked_up = nn.functional.embedding(ids, module.weight).to(output.dtype)
        out = output.detach()
        denominator = float((looked_up * looked_up).sum())
        if denominator == 0.0:
            return None
        scale = float((looked_up * out).sum()) / denominator
        tolerance = 1e-5 * max(float(out.abs().max()), 1e-12)
        if not torch.allclose(looked_up * scale, out, rtol=1e-4, atol=tolerance):
            return None
    padding_idx = module.padding_idx
    if padding_idx is not None and bool((ids == padding_idx).any()) and output.requires_grad:
        # The closed form gives the padding row no gradient, as nn.Embedding's forward does: check it.
        (grad,) = torch.autograd.grad(output, table, torch.ones_like(output), retain_graph=True, allow_unused=True)
        if grad is not None and bool(grad[padding_idx].ne(0).any()):
            return None
    return scale


class EmbeddingRecord(Record):
    """One lookup ``y = W[ids]`` of an ``nn.Embedding``.

    Parameters
    ----------
    module
        The module that was called.
    module_name
        Its qualified name (for error messages).
    params
        Its direct trainable parameters at call time, by attribute name.
    args
        The call's positional arguments (the input first).
    output
        The call's output.

    Raises
    ------
    RuntimeError
        If the embedding has ``scale_grad_by_freq=True``.
    """

    module: nn.Embedding  # checked in __init__

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        params: dict[str, nn.Parameter],
        args: tuple[Any, ...],
        output: Tensor,
    ) -> None:
        super().__init__(module, module_name, params)
        assert isinstance(module, nn.Embedding)
        if module.scale_grad_by_freq:
            raise RuntimeError(
                f"Module {self.describe()} has scale_grad_by_freq=True, which scales each gradient "
                "by token frequencies over the whole batch; the autogram engine does not support "
                "it. Build the embedding with scale_grad_by_freq=False."
            )
        self.ids = args[0]  # (the output is the module's own: W[ids], shaped [*ids.shape, d])
        # c of a scaled embedding (output W[ids] · c, verified by the capture): the table's
        # gradient is c times the scattered output gradients.
        self.scale = 1.0

    def can_insert_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`insert_batch` can give the captured ids a batch dimension at ``batch_dim``.

        Parameters
        ----------
        batch_dim
            Where the batch dimension would go.

        Returns
        -------
        bool
            ``True`` while the ids are held and have at least ``batch_dim`` dimensions.
        """
        return isinstance(getattr(self, "ids", None), Tensor) and batch_dim <= self.ids.dim()

    def insert_batch(self, num_examples: int, batch_dim: int) -> None:
        """Repeat the captured ids once per example along a new ``batch_dim``.

        Parameters
        ----------
        num_examples
            Number of examples.
        batch_dim
            Position of the new dimension.
        """
        shape = list(self.ids.shape)
        shape.insert(batch_dim, num_examples)
        self.ids = self.ids.unsqueeze(batch_dim).expand(shape)

    def can_split_batch(self, batch_dim: int) -> bool:
        """Whether :meth:`split_batch` can regroup the captured ids along ``batch_dim`` (e.g. the ``[B·C, T]`` ids of
        a multiple-choice model, ``C`` rows per example).

        Parameters
        ----------
        batch_dim
            The engine's batch dimension.

        Returns
        -------
        bool
            ``True`` while the ids are held and have a dimension ``batch_dim``.
        """
        return isinstance(getattr(self, "ids", None), Tensor) and batch_dim < self.ids.dim()

    def split_batch(self, num_examples: int, batch_dim: int) -> None:
        """Regroup the captured ids ``[..., E·k, ...]`` into ``[..., E, k, ...]`` along ``batch_dim`` (a verified
        batch-major grouping: the ``k`` consecutive rows of each example).

        Parameters
        ----------
        num_examples
            ``E``.
        batch_dim
            The engine's batch dimension.
        """
        self.ids = self.ids.unflatten(batch_dim, (num_examples, -1))

    def _bind(self, grads: list[Tensor | None], layout: RowLayout) -> None:
        (grad,) = grads
        assert grad is not None
        weight = self.module.weight
        self.check_batch(self.ids, layout, "input ids")
        num_examples, num_tasks = layout.num_examples, layout.num_tasks
        dim = weight.shape[1]
        ids = layout.input_to_rows(self.ids).reshape(num_examples, -1)
        rows = layout.grad_to_rows(grad).reshape(num_examples, num_tasks, -1, dim)
        rows = rows.to(compute_dtype(weight))
        if self.scale != 1.0:
            rows = rows * self.scale
        del self.ids
        padding_idx = self.module.padding_idx
        self.token_ids = self.token_example = self.token_grads = None
        if num_examples == 1 or ids.stride(0) == 0:
            # The same ids for every example (position or token-type ids broadcast over the batch,
            # or a single example): per-row gradients are dense over these ids.
            common = ids[0]
            if padding_idx is not None:  # the padding row never receives gradient
                keep = common != padding_idx
                common, rows = common[keep], rows[:, :, keep]
            self.common_ids: Tensor | None = common  # [T]
            self.common_grads: Tensor | None = rows  # [E, m, T, d]
            return
        self.common_ids = self.common_grads = None
        length = ids.shape[1]
        example = torch.arange(num_examples, device=ids.device).unsqueeze(1).expand(-1, length)
        token_grads = rows.permute(0, 2, 1, 3).reshape(num_examples * length, num_tasks, dim)
        token_ids = ids.reshape(-1)
        token_example = example.reshape(-1)
        if padding_idx is not None:  # the padding row never receives gradient
            keep = token_ids != padding_idx
            token_ids, token_example, token_grads = token_ids[keep], token_example[keep], token_grads[keep]
        self.token_ids = token_ids
        self.token_example = token_example
        self.token_grads = token_grads  # [N, m, d]

    def gram(self, name: str) -> Tensor:
        """Gram matrix ``[R, R]`` of the per-row gradients of parameter ``name``.

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, R]``.
        """
        assert self.layout is not None
        if self.common_ids is not None:
            rows = self._common_rows()
            return rows @ rows.T
        return embedding_gram(self.tokens(), self.layout.num_examples, self.module.weight.shape[0])

    def _common_rows(self) -> Tensor:
        """Per-row gradients ``[R, U d]`` restricted to the ``U`` distinct ids shared by all
        examples (in the order of ``torch.unique``)."""
        assert self.common_ids is not None and self.common_grads is not None
        grads = self.common_grads
        num_rows = grads.shape[0] * grads.shape[1]
        unique, inverse = torch.unique(self.common_ids, return_inverse=True)
        if unique.numel() == self.common_ids.numel():  # each id once per example (positions)
            return grads.reshape(num_rows, -1)
        summed = grads.new_zeros(*grads.shape[:2], unique.numel(), grads.shape[-1])
        summed.index_add_(2, inverse, grads)
        return summed.reshape(num_rows, -1)

    def release(self) -> None:
        """Drop the factors and the kept rows once the record's contributions are added."""
        super().release()
        self.token_ids = self.token_example = self.token_grads = None
        self.common_ids = self.common_grads = None

    def tokens(self) -> Tokens:
        """The (id, example, gradient) triples of the non-padding tokens.

        Returns
        -------
        Tokens
            ``N`` tokens: ids ``[N]``, examples ``[N]``, gradients ``[N, m, d]``.
        """
        if self.common_ids is not None:
            assert self.common_grads is not None
            num_examples, num_tasks, length, dim = self.common_grads.shape
            device = self.common_ids.device
            return Tokens(
                self.common_ids.repeat(num_examples),
                torch.arange(num_examples, device=device).repeat_interleave(length),
                self.common_grads.permute(0, 2, 1, 3).reshape(num_examples * length, num_tasks, dim),
            )
        assert self.token_ids is not None and self.token_example is not None and self.token_grads is not None
        return Tokens(self.token_ids, self.token_example, self.token_grads)

    def per_row(self, name: str) -> Tensor:
        """Per-row gradients of the table, materialised (``[R, V d]``: for small tables).

        Parameters
        ----------
        name
            The parameter's name in ``params``.

        Returns
        -------
        Tensor
            Shape ``[R, numel]``.
        """
        assert self.layout is not None
        num_tasks = self.layout.num_tasks
        vocab, dim = self.module.weight.shape
        tokens = self.tokens()
        rows = tokens.grads.new_zeros(self.layout.num_rows * vocab, dim)
        for task in range(num_tasks):
            index = (tokens.example * num_tasks + task) * vocab + tokens.ids
            rows.index_add_(0, index, tokens.grads[:, task])
        return rows.view(self.layout.num_rows, vocab * dim)

    def weighted_grad(self, name: str, weights: Tensor) -> Tensor:
        """Gradient of ``Σ_r w_r L_r`` w.r.t. the table, scattered from the tokens (sparse for a
        ``sparse=True`` embedding, as the ordinary backward).

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
        if self.common_ids is not None:
            assert self.common_grads is not None
            combined = torch.einsum("ek,ektd->td", weights.to(self.common_grads.dtype), self.common_grads)
            ids = self.common_ids
        else:
            tokens = self.tokens()
            combined = (weights.to(tokens.grads.dtype)[tokens.example].unsqueeze(-1) * tokens.grads).sum(1)
            ids = tokens.ids
        if getattr(self.module, "sparse", False):  # as the ordinary backward: a sparse gradient (SparseAdam)
            return torch.sparse_coo_tensor(
                ids.unsqueeze(0), combined, self.module.weight.shape, check_invariants=True
            ).coalesce()
        grad = combined.new_zeros(self.module.weight.shape)
        grad.index_add_(0, ids, combined)
        return grad
