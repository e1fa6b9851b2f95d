"""``torch.autograd.grad`` over a batch of output gradients, with a fallback for compiled graphs.

The engine back-propagates several vectors at once (one per task, or per loss row) with
``is_grads_batched=True``, which vmaps the backward pass. The backward kernels that
``torch.compile`` generates (``CompiledFunctionBackward`` nodes) cannot be vmapped ("Cannot access
data pointer of Tensor that doesn't have storage"), nor can the forward passes of checkpointed blocks
that a backward pass re-runs (vmap rejects their dropout), nor can group norms of channels-last inputs
("NYI: querying is_contiguous inside of vmap"); for such graphs the vectors are back-propagated one
after the other, which gives the same result for as many backward passes as vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = [
    "batched_grad",
    "explain_donated_buffers",
    "has_compiled_nodes",
    "one_vector_at_a_time",
    "vmap_rejects_channels_last",
]

# Autograd nodes of graphs compiled by torch.compile (AOTAutograd).
_COMPILED_NODES = frozenset({"CompiledFunctionBackward"})
# Backward kernels that vmap rejects for channels-last inputs on CPU (they query the memory format). Checked with
# torch 2.13: convolutions (2-D, 3-D, depthwise, transposed), pooling, interpolation, layer, instance and batch norms
# pass; GroupNorm (2-D and 3-D) fails.
_CHANNELS_LAST_VMAP_FAILURES = frozenset({"NativeGroupNormBackward0"})

_ONE_AT_A_TIME: ContextVar[bool] = ContextVar("hf_jd_autogram_one_vector_at_a_time", default=False)


def has_compiled_nodes(nodes: Iterable[Any]) -> bool:
    """Whether any of the autograd ``nodes`` comes from ``torch.compile``.

    Parameters
    ----------
    nodes
        Autograd nodes.

    Returns
    -------
    bool
        ``True`` if one is a ``CompiledFunctionBackward``.
    """
    return any(type(node).__name__ in _COMPILED_NODES for node in nodes)


def vmap_rejects_channels_last(nodes: Iterable[Any], device: torch.device) -> bool:
    """Whether a graph with channels-last inputs must be back-propagated one vector at a time.

    Parameters
    ----------
    nodes
        The autograd nodes of the graph.
    device
        The device of the losses.

    Returns
    -------
    bool
        On CPU, ``True`` when a node's backward kernel is one that vmap rejects for channels-last inputs
        (GroupNorm); on other devices, whose kernels for channels-last inputs were not all checked, always
        ``True``.
    """
    if device.type != "cpu":
        return True
    return any(type(node).__name__ in _CHANNELS_LAST_VMAP_FAILURES for node in nodes)


@contextmanager
def one_vector_at_a_time(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`batched_grad` loops over the vectors when ``enabled``.

    Parameters
    ----------
    enabled
        Loop over the vectors (``False`` restores the batched pass within the block).

    Yields
    ------
    None
    """
    token = _ONE_AT_A_TIME.set(enabled)
    try:
        yield
    finally:
        _ONE_AT_A_TIME.reset(token)


def batched_grad(
    outputs: Tensor | Sequence[Tensor] | Sequence[GradientEdge],
    inputs: Sequence[Tensor] | Sequence[GradientEdge],
    grad_outputs: Tensor | Sequence[Tensor],
    retain_graph: bool = True,
) -> list[Tensor | None]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True, allow_unused=True)``.

    ``grad_outputs`` has a leading batch dimension (one vector per entry); so does each returned
    gradient (``None`` for an input the outputs do not depend on).

    Parameters
    ----------
    outputs
        The tensors (or their gradient edges) to differentiate.
    inputs
        The tensors (or gradient edges) to differentiate with respect to.
    grad_outputs
        One batch of vectors per output, leading dimension ``k``.
    retain_graph
        Keep the graph after the pass.

    Returns
    -------
    list of Tensor or None
        Per input, its gradients ``[k, *shape]``, or ``None``.
    """
    if not _ONE_AT_A_TIME.get():
        return list(
            torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=grad_outputs,
                retain_graph=retain_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
        )
    vectors = [grad_outputs] if isinstance(grad_outputs, Tensor) else list(grad_outputs)
    count = vectors[0].shape[0]
    rows = []
    for index in range(count):
        row_vectors = [vector[index] for vector in vectors]
        rows.append(
            torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=row_vectors[0] if isinstance(grad_outputs, Tensor) else row_vectors,
                retain_graph=retain_graph or index < count - 1,
                allow_unused=True,
            )
        )
    grads: list[Tensor | None] = []
    for position in range(len(inputs)):
        parts = [row[position] for row in rows]
        if all(part is None for part in parts):
            grads.append(None)
        else:
            # Zeros shaped as a computed part (an input may be a GradientEdge, which has no data).
            reference = next(part for part in parts if part is not None)
            grads.append(torch.stack([torch.zeros_like(reference) if p is None else p for p in parts]))
    return grads


@contextmanager
def explain_donated_buffers() -> Iterator[None]:
    """Re-raise AOTAutograd's "donated buffers" error with what to do about it in the engine's terms.

    Yields
    ------
    None

    Raises
    ------
    RuntimeError
        In place of AOTAutograd's "donated buffer" error (others pass through unchanged).
    """
    try:
        yield
    except RuntimeError as error:
        if "donated buffer" not in str(error):
            raise
        raise RuntimeError(
            "The model was compiled by torch.compile with donated buffers, so its compiled backward may run "
            "only once, but the Gramian pass keeps the graph for the weighted backward that follows. Compile "
            "and run the model with donation off: `torch._functorch.config.donated_buffer = False` before the "
            "first compiled forward pass (or inside `with torch._functorch.config.patch(donated_buffer=False):`; "
            "JDTrainer does this for torch_compile=True)."
        ) from error
