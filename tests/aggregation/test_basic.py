"""Tests of Mean, Sum, Constant and Random (and their weightings)."""

from __future__ import annotations

import pytest
import torch

from hf_jd.aggregation import (
    Constant,
    ConstantWeighting,
    Mean,
    MeanWeighting,
    Random,
    RandomWeighting,
    Sum,
    SumWeighting,
)

DT = torch.float64


def test_mean_and_sum() -> None:
    jac = torch.randn(4, 6, dtype=DT)
    torch.testing.assert_close(Mean()(jac), jac.mean(dim=0))
    torch.testing.assert_close(Sum()(jac), jac.sum(dim=0))
    gram = jac @ jac.T
    torch.testing.assert_close(MeanWeighting()(gram), torch.full((4,), 0.25, dtype=DT))
    torch.testing.assert_close(SumWeighting()(gram), torch.ones(4, dtype=DT))


def test_constant() -> None:
    jac = torch.randn(3, 5, dtype=DT)
    weights = [0.5, -1.0, 2.0]
    torch.testing.assert_close(Constant(weights)(jac), torch.tensor(weights, dtype=DT) @ jac)
    single = jac.float()
    torch.testing.assert_close(Constant(torch.tensor(weights))(single), torch.tensor(weights) @ single)
    assert torch.equal(ConstantWeighting(weights).weights, torch.tensor(weights, dtype=DT))


def test_constant_errors() -> None:
    with pytest.raises(ValueError, match="2 weights but the Jacobian has 3 rows"):
        Constant([1.0, 2.0])(torch.randn(3, 4))
    with pytest.raises(ValueError, match="2 weights but the Jacobian has 3 rows"):
        ConstantWeighting([1.0, 2.0])(torch.eye(3))
    with pytest.raises(ValueError, match="1-D"):
        Constant([[1.0]])
    with pytest.raises(ValueError, match="finite"):
        Constant([float("inf")])
    with pytest.raises(TypeError, match="weights"):
        Constant("abc")  # type: ignore[arg-type]


def test_random_weights_are_softmax_of_gaussian() -> None:
    weighting = RandomWeighting(seed=123)
    weights = weighting(torch.eye(5, dtype=DT))
    generator = torch.Generator().manual_seed(123)
    expected = torch.softmax(torch.randn(5, generator=generator, dtype=DT), dim=0)
    torch.testing.assert_close(weights, expected)
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=DT))


def test_random_is_deterministic_given_seed_and_varies_between_calls() -> None:
    jac = torch.randn(6, 4)
    a, b = Random(seed=7), Random(seed=7)
    first = a(jac)
    assert torch.equal(first, b(jac))
    assert not torch.equal(first, a(jac))
    torch.manual_seed(3)
    c = Random()
    torch.manual_seed(3)
    d = Random()
    assert torch.equal(c(jac), d(jac))


def test_random_state_dict_round_trip_and_reset() -> None:
    jac = torch.randn(4, 3)
    aggregator = Random(seed=1)
    assert aggregator.is_stateful
    first = aggregator(jac)
    state = aggregator.state_dict()
    second = aggregator(jac)
    restored = Random(seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored(jac), second)
    aggregator.reset()
    assert torch.equal(aggregator(jac), first)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"seed": 1})


def test_random_bad_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        Random(seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):  # as PCGrad, GradDrop, ...
        Random(seed=1.5)  # type: ignore[arg-type]


def test_aggregate_skips_gramian_but_agrees_with_weighting() -> None:
    jac = torch.randn(5, 7, dtype=DT)
    for aggregator in (Mean(), Sum(), Constant([1.0, 2.0, 3.0, 4.0, 5.0])):
        torch.testing.assert_close(aggregator(jac), aggregator.weighting(jac @ jac.T) @ jac)


def test_reprs() -> None:
    assert repr(Mean()) == "Mean()"
    assert repr(Sum()) == "Sum()"
    assert repr(Constant([1, 2])) == "Constant(weights=[1.0, 2.0])"
    assert repr(Random(seed=4)) == "Random(seed=4)"
    assert repr(RandomWeighting(seed=4)) == "RandomWeighting(seed=4)"
