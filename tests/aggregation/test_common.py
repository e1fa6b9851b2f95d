"""Properties every registered aggregator must have (parametrised over the whole registry)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_jd.aggregation import (
    Aggregator,
    GramianWeightedAggregator,
    available_aggregators,
    available_weightings,
    get_aggregator,
)

from _aggregation_references import CONSTRUCTOR_DEFAULTS, N_ROWS

NAMES = available_aggregators()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def build(name: str, seed: int = 0) -> Aggregator:
    torch.manual_seed(seed)  # aggregators seeded from the global generator become reproducible
    return get_aggregator(name, **CONSTRUCTOR_DEFAULTS.get(name, {}))


def jacobian(dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N_ROWS, 8, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_device(name: str, dtype: torch.dtype, device: str) -> None:
    matrix = jacobian(dtype, device)
    update = build(name)(matrix)
    assert update.shape == (8,)
    assert update.dtype == dtype
    assert update.device == matrix.device
    assert bool(torch.isfinite(update).all())
    aggregator = build(name)
    if isinstance(aggregator, GramianWeightedAggregator):
        weights = aggregator.weights(matrix)
        assert weights.shape == (N_ROWS,) and weights.dtype == dtype and weights.device == matrix.device


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_seed(name: str) -> None:
    matrices = [jacobian(seed=s) for s in (1, 2, 3)]
    first = build(name, seed=5)
    second = build(name, seed=5)
    for matrix in matrices:
        torch.testing.assert_close(first(matrix), second(matrix), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "bad",
    [
        torch.full((N_ROWS, 8), float("nan")),
        torch.full((N_ROWS, 8), float("inf")),
        torch.randn(8),
        torch.randn(2, N_ROWS, 8),
        torch.randn(0, 8),
    ],
    ids=["nan", "inf", "1d", "3d", "empty"],
)
def test_bad_input_raises_value_error(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        build(name)(bad)


@pytest.mark.parametrize("name", available_weightings())
def test_gramian_based_equals_weighting_of_gramian(name: str) -> None:
    for seed in (1, 2):
        matrix = jacobian(seed=seed)
        aggregator = build(name, seed=7)
        twin = build(name, seed=7)
        assert isinstance(twin, GramianWeightedAggregator)
        expected = twin.weighting(matrix @ matrix.T) @ matrix
        torch.testing.assert_close(aggregator(matrix), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict(name: str) -> None:
    aggregator = build(name, seed=3)
    if not aggregator.is_stateful:
        assert aggregator.state_dict() == {}
        aggregator.load_state_dict({})
        with pytest.raises(ValueError, match="stateless"):
            aggregator.load_state_dict({"x": 1})
        return
    # Stateful: a fresh aggregator that loads the state continues exactly like the original.
    aggregator(jacobian(seed=1))
    state = copy.deepcopy(aggregator.state_dict())
    expected = [aggregator(jacobian(seed=s)) for s in (2, 3)]
    restored = build(name, seed=11)
    restored.load_state_dict(state)
    for s, value in zip((2, 3), expected):
        torch.testing.assert_close(restored(jacobian(seed=s)), value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mean", "mgda", "cagrad"])
def test_gramian_with_a_negative_diagonal_is_rejected(name: str) -> None:
    from hf_jd.aggregation import get_aggregator

    weighting = get_aggregator(name).weighting
    with pytest.raises(ValueError, match="negative diagonal"):
        weighting(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))
    weighting(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # zero rows are fine
