"""A loss term shared by every example of the batch (a mixture of experts' load-balancing loss), split by example for
the autogram engine.

With ``L_i = own_i + term`` (``term`` one number for the whole batch), row ``i`` of the Jacobian is ``h_i + a`` with
``h_i = ∇own_i`` and ``a = ∇term``. The term mixes the examples, which sends every call of the engine's modules to
its per-row pass (the cost of one backward pass per example). When the term depends on the parameters only through
``sources``, tensors computed per token (a router's logits, ``[B·T, E]`` rows laid out example by example), its
gradient is ``a = Σ_j ∇p_j`` with the pieces

    p_j = Σ_{rows r of example j} ⟨∂term/∂source_r, source_r⟩    (the first factor held constant),

each of which depends on example ``j`` only. The engine then takes its per-example path on the ``[B, 2]`` rows
``(own_i, p_i)``, whose Gramian ``M`` gives that of the losses:

    K_ik = ⟨h_i, h_k⟩ + Σ_j ⟨h_i, ∇p_j⟩ + Σ_j ⟨∇p_j, h_k⟩ + Σ_{j,l} ⟨∇p_j, ∇p_l⟩,

and ``Σ_i w_i L_i`` has the gradient of the rows weighted by ``w_i`` and ``Σ_i w_i`` (:meth:`SharedTerm.row_weights`).
Were the rows of the sources not laid out example by example, the pieces would mix examples (the engine's checks then
take the per-row pass), but their gradients would still sum to ``a``: the Gramian stays exact either way.

Use (JDTrainer does this for its built-in ``iwrm`` losses)::

    outputs = model(input_ids=ids)  # a mixture of experts with output_router_logits=True
    own = per_token_losses(outputs.logits, labels).mean(dim=1)  # [B]
    term = model.router_aux_loss_coef * outputs.aux_loss
    split = split_shared_term(own, term, [outputs.router_logits])
    if split is None:  # the term depends on the parameters otherwise: the losses as they are
        gramian = engine.compute_gramian(own + term)
    else:
        gramian = split.gramian(engine.compute_gramian(split.rows()))
    weights = weighting(gramian)
    (weights * (own + term)).sum().backward()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SharedTerm", "split_shared_term"]

_LEAF_NODE = "AccumulateGrad"


@dataclass
class SharedTerm:
    """Per-example losses ``own + term`` with ``term`` shared by the examples, and the tensors it depends on.

    Attributes
    ----------
    own
        The examples' own losses, ``[B]``.
    term
        The shared term, a scalar.
    sources
        The tensors through which alone the term depends on the parameters, each with ``B·k`` rows, example by
        example (checked by :func:`split_shared_term`).
    """

    own: Tensor
    term: Tensor
    sources: list[Tensor]

    def rows(self) -> Tensor:
        """The ``[B, 2]`` rows ``(own_i, p_i)`` to give the engine (the pieces ``p_i`` of the module docstring).

        Returns
        -------
        Tensor
            Shape ``[B, 2]``, float32 (float64 when the own losses are).
        """
        num_examples = self.own.shape[0]
        dtype = torch.float64 if self.own.dtype == torch.float64 else torch.float32
        grads = torch.autograd.grad(self.term, self.sources, retain_graph=True, allow_unused=True)
        pieces = self.own.new_zeros(num_examples, dtype=dtype)
        for source, grad in zip(self.sources, grads):
            if grad is not None:
                products = grad.detach().to(dtype) * source.to(dtype)
                pieces = pieces + products.reshape(num_examples, -1).sum(dim=1)
        return torch.stack([self.own.to(dtype), pieces], dim=1)

    @staticmethod
    def gramian(rows_gramian: Tensor) -> Tensor:
        """The ``[B, B]`` Gramian of the losses ``own_i + term`` from the ``[2B, 2B]`` Gramian of :meth:`rows`.

        Parameters
        ----------
        rows_gramian
            The engine's Gramian of the rows (flattened example by example: row ``2i + k``).

        Returns
        -------
        Tensor
            Shape ``[B, B]``.
        """
        num_examples = rows_gramian.shape[0] // 2
        blocks = rows_gramian.view(num_examples, 2, num_examples, 2)
        cross = blocks[:, 0, :, 1].sum(dim=1)  # ⟨h_i, a⟩
        shared = blocks[:, 1, :, 1].sum()  # ‖a‖²
        return blocks[:, 0, :, 0] + cross.unsqueeze(1) + cross.unsqueeze(0) + shared

    @staticmethod
    def row_weights(weights: Tensor) -> Tensor:
        """The ``[B, 2]`` weights of the rows whose weighted gradient is that of ``Σ_i w_i (own_i + term)``.

        Parameters
        ----------
        weights
            The losses' weights, ``[B]``.

        Returns
        -------
        Tensor
            Shape ``[B, 2]``: ``w_i`` and ``Σ_j w_j``.
        """
        return torch.stack([weights, weights.sum().expand_as(weights)], dim=1)


def split_shared_term(own: Tensor, term: Tensor, sources: Sequence[Any]) -> SharedTerm | None:
    """The :class:`SharedTerm` of ``own + term``, or ``None`` when the term cannot be split by example: it depends on a
    parameter other than through the floating tensors of ``sources`` that have a multiple of ``B`` rows (or none
    of them requires grad).

    Parameters
    ----------
    own
        The examples' own losses, ``[B]``.
    term
        The shared term, a scalar.
    sources
        Candidate tensors (nested tuples and lists are flattened; other objects are ignored).

    Returns
    -------
    SharedTerm or None
        The split, or ``None``.
    """
    if own.dim() != 1 or term.numel() != 1 or not term.requires_grad or term.grad_fn is None:
        return None
    num_examples = own.shape[0]
    tensors = [
        tensor
        for tensor in _flatten(sources)
        if tensor.requires_grad
        and tensor.grad_fn is not None
        and tensor.is_floating_point()
        and tensor.dim() >= 1
        and tensor.shape[0] > 0
        and tensor.shape[0] % num_examples == 0
    ]
    if not tensors or not _reaches_leaves_only_through(term, tensors):
        return None
    return SharedTerm(own, term.reshape(()), tensors)


def _flatten(items: Any) -> list[Tensor]:
    if isinstance(items, Tensor):
        return [items]
    if isinstance(items, (tuple, list)):
        return [tensor for item in items for tensor in _flatten(item)]
    return []


def _reaches_leaves_only_through(term: Tensor, sources: list[Tensor]) -> bool:
    """Whether every path from ``term`` back to a tensor that requires grad (a parameter) passes through one of
    ``sources``."""
    stops = {(source.grad_fn, source.output_nr) for source in sources}
    stop_nodes = {node for node, _ in stops}
    seen: set[Any] = set()
    stack: list[Any] = [term.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == _LEAF_NODE:
            return False
        for child, output_nr in node.next_functions:
            if child is None:
                continue
            if (child, output_nr) in stops:
                continue
            if child in stop_nodes:
                return False  # another output of a source's node: not covered by the pieces
            stack.append(child)
    return True
