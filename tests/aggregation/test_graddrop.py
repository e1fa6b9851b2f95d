"""Tests of GradDrop: sign-purity masks, leak, determinism and state."""

import io
import math

import pytest
import torch

from hf_jd.aggregation import GradDrop, is_gramian_based


def _positive_and_negative_sums(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return matrix.clamp(min=0).sum(dim=0), matrix.clamp(max=0).sum(dim=0)


def test_each_coordinate_keeps_one_sign() -> None:
    matrix = torch.randn(4, 200, dtype=torch.float64)
    update = GradDrop(seed=0)(matrix)
    positive, negative = _positive_and_negative_sums(matrix)
    assert ((update == positive) | (update == negative)).all()


def test_same_sign_columns_are_kept_whole() -> None:
    matrix = (
        torch.rand(3, 50, dtype=torch.float64)
        * torch.where(torch.rand(50) < 0.5, -1.0, 1.0).double()
    )
    torch.testing.assert_close(GradDrop(seed=1)(matrix), matrix.sum(dim=0))


def test_positive_sign_is_kept_with_probability_purity() -> None:
    n = 20000
    matrix = torch.tensor([[3.0], [-1.0]], dtype=torch.float64).expand(2, n).contiguous()
    update = GradDrop(seed=2)(matrix)
    purity = 0.5 * (1 + (3 - 1) / (3 + 1))
    frequency = (update > 0).double().mean().item()
    assert abs(frequency - purity) < 5 * math.sqrt(purity * (1 - purity) / n)


def test_zero_columns_stay_zero() -> None:
    matrix = torch.zeros(3, 5)
    torch.testing.assert_close(GradDrop(seed=0)(matrix), torch.zeros(5))


def test_leak_interpolates_with_the_sum() -> None:
    matrix = torch.randn(3, 40, dtype=torch.float64)
    leak = 0.3
    leaky = GradDrop(leak=[leak] * 3, seed=4)(matrix)
    pure = GradDrop(seed=4)(matrix)
    torch.testing.assert_close(leaky, leak * matrix.sum(dim=0) + (1 - leak) * pure)
    torch.testing.assert_close(GradDrop(leak=[1.0, 1.0, 1.0], seed=5)(matrix), matrix.sum(dim=0))


def test_per_row_leak() -> None:
    matrix = torch.tensor([[2.0, -1.0], [-1.0, 3.0]], dtype=torch.float64)
    update = GradDrop(leak=[1.0, 0.0], seed=6)(matrix)
    kept_second = update - matrix[0]
    assert ((kept_second == 0) | (kept_second == matrix[1])).all()


def test_deterministic_given_seed_and_reset() -> None:
    matrix = torch.randn(3, 100)
    first = GradDrop(seed=7)(matrix)
    aggregator = GradDrop(seed=7)
    torch.testing.assert_close(aggregator(matrix), first)
    second = aggregator(matrix)
    assert not torch.equal(first, second)
    aggregator.reset()
    torch.testing.assert_close(aggregator(matrix), first)
    assert not torch.equal(GradDrop(seed=8)(matrix), first)


def test_state_dict_round_trip() -> None:
    matrix = torch.randn(3, 100)
    aggregator = GradDrop(seed=9)
    aggregator(matrix)
    buffer = io.BytesIO()
    torch.save(aggregator.state_dict(), buffer)
    buffer.seek(0)
    restored = GradDrop(seed=0)
    restored.load_state_dict(torch.load(buffer))
    assert restored.seed == 9
    for _ in range(2):
        torch.testing.assert_close(restored(matrix), aggregator(matrix))
    assert aggregator.is_stateful


def test_state_before_first_call_round_trips() -> None:
    matrix = torch.randn(2, 30)
    restored = GradDrop(seed=1)
    restored.load_state_dict(GradDrop(seed=3).state_dict())
    torch.testing.assert_close(restored(matrix), GradDrop(seed=3)(matrix))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    update = GradDrop(seed=0)(torch.randn(3, 11, dtype=dtype))
    assert update.dtype == dtype and update.shape == (11,)


def test_not_gramian_based() -> None:
    assert not is_gramian_based("graddrop")


def test_wrong_leak_length() -> None:
    with pytest.raises(ValueError, match="leak has 2 entries"):
        GradDrop(leak=[0.1, 0.2])(torch.randn(3, 4))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"leak": [1.5]}, ValueError),
        ({"leak": [-0.1, 0.2]}, ValueError),
        ({"leak": [[0.1]]}, ValueError),
        ({"leak": "a"}, TypeError),
        ({"seed": -1}, ValueError),
        ({"seed": 2.0}, TypeError),
    ],
)
def test_bad_parameters(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        GradDrop(**kwargs)


def test_bad_state() -> None:
    with pytest.raises(ValueError, match="keys"):
        GradDrop().load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="both"):
        GradDrop().load_state_dict({"seed": 1, "device": "cpu", "generator_state": None})
