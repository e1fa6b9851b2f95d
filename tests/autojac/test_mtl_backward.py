"""Tests of hf_jd.autojac.mtl_backward against per-task gradients from torch.autograd.grad."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import hf_jd.autojac._vjp as vjp_module
from hf_jd.autojac import mtl_backward

from .helpers import NoBatchingRule, assert_close, bert_batch, tiny_bert


def _trunk_and_heads(num_tasks: int = 3) -> tuple[nn.Module, list[nn.Module]]:
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.ReLU())
    heads = [nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)) for _ in range(num_tasks)]
    return trunk, heads


def _losses(features: Tensor, heads: list[nn.Module], targets: Tensor) -> list[Tensor]:
    return [
        nn.functional.mse_loss(head(features).squeeze(-1), targets[:, i])
        for i, head in enumerate(heads)
    ]


def _expected(
    losses: list[Tensor], shared: list[Tensor], heads: list[nn.Module]
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Shared Jacobians (one per shared parameter) and per-task head gradients, task by task."""
    shared_rows = []
    head_grads = []
    for loss, head in zip(losses, heads):
        shared_rows.append(torch.autograd.grad(loss, shared, retain_graph=True))
        head_grads.append(list(torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)))
    jacobians = [torch.stack(rows) for rows in zip(*shared_rows)]
    return jacobians, head_grads


@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("explicit", [False, True])
def test_matches_per_task_gradients(chunk: int | None, explicit: bool) -> None:
    trunk, heads = _trunk_and_heads()
    inputs, targets = torch.randn(8, 5), torch.randn(8, 3)
    features = trunk(inputs)
    losses = _losses(features, heads, targets)
    shared = list(trunk.parameters())
    expected_jac, expected_grads = _expected(losses, shared, heads)
    mtl_backward(
        losses,
        features,
        tasks_params=[list(h.parameters()) for h in heads] if explicit else None,
        shared_params=shared if explicit else None,
        parallel_chunk_size=chunk,
    )
    for param, jacobian in zip(shared, expected_jac):
        assert param.grad is None
        assert_close(param.jac, jacobian)
    for head, grads in zip(heads, expected_grads):
        for param, grad in zip(head.parameters(), grads):
            assert not hasattr(param, "jac")
            assert_close(param.grad, grad)


def test_several_feature_tensors_and_a_task_without_features() -> None:
    trunk_a, trunk_b = nn.Linear(4, 3), nn.Linear(4, 2)
    head_a, head_b = nn.Linear(3, 1), nn.Linear(2, 1)
    lonely = torch.randn(2, requires_grad=True)
    inputs = torch.randn(5, 4)
    feat_a, feat_b = trunk_a(inputs).tanh(), trunk_b(inputs).sin()
    losses = [
        (head_a(feat_a) * head_b(feat_b)).mean(),
        head_b(feat_b).pow(2).mean(),
        lonely.pow(2).sum(),
    ]
    shared = [*trunk_a.parameters(), *trunk_b.parameters()]
    expected_rows = [
        torch.autograd.grad(loss, shared, retain_graph=True, materialize_grads=True)
        for loss in losses
    ]
    expected_heads = torch.autograd.grad(losses[0], list(head_a.parameters()), retain_graph=True)
    mtl_backward(losses, [feat_a, feat_b])
    for index, param in enumerate(shared):
        assert_close(param.jac, torch.stack([rows[index] for rows in expected_rows]))
        assert_close(param.jac[2], torch.zeros_like(param))
    assert_close(lonely.grad, 2 * lonely.detach())
    for param, grad in zip(head_a.parameters(), expected_heads):
        assert_close(param.grad, grad)
    # head_b is used by tasks 0 and 1: its .grad is the sum of both task gradients.
    expected_b = [
        g0 + g1
        for g0, g1 in zip(
            torch.autograd.grad(losses[0], list(head_b.parameters()), retain_graph=True),
            torch.autograd.grad(losses[1], list(head_b.parameters()), retain_graph=True),
        )
    ]
    for param, grad in zip(head_b.parameters(), expected_b):
        assert_close(param.grad, grad)


