"""``mtl_backward``: the multi-task step: task gradients into heads, a Jacobian into the trunk."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._accumulate import accumulate_grad, accumulate_jac, check_jac_compatible
from ._utils import (
    TensorOrTensors,
    as_tensor_tuple,
    check_leaves,
    check_requires_grad,
    deduplicate,
    find_leaves,
    graph_nodes,
)
from ._vjp import batched_vjp, check_chunk_size

__all__ = ["mtl_backward"]


def _task_losses(losses: TensorOrTensors) -> tuple[Tensor, ...]:
    tensors = as_tensor_tuple(losses, "losses")
    if len(tensors) == 1 and tensors[0].numel() > 1:
        tensors = tuple(tensors[0].reshape(-1).unbind())
    for index, loss in enumerate(tensors):
        if loss.numel() != 1:
            raise ValueError(
                f"losses[{index}] has shape {tuple(loss.shape)}; mtl_backward needs one scalar "
                "loss per task. Reduce each task's loss (e.g. .mean()) first."
            )
        if not loss.requires_grad:
            raise ValueError(
                f"losses[{index}] does not require grad: every task loss must be computed from the "
                "features or from parameters requiring grad, outside torch.no_grad()."
            )
    return tuple(loss.reshape(()) for loss in tensors)


def _task_params(
    tasks_params: Sequence[Iterable[Tensor]] | None,
    losses: tuple[Tensor, ...],
    features: tuple[Tensor, ...],
) -> list[tuple[Tensor, ...]]:
    if tasks_params is None:
        return [find_leaves([loss], stop_at=features) for loss in losses]
    if isinstance(tasks_params, Tensor) or not isinstance(tasks_params, Iterable):
        raise TypeError(
            "tasks_params must be a sequence with one sequence of parameters per task, got "
            f"{type(tasks_params).__name__}."
        )
    per_task = list(tasks_params)
    if len(per_task) != len(losses):
        raise ValueError(
            f"tasks_params has {len(per_task)} entries but there are {len(losses)} losses: give "
            "one sequence of head parameters per task (an empty one for a task without head)."
        )
    result = []
    for index, params in enumerate(per_task):
        if isinstance(params, Tensor):
            params = (params,)
        params = deduplicate(params)
        for position, param in enumerate(params):
            if not isinstance(param, Tensor):
                raise TypeError(
                    f"tasks_params[{index}][{position}] must be a tensor, got "
                    f"{type(param).__name__}."
                )
        check_leaves(params, f"tasks_params[{index}]")
        result.append(params)
    return result


def _check_features_independent(features: tuple[Tensor, ...]) -> None:
    """Raise if a feature is computed from another one (``[h, f(h)]``): the gradient w.r.t. the earlier
    feature already contains the paths through the later one, which the batched product through the
    trunk would then count twice."""
    by_node = {feature.grad_fn: index for index, feature in enumerate(features) if feature.grad_fn is not None}
    by_leaf = {id(feature): index for index, feature in enumerate(features) if feature.grad_fn is None}
    for index, feature in enumerate(features):
        if feature.grad_fn is None:
            continue
        for node in graph_nodes(node for node, _ in feature.grad_fn.next_functions):
            variable = getattr(node, "variable", None)
            other = by_node.get(node, by_leaf.get(id(variable)) if variable is not None else None)
            if other is not None and other != index:
                raise ValueError(
                    f"features[{index}] is computed from features[{other}]: features must not depend on each "
                    "other (the gradient w.r.t. the earlier one already includes the paths through the later "
                    "one). Pass only the last shared representation, or tensors computed side by side."
                )


def mtl_backward(
    losses: TensorOrTensors,
    features: TensorOrTensors,
    *,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""Back-propagate several task losses through task heads and a shared trunk.

    In multi-task learning, the losses :math:`L_1, \dots, L_k` are computed by task-specific heads
    from shared features :math:`f` produced by a trunk with parameters :math:`\theta`. This
    function

    * adds the gradient :math:`\partial L_i / \partial \phi_i` of each task's loss into the
      ``.grad`` of that task's head parameters :math:`\phi_i`, and
    * adds the Jacobian of the losses w.r.t. the shared parameters, whose row :math:`i` is
      :math:`(\partial L_i / \partial f)\, \partial f / \partial \theta`, into the ``.jac`` of each
      shared parameter (shape ``[k] + p.shape``). The rows are obtained by back-propagating the
      ``k`` gradients w.r.t. the features through the trunk in one batched vector-Jacobian
      product.

    :func:`hf_jd.autojac.jac_to_grad` then aggregates the shared Jacobian into ``.grad`` (Jacobian
    descent, Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization",
    arXiv:2406.16232).

    Parameters
    ----------
    losses
        One scalar loss per task: a sequence of scalar tensors, or one tensor of ``k`` entries.
    features
        The shared representation: a tensor or a sequence of tensors (typically non-leaf outputs
        of the trunk) from which every head computes its loss.
    tasks_params
        One sequence of leaf parameters per task. ``None`` (default): for task ``i``, the leaves
        reached from ``losses[i]`` without going through the features.
    shared_params
        Leaf parameters of the trunk. ``None`` (default): the leaves reached from the features.
    retain_graph
        Keep the graph so that it can be differentiated again. With ``False`` and all rows in one
        batched pass (``parallel_chunk_size=None``), the graph is still kept until the losses are
        garbage-collected, for the sequential fallback: ``del`` them before the optimizer step to free
        the activations early (see the Notes of :func:`hf_jd.autojac.jac`).
    parallel_chunk_size
        Tasks per batched backward pass through the trunk; ``None``: all at once; ``1``: one pass
        per task.

    Raises
    ------
    ValueError
        If a loss is not scalar or does not require grad, a feature does not require grad,
        ``tasks_params`` does not have one entry per loss, a parameter is not a leaf requiring
        grad, no shared parameter is found, no loss depends on the features (a task that does not
        gets a zero row), or an existing ``.jac`` has a different shape.

    Notes
    -----
    A parameter reached from a head both through and around the features (e.g. tied weights)
    is found in both groups by default: it then receives the Jacobian rows through the features in
    ``.jac`` and, in ``.grad``, the sum of the task gradients around the features (each path counted
    once: ``jac_to_grad`` with :class:`~hf_jd.aggregation.Sum` then gives the gradient of the sum).

    Examples
    --------
    >>> import torch
    >>> from hf_jd.autojac import mtl_backward
    >>> trunk = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> head_a = torch.tensor(3.0, requires_grad=True)
    >>> head_b = torch.tensor(-1.0, requires_grad=True)
    >>> features = 2 * trunk
    >>> loss_a = head_a * features.sum()
    >>> loss_b = head_b * features[0]
    >>> mtl_backward([loss_a, loss_b], features)
    >>> head_a.grad, head_b.grad
    (tensor(6.), tensor(2.))
    >>> trunk.jac
    tensor([[ 6.,  6.],
            [-2.,  0.]])
    """
    check_chunk_size(parallel_chunk_size)
    loss_tuple = _task_losses(losses)
    feature_tuple = deduplicate(as_tensor_tuple(features, "features"))
    check_requires_grad(feature_tuple, "features")
    _check_features_independent(feature_tuple)
    heads = _task_params(tasks_params, loss_tuple, feature_tuple)
    if shared_params is None:
        shared = find_leaves(feature_tuple)
        if not shared:
            raise ValueError(
                "mtl_backward found no leaf tensor requiring grad behind the features; pass "
                "shared_params explicitly or check that the features come from the trunk."
            )
    else:
        shared = deduplicate(as_tensor_tuple(shared_params, "shared_params"))
        check_leaves(shared, "shared_params")
    check_jac_compatible(shared, len(loss_tuple))

    feature_grads: list[list[Tensor]] = [[] for _ in feature_tuple]
    head_grads: list[list[Tensor]] = []
    num_features = len(feature_tuple)
    reached_features = False
    for loss, head in zip(loss_tuple, heads):
        grads = torch.autograd.grad(
            loss, [*feature_tuple, *head], retain_graph=True, allow_unused=True
        )
        reached_features |= any(grad is not None for grad in grads[:num_features])
        targets = (*feature_tuple, *head)
        filled = [
            torch.zeros_like(target) if grad is None else grad
            for grad, target in zip(grads, targets)
        ]
        for rows, grad in zip(feature_grads, filled[:num_features]):
            rows.append(grad)
        head_grads.append(filled[num_features:])

    if not reached_features:
        raise ValueError(
            "No loss depends on the features: pass the features the heads computed the losses from, in the same "
            "forward pass (not those of an earlier call of the trunk, nor a detached copy). Otherwise the trunk's "
            "Jacobian is zero and its parameters are taken for head parameters (plain gradients)."
        )
    cotangents = [torch.stack(rows) for rows in feature_grads]
    jacobians = batched_vjp(
        feature_tuple,
        shared,
        cotangents,
        retain_graph=retain_graph,
        parallel_chunk_size=parallel_chunk_size,
    )
    # A parameter also reached through the features (tied weights): autograd gave its head gradient with
    # the path through the features included, which is already in its Jacobian row; keep only the rest.
    through_features = {id(param): jacobian for param, jacobian in zip(shared, jacobians)}
    for task, (head, task_head_grads) in enumerate(zip(heads, head_grads)):
        for param, grad in zip(head, task_head_grads):
            shared_jacobian = through_features.get(id(param))
            accumulate_grad(param, grad if shared_jacobian is None else grad - shared_jacobian[task])
    for param, jacobian in zip(shared, jacobians):
        accumulate_jac(param, jacobian)
