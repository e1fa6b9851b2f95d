"""Tests of hf_jd.autojac.jac_to_grad against aggregating an explicitly built full Jacobian."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from hf_jd.aggregation import MGDA, Aggregator, GramianWeightedAggregator, Mean, UPGrad, Weighting
from hf_jd.aggregation._base import update_is_weighted_rows
from hf_jd.autojac import backward, jac_to_grad

from .helpers import (
    assert_close,
    bert_batch,
    bert_loss_fn,
    mlp,
    per_example_loss_fn,
    reference_jacobians,
    tiny_bert,
)


class _ColumnScaledSum(Aggregator):
    """Sums the rows and multiplies column ``j`` by ``j + 1``: sensitive to the column order."""

    def aggregate(self, matrix: Tensor) -> Tensor:
        scale = torch.arange(1, matrix.shape[1] + 1, dtype=matrix.dtype)
        return matrix.sum(dim=0) * scale


class _SoftmaxOfDiagonal(Weighting):
    """Weights ``softmax(diag(G))``: depends on the Gramian, so a wrong Gramian is detected."""

    def compute(self, gramian: Tensor) -> Tensor:
        return torch.softmax(torch.diagonal(gramian), dim=0)


def _full_jacobian(params: list[Tensor]) -> Tensor:
    return torch.cat([p.jac.reshape(p.jac.shape[0], -1) for p in params], dim=1)


def _split(vector: Tensor, params: list[Tensor]) -> list[Tensor]:
    pieces = vector.split([p.numel() for p in params])
    return [piece.reshape(p.shape) for piece, p in zip(pieces, params)]


def _mlp_with_jac(batch: int = 6) -> tuple[nn.Module, list[Tensor]]:
    model = mlp()
    losses = nn.functional.cross_entropy(
        model(torch.randn(batch, 5)), torch.randint(0, 3, (batch,)), reduction="none"
    )
    backward(losses, model.parameters())
    return model, list(model.parameters())


def test_upgrad_matches_aggregating_the_explicit_jacobian() -> None:
    from hf_jd.aggregation import UPGrad

    model = mlp()
    inputs, targets = torch.randn(6, 5), torch.randint(0, 3, (6,))
    loss_fn = per_example_loss_fn(model, inputs, targets)
    reference = reference_jacobians(model, loss_fn)
    names, params = zip(*model.named_parameters())
    full = torch.cat([reference[name].reshape(6, -1) for name in names], dim=1)
    expected_update = UPGrad()(full)
    expected_weights = UPGrad().weights(full)

    backward(loss_fn(dict(model.named_parameters())), params)
    weights = jac_to_grad(params, UPGrad())
    assert weights is not None
    torch.testing.assert_close(weights, expected_weights, rtol=1e-4, atol=1e-6)
    for param, expected in zip(params, _split(expected_update, list(params))):
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)
        assert not hasattr(param, "jac")


def test_upgrad_on_tiny_bert_per_example() -> None:
    from hf_jd.aggregation import UPGrad

    model = tiny_bert()
    ids, mask, labels = bert_batch()
    loss_fn = bert_loss_fn(model, ids, mask, labels)
    reference = reference_jacobians(model, loss_fn)
    names, params = zip(*model.named_parameters())
    full = torch.cat([reference[name].reshape(ids.shape[0], -1) for name in names], dim=1)
    expected_update = UPGrad()(full)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        backward(loss_fn(dict(model.named_parameters())), params)
    jac_to_grad(params, UPGrad())
    for param, expected in zip(params, _split(expected_update, list(params))):
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)


def test_gramian_path_equals_aggregating_the_concatenation() -> None:
    _model, params = _mlp_with_jac()
    aggregator = GramianWeightedAggregator(_SoftmaxOfDiagonal())
    full = _full_jacobian(params)
    expected_weights = torch.softmax(torch.diagonal(full @ full.T), dim=0)
    weights = jac_to_grad(params, aggregator)
    assert weights is not None
    assert_close(weights, expected_weights)
    for param, expected in zip(params, _split(expected_weights @ full, params)):
        assert_close(param.grad, expected)


def test_other_aggregator_gets_columns_in_parameter_order() -> None:
    _model, params = _mlp_with_jac()
    order = list(reversed(params))
    full_in_order = _full_jacobian(order)
    expected = _ColumnScaledSum()(full_in_order)
    result = jac_to_grad(order, _ColumnScaledSum())
    assert result is None
    for param, update in zip(order, _split(expected, order)):
        assert_close(param.grad, update)
        assert not hasattr(param, "jac")


def test_adds_to_existing_grad_and_retain_jac() -> None:
    _model, params = _mlp_with_jac()
    for param in params:
        param.grad = torch.full_like(param, 0.5)
    full = _full_jacobian(params)
    aggregator = GramianWeightedAggregator(_SoftmaxOfDiagonal())
    weights = jac_to_grad(params, aggregator, retain_jac=True)
    assert weights is not None
    for param, expected in zip(params, _split(weights @ full, params)):
        assert_close(param.grad, expected + 0.5)
        assert param.jac.shape == (6, *param.shape)


def test_low_precision_jacobians_use_a_float32_gramian() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    w.jac = torch.randn(5, 4, 3).to(torch.bfloat16)
    full = w.jac.float().reshape(5, -1)
    weights = jac_to_grad([w], GramianWeightedAggregator(_SoftmaxOfDiagonal()))
    assert weights is not None and weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.softmax(torch.diagonal(full @ full.T), dim=0))
    assert w.grad.dtype == w.dtype


def test_missing_jac_raises() -> None:
    _model, params = _mlp_with_jac()
    extra = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError, match="has no .jac"):
        jac_to_grad([*params, extra], _ColumnScaledSum())
    assert all(p.grad is None for p in params)


def test_inconsistent_rows_raise() -> None:
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    a.jac, b.jac = torch.randn(4, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match="rows"):
        jac_to_grad([a, b], _ColumnScaledSum())


def test_wrong_jac_shape_raises() -> None:
    a = torch.randn(3, requires_grad=True)
    a.jac = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"not \[m\]"):
        jac_to_grad([a], _ColumnScaledSum())


def test_param_not_requiring_grad_raises() -> None:
    a = torch.randn(3)
    a.jac = torch.randn(2, 3)
    with pytest.raises(ValueError, match="does not require grad"):
        jac_to_grad([a], _ColumnScaledSum())


def test_empty_and_repeated_params_raise() -> None:
    a = torch.randn(3, requires_grad=True)
    a.jac = torch.randn(2, 3)
    with pytest.raises(ValueError, match="empty"):
        jac_to_grad([], _ColumnScaledSum())
    with pytest.raises(ValueError, match="more than once"):
        jac_to_grad([a, a], _ColumnScaledSum())


def test_non_aggregator_raises() -> None:
    a = torch.randn(3, requires_grad=True)
    a.jac = torch.randn(2, 3)
    with pytest.raises(TypeError, match="Aggregator"):
        jac_to_grad([a], lambda matrix: matrix.mean(0))  # type: ignore[arg-type]


def test_an_aggregator_class_instead_of_an_instance_is_explained() -> None:
    a = torch.randn(3, requires_grad=True)
    a.jac = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"the class UPGrad, not an aggregator: pass an instance, e.g. UPGrad\(\)"):
        jac_to_grad([a], UPGrad)  # type: ignore[arg-type]


def test_non_finite_jacobian_raises() -> None:
    b = torch.randn(2, requires_grad=True)
    b.jac = torch.ones(2, 2)
    a = torch.randn(3, requires_grad=True)
    a.jac = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]])
    # (the parameter is named, and the message does not speak of a Gramian the user never passed)
    named = r"params\[1\] \(shape \(3,\)\) has a .jac with non-finite entries"
    with pytest.raises(ValueError, match=named):
        jac_to_grad([b, a], _ColumnScaledSum())
    with pytest.raises(ValueError, match=named):
        jac_to_grad([b, a], GramianWeightedAggregator(_SoftmaxOfDiagonal()))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("upgrad", {}),
        ("mean", {}),
        ("sum", {}),
        ("mgda", {}),
        ("dualproj", {}),
        ("pcgrad", {"seed": 3}),
        ("imtl_g", {}),
        ("config", {}),
    ],
)
def test_registered_aggregators_match_the_explicit_jacobian(name: str, kwargs: dict) -> None:
    from hf_jd.aggregation import get_aggregator

    _model, params = _mlp_with_jac(batch=5)
    full = _full_jacobian(params)
    expected = get_aggregator(name, **kwargs)(full)
    jac_to_grad(params, get_aggregator(name, **kwargs))
    for param, update in zip(params, _split(expected, params)):
        torch.testing.assert_close(param.grad, update, rtol=1e-4, atol=1e-6)


class _FirstRow(Aggregator):
    """Returns a view of its input: the first row."""

    def aggregate(self, matrix: Tensor) -> Tensor:
        return matrix[0]


def test_update_that_is_a_view_of_the_jacobian_is_copied() -> None:
    a = torch.randn(2, 3, requires_grad=True)
    jacobian = torch.randn(4, 2, 3)
    a.jac = jacobian
    jac_to_grad([a], _FirstRow())
    assert_close(a.grad, jacobian[0])
    assert a.grad.untyped_storage().data_ptr() != jacobian.untyped_storage().data_ptr()


@pytest.mark.parametrize("scale", [1e21, 1e-22])
def test_float32_gramian_outside_float32_range_is_redone_in_float64(scale: float) -> None:
    # Entries of 1e21 overflow a float32 Gramian (1e42), entries of 1e-22 underflow it (1e-44): the
    # aggregator applied to J directly redoes it in float64, and so must the block-wise Gramian.
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(3, 4, requires_grad=True)
    second = torch.randn(5, requires_grad=True)
    jacobians = [torch.randn(4, 3, 4, generator=generator) * scale, torch.randn(4, 5, generator=generator) * scale]
    first.jac, second.jac = jacobians
    aggregator = MGDA()
    expected = _split(aggregator(torch.cat([j.reshape(4, -1) for j in jacobians], dim=1)), [first, second])
    jac_to_grad([first, second], aggregator)
    for param, update in zip((first, second), expected):
        torch.testing.assert_close(param.grad / scale, update / scale, rtol=1e-4, atol=1e-6)


def test_integer_jacobian_raises() -> None:
    w = torch.randn(4, requires_grad=True)
    w.jac = torch.ones(3, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="int64.*floating-point"):
        jac_to_grad([w], UPGrad())


class _ClippedUPGrad(UPGrad):
    """UPGrad whose update is clipped to norm 1: not the weighted sum of the rows any more."""

    def aggregate(self, matrix: Tensor) -> Tensor:
        update = super().aggregate(matrix)
        return update / max(1.0, float(update.norm()))


def test_overridden_aggregate_of_a_gramian_weighted_aggregator_is_used() -> None:
    w = torch.zeros(3, requires_grad=True)
    w.jac = torch.tensor([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    assert jac_to_grad([w], _ClippedUPGrad()) is None  # (the weights do not define the update)
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 0.0, 0.0]))
    assert update_is_weighted_rows(UPGrad()) and update_is_weighted_rows(Mean())
    assert not update_is_weighted_rows(_ClippedUPGrad())


def test_float16_jacobian_with_weights_beyond_its_range_gives_a_finite_grad() -> None:
    """UPGrad's weight of a row 10⁵ times smaller than the other exceeds float16's range; the ``.grad`` written is the
    float32 Jacobian's update, rounded (it was NaN)."""
    param = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    matrix = torch.tensor([[10.0, 0.0, 0.0, 0.0], [-3e-5, 3e-5, 0.0, 0.0]])
    param.jac = matrix.half()
    jac_to_grad([param], UPGrad())
    assert param.grad is not None and param.grad.dtype == torch.float16
    torch.testing.assert_close(param.grad.float(), UPGrad()(matrix.half().float()), rtol=2e-3, atol=1e-2)


def test_mixed_dtypes_accumulate_in_the_widest_whatever_the_order() -> None:
    """Parameters in float32 and float64: the Gramian is accumulated in float64 whichever comes first (with the float32
    one first, the float64 block was rounded to float32 and the float64 parameter's gradient depended on the order)."""
    torch.manual_seed(0)
    single = torch.randn(3, requires_grad=True)
    double = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(4, 6, dtype=torch.float64)
    rows[1] = rows[0] + 1e-6 * torch.randn(6, dtype=torch.float64)  # (nearly parallel: sensitive to rounding)

    def run(order: list) -> tuple:
        single.jac, double.jac = rows[:, :3].float().clone(), rows[:, 3:].clone()
        single.grad = double.grad = None
        weights = jac_to_grad(order, MGDA())
        return weights, double.grad.clone()

    weights_first, grad_first = run([single, double])
    weights_second, grad_second = run([double, single])
    assert weights_first.dtype == weights_second.dtype == torch.float64
    torch.testing.assert_close(grad_first, grad_second, rtol=0, atol=0)
