"""Input normalisation and autograd-graph helpers shared by the autojac functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TensorOrTensors",
    "as_tensor_tuple",
    "as_output_vector",
    "check_requires_grad",
    "check_leaves",
    "deduplicate",
    "find_leaves",
    "no_gradient_writes",
]

TensorOrTensors = Tensor | Sequence[Tensor]


def as_tensor_tuple(tensors: TensorOrTensors | Iterable[Tensor], what: str) -> tuple[Tensor, ...]:
    """Return ``tensors`` as a tuple of tensors (a single tensor becomes a 1-tuple).

    Parameters
    ----------
    tensors
        A tensor, or an iterable of tensors.
    what
        Name of the argument, for error messages.

    Returns
    -------
    tuple of Tensor
        The tensors, in order.

    Raises
    ------
    TypeError
        If ``tensors`` is neither a tensor nor an iterable (strings are refused), or an element is not a tensor.
    ValueError
        If there is no tensor.
    """
    if isinstance(tensors, Tensor):
        return (tensors,)
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(
            f"{what} must be a torch.Tensor or a sequence of tensors, got {type(tensors).__name__}."
        )
    result = tuple(tensors)
    for index, tensor in enumerate(result):
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"{what}[{index}] must be a torch.Tensor, got {type(tensor).__name__}."
            )
    if not result:
        raise ValueError(f"{what} is empty: pass at least one tensor.")
    return result


def as_output_vector(outputs: TensorOrTensors, what: str = "outputs") -> Tensor:
    """Flatten ``outputs`` into the vector ``[m]`` of objectives whose Jacobian is wanted.

    A tensor of any shape is flattened in row-major order (a 0-dim tensor gives ``m = 1``); a
    sequence of tensors is flattened element by element and concatenated. At least one entry must
    require grad; entries that do not give zero rows.

    Parameters
    ----------
    outputs
        The objectives: a tensor or a sequence of tensors.
    what
        Name of the argument, for error messages.

    Returns
    -------
    Tensor
        The vector ``[m]`` of objectives.

    Raises
    ------
    TypeError
        If ``outputs`` holds something else than tensors.
    ValueError
        If there is no tensor or no element, an entry is not floating point, or none requires grad.
    """
    tensors = as_tensor_tuple(outputs, what)
    for index, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            raise ValueError(
                f"{what}[{index}] has dtype {tensor.dtype}; the objectives must be real floating "
                "tensors. Compute the losses in a floating dtype."
            )
    if len(tensors) == 1:
        vector = tensors[0].reshape(-1)
    else:
        vector = torch.cat([tensor.reshape(-1) for tensor in tensors])
    if vector.numel() == 0:
        raise ValueError(
            f"{what} is empty (it has 0 elements): pass at least one loss to differentiate."
        )
    if not vector.requires_grad:
        raise ValueError(
            f"None of the {what} requires grad, so there is nothing to differentiate. Compute them "
            "from tensors with requires_grad=True, outside torch.no_grad()."
        )
    return vector


def check_requires_grad(tensors: Sequence[Tensor], what: str) -> None:
    """Raise ``ValueError`` if one of ``tensors`` does not require grad (or is complex).

    Parameters
    ----------
    tensors
        The tensors to check.
    what
        Name of the argument, for error messages.

    Raises
    ------
    ValueError
        If a tensor does not require grad or is complex.
    """
    for index, tensor in enumerate(tensors):
        if not tensor.requires_grad:
            raise ValueError(
                f"{what}[{index}] (shape {tuple(tensor.shape)}) does not require grad: set "
                "requires_grad=True on it or leave it out."
            )
        if tensor.is_complex():
            raise ValueError(
                f"{what}[{index}] (shape {tuple(tensor.shape)}) is complex ({tensor.dtype}): Jacobian descent "
                "needs real tensors (the aggregators' Gramians are real). Split it into real and imaginary parts."
            )


def check_leaves(tensors: Sequence[Tensor], what: str) -> None:
    """Raise ``ValueError`` unless every tensor is a real leaf that requires grad.

    Parameters
    ----------
    tensors
        The tensors to check.
    what
        Name of the argument, for error messages.

    Raises
    ------
    ValueError
        If a tensor does not require grad, is complex, or is not a leaf.
    """
    check_requires_grad(tensors, what)
    for index, tensor in enumerate(tensors):
        if not tensor.is_leaf:
            raise ValueError(
                f"{what}[{index}] (shape {tuple(tensor.shape)}) is not a leaf tensor (it was "
                f"computed by {type(tensor.grad_fn).__name__}); results are stored on leaves such "
                "as parameters. Use hf_jd.autojac.jac to differentiate w.r.t. intermediate tensors."
            )


def deduplicate(tensors: Iterable[Tensor]) -> tuple[Tensor, ...]:
    """Return ``tensors`` without repeated objects (by identity), keeping the first occurrence.

    Parameters
    ----------
    tensors
        The tensors.

    Returns
    -------
    tuple of Tensor
        Each tensor object once, in the order of first occurrence.
    """
    seen: set[int] = set()
    result = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            result.append(tensor)
    return tuple(result)


def graph_nodes(starts: Iterable[Any]) -> Iterator[Any]:
    """Every autograd node reachable from the nodes ``starts`` (themselves included; ``None`` entries
    are skipped), each once, depth first through ``next_functions``.

    Parameters
    ----------
    starts
        Autograd nodes (``tensor.grad_fn``), ``None`` allowed.

    Yields
    ------
    Any
        The reachable nodes, each once.
    """
    seen: set[Any] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def find_leaves(roots: Sequence[Tensor], stop_at: Sequence[Tensor] = ()) -> tuple[Tensor, ...]:
    """Return the leaf tensors requiring grad that back-propagation from ``roots`` reaches.

    The autograd graph is walked through ``grad_fn.next_functions``; every ``AccumulateGrad`` node
    met contributes its ``.variable``. The walk does not go through the ``grad_fn`` of the tensors
    in ``stop_at`` and never returns those tensors themselves. The result is in discovery order
    (depth-first, following ``next_functions`` in order) and has no duplicates.

    Parameters
    ----------
    roots
        The tensors back-propagation starts from.
    stop_at
        Tensors whose ``grad_fn`` the walk does not go through (e.g. the features of a multi-task model).

    Returns
    -------
    tuple of Tensor
        The leaves requiring grad that are reached.
    """
    stop_ids = {id(tensor) for tensor in stop_at}
    stop_nodes = {tensor.grad_fn for tensor in stop_at if tensor.grad_fn is not None}
    leaves: list[Tensor] = []
    seen_leaves: set[int] = set()

    def add_leaf(tensor: Tensor) -> None:
        if id(tensor) not in seen_leaves and id(tensor) not in stop_ids:
            seen_leaves.add(id(tensor))
            leaves.append(tensor)

    stack = []
    for root in roots:
        if root.grad_fn is None:
            if root.requires_grad:
                add_leaf(root)
        elif root.grad_fn not in stop_nodes:
            stack.append(root.grad_fn)
    stack.reverse()
    visited: set[torch.autograd.graph.Node] = set()
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            if variable.requires_grad:
                add_leaf(variable)
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        for child in reversed(children):
            if child not in visited and child not in stop_nodes:
                stack.append(child)
    return tuple(leaves)


def _grad_state(tensor: Tensor) -> tuple[int, int] | None:
    if not (tensor.is_leaf or tensor.retains_grad):
        return None  # autograd writes no .grad there (and reading it warns)
    grad = tensor.grad
    return None if grad is None else (id(grad), grad._version)


@contextmanager
def no_gradient_writes(tensors: Sequence[Tensor], name_of: Callable[[int], str]) -> Iterator[None]:
    """Raise if the ``.grad`` of one of ``tensors`` is written inside the block (``name_of(i)``
    names ``tensors[i]`` in the error).

    ``torch.autograd.grad`` returns gradients without writing any ``.grad``; a custom autograd
    function whose backward writes them itself (the reversible layers of Reformer call
    ``torch.autograd.backward`` on their recomputed blocks) would give wrong Jacobians silently.

    Parameters
    ----------
    tensors
        The tensors whose ``.grad`` must not change.
    name_of
        ``name_of(i)`` names ``tensors[i]`` in the error.

    Yields
    ------
    None
        Control to the block.

    Raises
    ------
    RuntimeError
        If the ``.grad`` of one of ``tensors`` was replaced or modified in place inside the block.
    """
    before = [_grad_state(tensor) for tensor in tensors]
    yield
    for index, (tensor, state) in enumerate(zip(tensors, before)):
        if _grad_state(tensor) != state:
            raise RuntimeError(
                f"The .grad of {name_of(index)} (shape {tuple(tensor.shape)}) was written during a "
                "torch.autograd.grad call: "
                "an autograd function of the model writes the gradients itself in its backward pass (e.g. "
                "Reformer's reversible layers), so the gradients it returns are not those of the losses and the "
                "Jacobian would be wrong. Such models cannot be trained by Jacobian descent: make their layers "
                "ordinary (non-reversible) ones."
            )