def test_losses_as_one_tensor_and_existing_grad_accumulates() -> None:
    trunk, heads = _trunk_and_heads(2)
    features = trunk(torch.randn(4, 5))
    losses = _losses(features, heads, torch.randn(4, 2))
    shared = list(trunk.parameters())
    expected_jac, expected_grads = _expected(losses, shared, heads)
    for head in heads:
        for param in head.parameters():
            param.grad = torch.ones_like(param)
    mtl_backward(torch.stack(losses), features)
    for param, jacobian in zip(shared, expected_jac):
        assert_close(param.jac, jacobian)
    for head, grads in zip(heads, expected_grads):
        for param, grad in zip(head.parameters(), grads):
            assert_close(param.grad, grad + 1)


def test_tiny_bert_trunk_two_heads() -> None:
    bert = tiny_bert().bert
    heads = [nn.Linear(32, 2), nn.Linear(32, 1)]
    ids, mask, labels = bert_batch()
    features = bert(ids, attention_mask=mask).pooler_output
    losses = [
        nn.functional.cross_entropy(heads[0](features), labels % 2),
        heads[1](features).pow(2).mean(),
    ]
    shared = [p for p in bert.parameters() if p.requires_grad]
    expected_rows = [
        torch.autograd.grad(loss, shared, retain_graph=True, materialize_grads=True)
        for loss in losses
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        mtl_backward(losses, features)
    for index, param in enumerate(shared):
        assert_close(param.jac, torch.stack([rows[index] for rows in expected_rows]))
    for head_index, head in enumerate(heads):
        expected = torch.autograd.grad(losses[head_index], list(head.parameters()), retain_graph=True)
        for param, grad in zip(head.parameters(), expected):
            assert_close(param.grad, grad)


def test_trunk_without_batching_rule_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vjp_module, "_fallback_warned", False)
    trunk, heads = _trunk_and_heads(3)
    features = NoBatchingRule.apply(trunk(torch.randn(4, 5)))
    losses = _losses(features, heads, torch.randn(4, 3))
    shared = list(trunk.parameters())
    expected_jac, _ = _expected(losses, shared, heads)
    with pytest.warns(RuntimeWarning, match="batching rule"):
        mtl_backward(losses, features)
    for param, jacobian in zip(shared, expected_jac):
        assert_close(param.jac, jacobian)


def test_graph_freed_without_retain_graph() -> None:
    trunk, heads = _trunk_and_heads(2)
    features = trunk(torch.randn(4, 5))
    losses = _losses(features, heads, torch.randn(4, 2))
    mtl_backward(losses, features, parallel_chunk_size=1)
    with pytest.raises(RuntimeError, match="second time"):
        mtl_backward(losses, features, parallel_chunk_size=1)


def test_retain_graph_allows_a_second_call() -> None:
    trunk, heads = _trunk_and_heads(2)
    features = trunk(torch.randn(4, 5))
    losses = _losses(features, heads, torch.randn(4, 2))
    mtl_backward(losses, features, retain_graph=True, parallel_chunk_size=1)
    first = [p.jac.clone() for p in trunk.parameters()]
    mtl_backward(losses, features, parallel_chunk_size=1)
    for param, jacobian in zip(trunk.parameters(), first):
        assert_close(param.jac, 2 * jacobian)


def test_non_scalar_loss_raises() -> None:
    trunk, heads = _trunk_and_heads(2)
    features = trunk(torch.randn(4, 5))
    with pytest.raises(ValueError, match="scalar"):
        mtl_backward([heads[0](features).sum(), heads[1](features)], features)


def test_loss_not_requiring_grad_raises() -> None:
    trunk, heads = _trunk_and_heads(1)
    features = trunk(torch.randn(4, 5))
    with pytest.raises(ValueError, match="does not require grad"):
        mtl_backward([heads[0](features).sum(), torch.tensor(1.0)], features)


def test_features_not_requiring_grad_raise() -> None:
    trunk, heads = _trunk_and_heads(1)
    features = trunk(torch.randn(4, 5))
    with pytest.raises(ValueError, match="features"):
        mtl_backward([heads[0](features).sum()], [features, torch.ones(3)])


def test_empty_losses_raise() -> None:
    trunk, _ = _trunk_and_heads(1)
    with pytest.raises(ValueError, match="empty"):
        mtl_backward([], trunk(torch.randn(2, 5)))


