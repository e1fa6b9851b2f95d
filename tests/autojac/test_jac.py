"""Tests of hf_jd.autojac.jac against analytic Jacobians and torch.func.jacrev."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev

import hf_jd.autojac._vjp as vjp_module
from hf_jd.autojac import jac

from .helpers import (
    NoBatchingRule,
    assert_close,
    bert_batch,
    bert_loss_fn,
    cnn,
    mlp,
    per_example_loss_fn,
    reference_jacobians,
    tiny_bert,
)

CHUNKS = [1, 2, 3, None]


def test_analytic_jacobian() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = torch.stack([x.sum(), (x**2).sum(), x[0] * x[1]])
    (result,) = jac(y, x)
    expected = torch.tensor([[1.0, 1.0, 1.0], [2.0, -4.0, 6.0], [-2.0, 1.0, 0.0]])
    assert_close(result, expected)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_mlp_per_example_matches_jacrev(chunk: int | None) -> None:
    model = mlp()
    inputs, targets = torch.randn(5, 5), torch.randint(0, 3, (5,))
    loss_fn = per_example_loss_fn(model, inputs, targets)
    expected = reference_jacobians(model, loss_fn)
    names, params = zip(*model.named_parameters())
    result = jac(loss_fn(dict(model.named_parameters())), params, parallel_chunk_size=chunk)
    assert len(result) == len(params)
    for name, param, jacobian in zip(names, params, result):
        assert jacobian.shape == (5, *param.shape)
        assert_close(jacobian, expected[name])


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_cnn_per_example_matches_jacrev(chunk: int | None) -> None:
    model = cnn()
    inputs, targets = torch.randn(3, 2, 8, 8), torch.randint(0, 3, (3,))
    loss_fn = per_example_loss_fn(model, inputs, targets)
    expected = reference_jacobians(model, loss_fn)
    names, params = zip(*model.named_parameters())
    result = jac(loss_fn(dict(model.named_parameters())), params, parallel_chunk_size=chunk)
    for name, jacobian in zip(names, result):
        assert_close(jacobian, expected[name])


def test_tiny_bert_per_example_matches_jacrev() -> None:
    model = tiny_bert()
    ids, mask, labels = bert_batch()
    loss_fn = bert_loss_fn(model, ids, mask, labels)
    expected = reference_jacobians(model, loss_fn)
    names, params = zip(*model.named_parameters())
    for chunk in [1, 3, None]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            losses = loss_fn(dict(model.named_parameters()))
            result = jac(losses, params, parallel_chunk_size=chunk)
        for name, jacobian in zip(names, result):
            assert_close(jacobian, expected[name])


def test_chunk_sizes_agree_exactly_in_shape_and_closely_in_value() -> None:
    model = mlp()
    inputs, targets = torch.randn(7, 5), torch.randint(0, 3, (7,))
    results = []
    for chunk in [1, 2, 3, 7, 100, None]:
        losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
        results.append(jac(losses, list(model.parameters()), parallel_chunk_size=chunk))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.shape == b.shape
            assert_close(a, b)


def test_non_leaf_inputs_like_autograd_grad() -> None:
    model = mlp()
    inputs = torch.randn(4, 5)
    hidden = model[1](model[0](inputs))
    outputs = model[2:](hidden).sum(dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "the .grad attribute of a Tensor that is not a leaf" warning
        (result,) = jac(outputs, hidden)
    expected = jacrev(lambda h: model[2:](h).sum(dim=1))(hidden.detach())
    assert result.shape == (4, 4, 7)
    assert_close(result, expected)


def test_sequence_of_scalars_and_multi_dim_outputs_are_flattened() -> None:
    x = torch.randn(3, requires_grad=True)
    out = torch.outer(x, torch.arange(1.0, 3.0))  # shape [3, 2]
    (from_matrix,) = jac(out, x, retain_graph=True)
    expected = jacrev(lambda v: torch.outer(v, torch.arange(1.0, 3.0)).reshape(-1))(x.detach())
    assert from_matrix.shape == (6, 3)
    assert_close(from_matrix, expected)
    (from_sequence,) = jac([x.sum(), x.prod(), (2 * x).max()], x)
    expected_rows = torch.stack(
        [torch.ones(3), jacrev(torch.prod)(x.detach()), jacrev(lambda v: (2 * v).max())(x.detach())]
    )
    assert_close(from_sequence, expected_rows)


def test_scalar_output_gives_one_row() -> None:
    x = torch.randn(2, 2, requires_grad=True)
    (result,) = jac((x**2).sum(), x)
    assert result.shape == (1, 2, 2)
    assert_close(result[0], 2 * x.detach())


def test_unreached_input_and_constant_output_give_zero_rows() -> None:
    x = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, 2, requires_grad=True)
    constant = torch.tensor(5.0)
    result_x, result_unused = jac([x.sum(), constant, (3 * x).sum()], [x, unused])
    assert_close(result_x, torch.stack([torch.ones(3), torch.zeros(3), 3 * torch.ones(3)]))
    assert_close(result_unused, torch.zeros(3, 2, 2))


@pytest.mark.parametrize("chunk", [1, None])
def test_output_depending_on_part_of_inputs(chunk: int | None) -> None:
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    ja, jb = jac(torch.stack([a.sum(), b.sum()]), (a, b), parallel_chunk_size=chunk)
    assert_close(ja, torch.stack([torch.ones(3), torch.zeros(3)]))
    assert_close(jb, torch.stack([torch.zeros(3), torch.ones(3)]))


def test_single_tensor_input_returns_one_tuple() -> None:
    x = torch.randn(3, requires_grad=True)
    result = jac(2 * x, x)
    assert isinstance(result, tuple) and len(result) == 1
    assert_close(result[0], 2 * torch.eye(3))


@pytest.mark.parametrize("chunk", [1, 2])
def test_graph_freed_without_retain_graph(chunk: int) -> None:
    x = torch.randn(4, requires_grad=True)
    y = x.exp()
    jac(y, x, parallel_chunk_size=chunk)
    with pytest.raises(RuntimeError, match="second time"):
        jac(y, x, parallel_chunk_size=chunk)


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_retain_graph_allows_a_second_call(chunk: int | None) -> None:
    x = torch.randn(4, requires_grad=True)
    y = x.exp()
    (first,) = jac(y, x, retain_graph=True, parallel_chunk_size=chunk)
    (second,) = jac(y, x, parallel_chunk_size=chunk)
    assert_close(first, second)
    assert_close(first, torch.diag(x.detach().exp()))


@pytest.mark.parametrize("retain_graph", [False, True])
def test_fallback_to_sequential_warns_once(
    monkeypatch: pytest.MonkeyPatch, retain_graph: bool
) -> None:
    monkeypatch.setattr(vjp_module, "_fallback_warned", False)
    x = torch.randn(3, requires_grad=True)
    y = NoBatchingRule.apply(x).sin()
    expected = torch.diag(2 * (2 * x.detach()).cos())
    with pytest.warns(RuntimeWarning, match="batching rule"):
        (first,) = jac(y, x, retain_graph=True)
    assert_close(first, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (second,) = jac(y, x, retain_graph=retain_graph, parallel_chunk_size=2)
    assert_close(second, expected)


def test_fallback_result_equals_sequential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vjp_module, "_fallback_warned", True)
    w = torch.randn(4, 3, requires_grad=True)
    inputs = torch.randn(5, 4)
    losses = NoBatchingRule.apply(inputs @ w).tanh().sum(dim=1)
    (batched,) = jac(losses, w, retain_graph=True)
    (sequential,) = jac(losses, w, parallel_chunk_size=1)
    assert_close(batched, sequential)


def test_empty_outputs_raise() -> None:
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="empty"):
        jac(x[:0], x)
    with pytest.raises(ValueError, match="empty"):
        jac([], x)


def test_outputs_not_requiring_grad_raise() -> None:
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        jac(torch.ones(3), x)
    with torch.no_grad():
        y = 2 * x
    with pytest.raises(ValueError, match="requires grad"):
        jac(y, x)


def test_integer_outputs_raise() -> None:
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="floating"):
        jac(torch.arange(3), x)


def test_bad_inputs_raise() -> None:
    x = torch.randn(3, requires_grad=True)
    y = 2 * x
    with pytest.raises(ValueError, match="does not require grad"):
        jac(y, [x, torch.ones(2)])
    with pytest.raises(ValueError, match="empty"):
        jac(y, [])
    with pytest.raises(TypeError, match="torch.Tensor"):
        jac(y, [x, 3.0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="torch.Tensor"):
        jac(y, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [0, -2])
def test_non_positive_chunk_size_raises(chunk: int) -> None:
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        jac(2 * x, x, parallel_chunk_size=chunk)


@pytest.mark.parametrize("chunk", [1.5, True])
def test_non_int_chunk_size_raises(chunk: object) -> None:
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="parallel_chunk_size"):
        jac(2 * x, x, parallel_chunk_size=chunk)  # type: ignore[arg-type]
