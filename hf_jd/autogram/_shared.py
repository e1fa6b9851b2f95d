"""Gram matrix of a parameter used by several module calls (tied embeddings, reused layers).

The per-row gradient of such a parameter is the sum over its uses, so its Gram matrix is
``Σ_{i,j} C_ij`` with ``C_ij`` the inner products between use ``i``'s and use ``j``'s per-row
gradients. Embedding lookups of the same table are merged into one token list; Linear-like uses
(:class:`OuterProductRows`) pair with each other in ghost or materialised form, and with the
embedding lookups through

    ⟨Σ_t l_{rt} ⊗ ρ_{rt}, Σ_n onehot(id_n) ⊗ e_{qn}⟩ = Σ_{t,n} l_{rt}[id_n] ⟨ρ_{rt}, e_{qn}⟩

(e.g. GPT-2's output projection ``l = g``, ``ρ = a``, tied with its input embedding), which never
forms a ``[R, V, d]`` tensor. Any other combination materialises the per-row gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._embedding import EmbeddingRecord, Tokens, embedding_gram
from ._outer import OuterProductRecord, OuterProductRows
from ._record import Record

__all__ = ["shared_gram"]


def shared_gram(uses: list[tuple[Record, str]], num_examples: int, dtype: torch.dtype) -> Tensor:
    """Gram matrix ``[R, R]`` of the summed per-row gradients of one parameter's uses.

    Parameters
    ----------
    uses
        The ``(record, parameter name)`` of each use.
    num_examples
        ``E`` of the engine's layout (the uses' own layout takes precedence when set).
    dtype
        Dtype of the result.

    Returns
    -------
    Tensor
        Shape ``[R, R]``.
    """
    embeddings = [record for record, _ in uses if isinstance(record, EmbeddingRecord)]
    outers = [
        record.factors
        for record, name in uses
        if isinstance(record, OuterProductRecord) and name == "weight" and record.factors is not None
    ]
    mixed_layouts = len({record.layout for record, _ in uses}) > 1  # some calls not split by example
    if mixed_layouts or len(embeddings) + len(outers) < len(uses):
        rows = sum(record.per_row(name).to(dtype) for record, name in uses)
        assert isinstance(rows, Tensor)
        return rows @ rows.T
    layout = uses[0][0].layout
    if layout is not None:  # the uses' own layout (one "example" with R tasks on the exact per-row path)
        num_examples = layout.num_examples
    gram: Tensor | int = 0
    tokens = Tokens.cat([record.tokens() for record in embeddings]) if embeddings else None
    if tokens is not None:
        vocab = embeddings[0].module.weight.shape[0]
        gram = gram + embedding_gram(tokens, num_examples, vocab).to(dtype)
    # Uses whose per-row gradients are materialised (not the ghost form): their sum's Gram at once, each use's rows
    # computed once (instead of each use's Gram and the cross terms of every pair, each computing the rows again).
    summed = [outer for outer in outers if not outer.prefers_ghost()] if len(outers) > 1 else []
    if len(summed) > 1:
        gram = gram + _summed_rows_gram(summed).to(dtype)
    in_sum = {id(outer) for outer in summed} if len(summed) > 1 else set()
    for index, outer in enumerate(outers):
        if id(outer) not in in_sum:
            gram = gram + outer.weight_gram().to(dtype)
        for other in outers[index + 1 :]:
            if id(outer) in in_sum and id(other) in in_sum:
                continue
            cross = outer.cross_gram(other).to(dtype)
            gram = gram + cross + cross.T
        if tokens is not None:
            cross = _outer_embedding_cross(outer, tokens, num_examples).to(dtype)
            gram = gram + cross + cross.T
    assert isinstance(gram, Tensor)
    return gram


def _summed_rows_gram(outers: list[OuterProductRows]) -> Tensor:
    """Gram matrix of the per-row gradients summed over uses of one weight, materialised a slice of the weight's first
    dimension at a time when they are large (see :meth:`OuterProductRows.weight_rows`)."""
    chunks = max((outer._chunks() for outer in outers), key=len)
    parts: list[slice | None] = list(chunks) if len(chunks) > 1 else [None]
    gram: Tensor | None = None
    for part in parts:
        rows = outers[0].weight_rows(part=part)
        for outer in outers[1:]:
            rows = rows + outer.weight_rows(part=part)
        products = rows @ rows.T
        gram = products if gram is None else gram + products
    assert gram is not None
    return gram


def _outer_embedding_cross(outer: OuterProductRows, tokens: Tokens, num_examples: int) -> Tensor:
    """Inner products between a Linear-like use's per-row gradients and an embedding's."""
    left, right = outer._factors()  # [E, m or 1, T, V], [E, m or 1, T, d]
    num_tasks = tokens.grads.shape[1]
    # Gather on a 2-D view: index_select along the last dimension of a 4-D tensor is several
    # times slower on CPU (measured 4.4 vs 1.0 ms for GPT-2's [16, 1, 32, 30522] at N = 512).
    picked = left.reshape(-1, left.shape[-1]).index_select(1, tokens.ids).view(*left.shape[:-1], -1)  # [E, ·, T, N]
    products = torch.einsum("ebtd,nld->ebtnl", right, tokens.grads)  # [E, ·, T, N, m]
    per_token = (picked.unsqueeze(-1) * products).sum(dim=2)  # [E, m, N, m]
    per_token = per_token.expand(num_examples, num_tasks, -1, num_tasks)
    cross = per_token.new_zeros(num_examples, num_tasks, num_examples, num_tasks)
    cross.index_add_(2, tokens.example, per_token)
    num_rows = num_examples * num_tasks
    return cross.reshape(num_rows, num_rows)
