"""``torch.autograd.grad`` over a batch of output gradients, with a fallback for compiled graphs.

The engine back-propagates several vectors at once (one per task, or per loss row) with
``is_grads_batched=True``, which vmaps the backward pass. The backward kernels that
``torch.compile`` generates (``CompiledFunctionBackward`` nodes) cannot be vmapped ("Cannot access
data pointer of Tensor that doesn't have storage"), nor can the forward passes of checkpointed blocks
that a backward pass re-runs (vmap rejects their dropout), nor can group norms and max_unpool of channels-last
tensors ("NYI: querying is_contiguous inside of vmap"), nor can cuDNN's fused recurrent kernels ("Batching rule not
implemented for aten::_cudnn_rnn_backward", an H200 with torch 2.11); for such graphs the vectors are back-propagated
one after the other, which gives the same result for as many backward passes as vectors. Graphs holding a kernel
that no rule here names are found out when their vmapped pass fails: the pass is then redone one vector at a time
(the graph is kept for it), and the engine's later steps go that way from the start.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ..autojac._utils import graph_nodes

__all__ = [
    "VmapFailure",
    "batched_grad",
    "has_unbatchable_nodes",
    "recording_vmap_failures",
    "explain_donated_buffers",
    "group_norm_guards",
    "guarded_grad",
    "guarding_group_norms",
    "has_compiled_nodes",
    "is_channels_last",
    "one_vector_at_a_time",
    "plain_grad",
    "vmap_rejects_channels_last",
]

# Autograd nodes of graphs compiled by torch.compile (AOTAutograd).
_COMPILED_NODES = frozenset({"CompiledFunctionBackward"})
# Backward kernels that vmap rejects for channels-last tensors (they query the memory format), with the saved tensor
# whose layout decides. Checked on CPU with torch 2.13 over about a hundred backward kernels: GroupNorm's and
# max_unpool's (2-D and 3-D) fail; convolutions (also transposed, depthwise, 3-D), pooling, interpolation, layer,
# instance and batch norms pass.
_CHANNELS_LAST_VMAP_FAILURES = {
    "NativeGroupNormBackward0": "_saved_input",
    "MaxUnpool2DBackward0": "_saved_indices",
    "MaxUnpool3DBackward0": "_saved_indices",
}


# Backward kernels that vmap has no batching rule for and cannot fall back on (they return lists of tensors): cuDNN's
# and MIOpen's fused recurrent layers (nn.RNN, nn.LSTM, nn.GRU on a GPU).
_UNBATCHABLE_NODES = frozenset({"CudnnRnnBackward0", "MiopenRnnBackward0"})
# What torch's errors say when a vmapped backward pass meets a kernel it cannot batch.
_VMAP_FAILURE_MARKERS = ("batching rule", "vmap")


_ONE_AT_A_TIME: ContextVar[bool] = ContextVar("hf_jd_autogram_one_vector_at_a_time", default=False)
_GUARDS: ContextVar[tuple[GradientEdge, ...]] = ContextVar("hf_jd_autogram_group_norm_guards", default=())
_FAILURES: ContextVar[list[str] | None] = ContextVar("hf_jd_autogram_vmap_failures", default=None)


class VmapFailure(RuntimeError):
    """A vmapped backward pass failed on a kernel that cannot be batched after the pass had freed the graph, so it
    could not be redone one vector at a time."""


def has_unbatchable_nodes(nodes: Iterable[Any]) -> bool:
    """Whether the graph holds a backward kernel that vmap cannot batch (cuDNN's and MIOpen's recurrent layers).

    Parameters
    ----------
    nodes
        Autograd nodes.

    Returns
    -------
    bool
        ``True`` if one is such a kernel's node.
    """
    return _any_node_of(nodes, _UNBATCHABLE_NODES)


def _any_node_of(nodes: Iterable[Any], types: frozenset[str]) -> bool:
    return any(type(node).__name__ in types for node in nodes)


def _is_vmap_failure(error: RuntimeError) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _VMAP_FAILURE_MARKERS)


@contextmanager
def recording_vmap_failures() -> Iterator[list[str]]:
    """Within the block, the vmapped passes of :func:`batched_grad` that failed and were redone one vector at a time
    append torch's message to the yielded list.

    Yields
    ------
    list of str
        The messages, one per failed pass.
    """
    failures: list[str] = []
    token = _FAILURES.set(failures)
    try:
        yield failures
    finally:
        _FAILURES.reset(token)


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
    return _any_node_of(nodes, _COMPILED_NODES)


def is_channels_last(tensor: Tensor) -> bool:
    """Whether a 4-D or 5-D tensor is laid out channels-last (and not also contiguous).

    Parameters
    ----------
    tensor
        A tensor.

    Returns
    -------
    bool
        ``True`` for a channels-last (or channels-last-3d) layout.
    """
    if tensor.dim() == 4:
        return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
    if tensor.dim() == 5:
        return tensor.is_contiguous(memory_format=torch.channels_last_3d) and not tensor.is_contiguous()
    return False


def group_norm_guards(nodes: Iterable[Any]) -> list[GradientEdge]:
    """The input edges of the graph's group norms of channels-last tensors.

    With torch 2.13 on CPU, the backward kernel of such a group norm crashes the process (a segmentation fault) when
    its weight's gradient is needed but not its input's (a pass from a generic call's outputs to its own parameter,
    ``F.group_norm(x, groups, self.weight)``). The engine's passes over one vector at a time also ask for these input
    edges (see :func:`guarding_group_norms`), which makes the kernel compute both.

    Parameters
    ----------
    nodes
        The autograd nodes of the graph.

    Returns
    -------
    list of GradientEdge
        One per such group norm whose input requires grad.
    """
    guards = []
    for node in nodes:
        if type(node).__name__ != "NativeGroupNormBackward0":
            continue
        try:
            saved = node._saved_input
        except RuntimeError:  # (freed)
            continue
        child, output_nr = node.next_functions[0]
        if isinstance(saved, Tensor) and is_channels_last(saved) and child is not None:
            guards.append(GradientEdge(child, output_nr))
    return guards


def guarded_grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], **kwargs: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, **kwargs)``, also asking for the input gradients of the graph's group
    norms of channels-last tensors (see :func:`group_norm_guards`), which it drops.

    Parameters
    ----------
    outputs
        The tensors to differentiate.
    inputs
        The tensors to differentiate with respect to.
    **kwargs
        Passed to ``torch.autograd.grad`` (``allow_unused`` is set when guards are added).

    Returns
    -------
    tuple
        Per input, its gradient (or ``None``).
    """
    guards = group_norm_guards(graph_nodes(output.grad_fn for output in outputs))
    if not guards:
        return tuple(torch.autograd.grad(outputs, inputs, **kwargs))
    kwargs["allow_unused"] = True
    mixed = [*inputs, *guards]  # (tensors and edges: autograd takes both)
    return tuple(torch.autograd.grad(outputs, mixed, **kwargs))[: len(inputs)]  # type: ignore[arg-type]


