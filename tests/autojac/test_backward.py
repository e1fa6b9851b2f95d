"""Tests of hf_jd.autojac.backward: .jac accumulation on leaves, compared with torch.func.jacrev."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_jd.autojac import backward

from .helpers import (
    assert_close,
    bert_batch,
    bert_loss_fn,
    cnn,
    mlp,
    per_example_loss_fn,
    reference_jacobians,
    tiny_bert,
)


@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("explicit_inputs", [False, True])
def test_mlp_per_example(chunk: int | None, explicit_inputs: bool) -> None:
    model = mlp()
    inputs, targets = torch.randn(6, 5), torch.randint(0, 3, (6,))
    loss_fn = per_example_loss_fn(model, inputs, targets)
    expected = reference_jacobians(model, loss_fn)
    losses = loss_fn(dict(model.named_parameters()))
    backward(
        losses,
        model.parameters() if explicit_inputs else None,
        parallel_chunk_size=chunk,
    )
    for name, param in model.named_parameters():
        assert param.grad is None
        assert_close(param.jac, expected[name])


def test_cnn_per_example() -> None:
    model = cnn()
    inputs, targets = torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,))
    loss_fn = per_example_loss_fn(model, inputs, targets)
    expected = reference_jacobians(model, loss_fn)
    backward(loss_fn(dict(model.named_parameters())), parallel_chunk_size=3)
    for name, param in model.named_parameters():
        assert_close(param.jac, expected[name])


def test_tiny_bert_per_example() -> None:
    model = tiny_bert()
    ids, mask, labels = bert_batch()
    loss_fn = bert_loss_fn(model, ids, mask, labels)
    expected = reference_jacobians(model, loss_fn)
    for chunk in [2, None]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            backward(loss_fn(dict(model.named_parameters())), parallel_chunk_size=chunk)
        for name, param in model.named_parameters():
            assert_close(param.jac, expected[name])
            del param.jac


def test_default_inputs_are_the_reached_trainable_leaves() -> None:
    model = mlp()
    other = nn.Linear(2, 2)
    model[0].bias.requires_grad_(False)
    scale = torch.tensor(2.0, requires_grad=True)
    losses = scale * model(torch.randn(3, 5)).sum(dim=1)
    backward(losses)
    reached = [p for p in model.parameters() if p.requires_grad] + [scale]
    for tensor in reached:
        assert tensor.jac.shape == (3, *tensor.shape)
    assert not hasattr(model[0].bias, "jac")
    assert not any(hasattr(p, "jac") for p in other.parameters())
    assert_close(scale.jac, losses.detach() / scale.detach())


def test_per_task_scalar_losses_sequence() -> None:
    w = torch.randn(3, 2, requires_grad=True)
    x = torch.randn(4, 3)
    out = x @ w
    losses = [out[:, 0].pow(2).mean(), out[:, 1].abs().mean(), out.sum()]
    expected = torch.stack([torch.autograd.grad(loss, w, retain_graph=True)[0] for loss in losses])
    backward(losses, [w])
    assert_close(w.jac, expected)


def test_accumulates_into_existing_jac() -> None:
    w = torch.randn(3, requires_grad=True)
    backward(torch.stack([w.sum(), (w**2).sum()]))
    backward(torch.stack([2 * w.sum(), w.sum()]))
    expected = torch.stack([3 * torch.ones(3), 2 * w.detach() + 1])
    assert_close(w.jac, expected)


def test_unreached_explicit_input_gets_zero_jac() -> None:
    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    backward(torch.stack([w.sum(), w.prod()]), [w, unused])
    assert_close(unused.jac, torch.zeros(2, 2))


def test_repeated_inputs_count_once() -> None:
    w = torch.randn(3, requires_grad=True)
    backward(2 * w, [w, w])
    assert_close(w.jac, 2 * torch.eye(3))


def test_mismatched_existing_jac_raises_before_any_change() -> None:
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    b.jac = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="number of objectives"):
        backward(torch.stack([a.sum(), b.sum()]), [a, b])
    assert not hasattr(a, "jac")
    assert_close(b.jac, torch.zeros(5, 3))


def test_non_tensor_existing_jac_raises() -> None:
    a = torch.randn(3, requires_grad=True)
    a.jac = [1, 2]
    with pytest.raises(ValueError, match="already has a .jac"):
        backward(a * 2, [a])


def test_non_leaf_input_raises() -> None:
    w = torch.randn(3, requires_grad=True)
    hidden = 2 * w
    with pytest.raises(ValueError, match="not a leaf"):
        backward(hidden.sin(), [hidden])


def test_input_not_requiring_grad_raises() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not require grad"):
        backward(w * 2, [w, torch.ones(2)])


def test_empty_and_constant_tensors_raise() -> None:
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="empty"):
        backward(w[:0])
    with pytest.raises(ValueError, match="requires grad"):
        backward(torch.ones(2))


def test_no_reachable_leaf_raises() -> None:
    w = torch.randn(3, requires_grad=True)
    y = 2 * w
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="no leaf"):
        backward(y)


def test_graph_freed_without_retain_graph() -> None:
    w = torch.randn(3, requires_grad=True)
    y = w.exp()
    backward(y, parallel_chunk_size=1)
    with pytest.raises(RuntimeError, match="second time"):
        backward(y, parallel_chunk_size=1)


def test_non_reentrant_activation_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    model = mlp()
    inputs, targets = torch.randn(4, 5), torch.randint(0, 3, (4,))
    loss_fn = per_example_loss_fn(model, inputs, targets)
    expected = reference_jacobians(model, loss_fn)
    hidden = checkpoint(model[:2], inputs, use_reentrant=False)
    logits = checkpoint(model[2:], hidden, use_reentrant=False)
    losses = nn.functional.cross_entropy(logits, targets, reduction="none")
    backward(losses, model.parameters())
    for name, param in model.named_parameters():
        assert_close(param.jac, expected[name])


def test_complex_leaves_are_rejected() -> None:
    """A complex leaf used to get a complex .jac, and jac_to_grad failed later on 'the Gramian'."""
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex"):
        backward(torch.stack([z.abs().sum(), z.real.sum()]), [z])
    with pytest.raises(ValueError, match="complex"):
        backward(torch.stack([z.abs().sum(), z.real.sum()]))