def test_tasks_params_of_wrong_length_raise() -> None:
    trunk, heads = _trunk_and_heads(2)
    features = trunk(torch.randn(4, 5))
    losses = _losses(features, heads, torch.randn(4, 2))
    with pytest.raises(ValueError, match="one sequence of head parameters per task"):
        mtl_backward(losses, features, tasks_params=[list(heads[0].parameters())])


def test_non_leaf_params_raise() -> None:
    trunk, heads = _trunk_and_heads(2)
    hidden = trunk[0](torch.randn(4, 5))
    features = trunk[1:](hidden)
    losses = _losses(features, heads, torch.randn(4, 2))
    with pytest.raises(ValueError, match="not a leaf"):
        mtl_backward(losses, features, shared_params=[hidden])
    with pytest.raises(ValueError, match="not a leaf"):
        mtl_backward(losses, features, tasks_params=[[features], []])


def test_no_shared_params_raise() -> None:
    w = torch.randn(3, requires_grad=True)
    features = 2 * w
    w.requires_grad_(False)
    head = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="no leaf"):
        mtl_backward([(head * features).sum()], features)


def test_mismatched_existing_jac_raises() -> None:
    trunk, heads = _trunk_and_heads(2)
    features = trunk(torch.randn(4, 5))
    losses = _losses(features, heads, torch.randn(4, 2))
    trunk[0].weight.jac = torch.zeros(3, *trunk[0].weight.shape)
    with pytest.raises(ValueError, match="number of objectives"):
        mtl_backward(losses, features)
    assert all(p.grad is None for h in heads for p in h.parameters())


@pytest.mark.parametrize("nested", ["function", "view", "leaf"])
def test_features_computed_from_each_other_are_rejected(nested: str) -> None:
    """[h, f(h)] as features: the gradient w.r.t. h already holds the paths through f(h), so the trunk's
    Jacobian used to count them twice (silently 2x on those rows); now a clear error."""
    weight = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    if nested == "leaf":
        first = torch.randn(5, 3, requires_grad=True)
        second = first.tanh()
    else:
        first = x @ weight.T
        second = first.tanh() if nested == "function" else first.reshape(-1)
    head = torch.randn(3, requires_grad=True)
    loss_a = (first @ head).sum()
    loss_b = second.pow(2).sum()
    with pytest.raises(ValueError, match=r"features\[1\] is computed from features\[0\]"):
        mtl_backward([loss_a, loss_b], [first, second])


def test_features_computed_side_by_side_are_accepted() -> None:
    weight = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 4)
    hidden = x @ weight.T
    left, right = hidden.tanh(), hidden.sigmoid()  # both from hidden, neither from the other
    mtl_backward([left.sum(), right.pow(2).sum()], [left, right])
    expected = torch.stack([torch.autograd.grad(loss, weight)[0] for loss in (
        (x @ weight.T).tanh().sum(), (x @ weight.T).sigmoid().pow(2).sum())])
    torch.testing.assert_close(weight.jac, expected)


def test_tied_weight_used_through_and_around_the_features_counts_each_path_once() -> None:
    """A trunk weight reused by a head: .jac holds the rows through the features, .grad the rest, so that
    summing them gives the gradient of the summed losses (the path through the features used to be in
    both)."""
    from hf_jd.aggregation import Sum
    from hf_jd.autojac import jac_to_grad

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64)

    def losses() -> tuple[Tensor, Tensor, Tensor]:
        features = torch.tanh(x @ weight.T)
        return features, (features @ weight).pow(2).sum(), features.sum()

    features, first, second = losses()
    mtl_backward([first, second], features)
    jac_to_grad([weight], Sum())
    _, first, second = losses()
    torch.testing.assert_close(weight.grad, torch.autograd.grad(first + second, weight)[0])


def test_features_that_no_loss_depends_on_raise_and_write_nothing() -> None:
    trunk, head_a, head_b = nn.Linear(4, 3), nn.Linear(3, 1), nn.Linear(3, 1)
    inputs = torch.randn(5, 4)
    stale = trunk(inputs).tanh()  # an earlier call of the trunk
    features = trunk(inputs).tanh()
    losses = [head_a(features).pow(2).mean(), head_b(features).abs().mean()]
    with pytest.raises(ValueError, match="No loss depends on the features"):
        mtl_backward(losses, stale)
    for param in [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]:
        assert param.grad is None and not hasattr(param, "jac")