@contextmanager
def guarding_group_norms(guards: Sequence[GradientEdge]) -> Iterator[None]:
    """Within the block, the passes of :func:`batched_grad` over one vector at a time also ask for the gradients at
    ``guards`` (see :func:`group_norm_guards`), then drop them.

    Parameters
    ----------
    guards
        The input edges of the graph's group norms of channels-last tensors.

    Yields
    ------
    None
    """
    token = _GUARDS.set(tuple(guards))
    try:
        yield
    finally:
        _GUARDS.reset(token)


def vmap_rejects_channels_last(nodes: Iterable[Any], device: torch.device, channels_last_inputs: bool) -> bool:
    """Whether a graph must be back-propagated one vector at a time because of channels-last tensors.

    Parameters
    ----------
    nodes
        The autograd nodes of the graph.
    device
        The device of the losses.
    channels_last_inputs
        Whether a captured module call had a channels-last input.

    Returns
    -------
    bool
        ``True`` when a node whose backward kernel vmap rejects for channels-last tensors (GroupNorm, max_unpool) saved
        one, whether or not a module call received it; and, on other devices than the CPU (whose kernels for
        channels-last tensors were not all checked), whenever a module call had a channels-last input.
    """
    if channels_last_inputs and device.type != "cpu":
        return True
    for node in nodes:
        attribute = _CHANNELS_LAST_VMAP_FAILURES.get(type(node).__name__)
        if attribute is None:
            continue
        try:
            saved = getattr(node, attribute)
        except RuntimeError:  # (freed: the layout is unknown)
            return True
        if not isinstance(saved, Tensor) or is_channels_last(saved):
            return True
    return False


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

    Raises
    ------
    VmapFailure
        When the vmapped pass fails on a kernel that cannot be batched and ``retain_graph`` is ``False`` (the graph
        is then partly freed; with ``retain_graph`` the pass is redone one vector at a time instead).
    """
    if not _ONE_AT_A_TIME.get():
        try:
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
        except RuntimeError as error:
            if not _is_vmap_failure(error):
                raise
            if not retain_graph:
                raise VmapFailure(
                    "hf_jd.autogram: a backward kernel of this graph cannot be vmapped (torch: "
                    f"{_first_line(error)}), and the failed pass had already freed the graph, so the step cannot "
                    "be finished. The engine back-propagates one vector at a time from its next step on: run the "
                    "step again."
                ) from error
            failures = _FAILURES.get()
            if failures is not None:
                failures.append(_first_line(error))
    vectors = [grad_outputs] if isinstance(grad_outputs, Tensor) else list(grad_outputs)
    count = vectors[0].shape[0]
    rows = [
        _guarded_pass(outputs, inputs, [vector[index] for vector in vectors], retain_graph or index < count - 1)
        for index in range(count)
    ]
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


def plain_grad(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor] | Sequence[GradientEdge],
    grad_outputs: Tensor | Sequence[Tensor],
) -> list[Tensor | None]:
    """One ordinary backward pass (graph kept), shaped as :func:`batched_grad`'s over one vector: ``grad_outputs``
    and the returned gradients have a leading dimension of 1. Unlike ``batched_grad`` inside
    ``one_vector_at_a_time(True)``, it leaves the mode of the passes that run during it (in hooks) as it was.

    Parameters
    ----------
    outputs
        The tensors to differentiate.
    inputs
        The tensors (or gradient edges) to differentiate with respect to.
    grad_outputs
        One vector per output, leading dimension 1.

    Returns
    -------
    list of Tensor or None
        Per input, its gradient ``[1, *shape]``, or ``None``.
    """
    vectors = [grad_outputs] if isinstance(grad_outputs, Tensor) else list(grad_outputs)
    assert all(vector.shape[0] == 1 for vector in vectors)
    grads = _guarded_pass(outputs, inputs, [vector[0] for vector in vectors], retain_graph=True)
    return [None if grad is None else grad.unsqueeze(0) for grad in grads]


def _guarded_pass(
    outputs: Tensor | Sequence[Tensor] | Sequence[GradientEdge],
    inputs: Sequence[Tensor] | Sequence[GradientEdge],
    vectors: list[Tensor],
    retain_graph: bool,
) -> tuple[Tensor | None, ...]:
    """One ordinary backward pass of one vector per output, also asking for the gradients at the guarded group norms'
    input edges (see :func:`guarding_group_norms`), which it drops."""
    grads = torch.autograd.grad(
        outputs,
        [*inputs, *_GUARDS.get()],  # (tensors and edges mixed: autograd takes both)
        grad_outputs=vectors,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return tuple(grads[: len(inputs)])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
