"""``backward``: Jacobians of several losses accumulated into ``.jac``, like ``Tensor.backward``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ._accumulate import accumulate_jac, check_jac_compatible
from ._utils import (
    TensorOrTensors,
    as_output_vector,
    as_tensor_tuple,
    check_leaves,
    deduplicate,
    find_leaves,
)
from ._vjp import batched_vjp, check_chunk_size

__all__ = ["backward"]


def backward(
    tensors: TensorOrTensors,
    inputs: TensorOrTensors | Iterable[Tensor] | None = None,
    *,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""Accumulate the Jacobian of ``tensors`` w.r.t. leaf tensors into their ``.jac`` attribute.

    The multi-objective counterpart of :func:`torch.autograd.backward`: for every leaf :math:`p`
    it adds :math:`\partial y / \partial p` (shape ``[m] + p.shape``, row :math:`i` the gradient
    of objective :math:`y_i`) to ``p.jac``. An aggregator then turns these Jacobians into an
    update with :func:`hf_jd.autojac.jac_to_grad`; this is one step of Jacobian descent (Quinton &
    Rey, "Jacobian Descent For Multi-Objective Optimization", arXiv:2406.16232).

    Parameters
    ----------
    tensors
        The objectives: a tensor of any shape, flattened into ``m`` entries (e.g. per-example
        losses of shape ``[B]``), or a sequence of tensors (e.g. scalar task losses) flattened and
        concatenated. At least one entry must require grad.
    inputs
        Leaf tensors (e.g. ``model.parameters()``) to accumulate into. ``None`` (default): every
        leaf requiring grad that back-propagation from ``tensors`` reaches (found by walking
        ``grad_fn.next_functions`` to the ``AccumulateGrad`` nodes). Repeated tensors count once.
    retain_graph
        Keep the graph so that it can be differentiated again. With ``False`` and all rows in one
        batched pass (``parallel_chunk_size=None``), the graph is still kept until the losses are
        garbage-collected, for the sequential fallback: ``del`` them before the optimizer step to free
        the activations early (see the Notes of :func:`hf_jd.autojac.jac`).
    parallel_chunk_size
        Rows per batched backward pass; ``None``: all rows at once; ``1``: sequential loop.

    Raises
    ------
    ValueError
        If ``tensors`` is empty or does not require grad, an explicit input is not a leaf
        requiring grad, no leaf is reached, or an existing ``.jac`` has a different shape.

    Examples
    --------
    >>> import torch
    >>> from hf_jd.autojac import backward
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> losses = torch.stack([w.sum(), w @ w])
    >>> backward(losses)
    >>> w.jac
    tensor([[1., 1.],
            [2., 4.]])
    """
    check_chunk_size(parallel_chunk_size)
    vector = as_output_vector(tensors, "tensors")
    if inputs is None:
        leaves = find_leaves([vector])
        if not leaves:
            raise ValueError(
                "backward found no leaf tensor requiring grad in the graph of the given tensors; "
                "pass the tensors to differentiate with respect to as inputs."
            )
    else:
        leaves = deduplicate(as_tensor_tuple(inputs, "inputs"))
        check_leaves(leaves, "inputs")
    check_jac_compatible(leaves, vector.numel())
    identity = torch.eye(vector.numel(), dtype=vector.dtype, device=vector.device)
    jacobians = batched_vjp(
        [vector],
        leaves,
        [identity],
        retain_graph=retain_graph,
        parallel_chunk_size=parallel_chunk_size,
    )
    for leaf, jacobian in zip(leaves, jacobians):
        accumulate_jac(leaf, jacobian)
