"""Tests of GradVac against a direct implementation on the gradient vectors."""

import io
import math

import numpy as np
import pytest
import torch

from hf_jd.aggregation import GradVac, GradVacWeighting, PCGrad
from hf_jd.aggregation.gradvac import gradvac_weights


def _direct_gradvac(
    matrix: torch.Tensor, targets: torch.Tensor, orders: list[list[int]], beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 of Wang et al. (2021) on the vectors themselves."""
    targets = targets.clone()
    total = torch.zeros_like(matrix[0])
    for i, order in enumerate(orders):
        vaccinated = matrix[i].clone()
        for j in order:
            cosine = (vaccinated @ matrix[j]) / (vaccinated.norm() * matrix[j].norm())
            target = targets[i, j]
            if cosine < target:
                vaccinated = (
                    vaccinated
                    + (
                        vaccinated.norm()
                        * (target * torch.sqrt(1 - cosine**2) - cosine * torch.sqrt(1 - target**2))
                        / (matrix[j].norm() * torch.sqrt(1 - target**2))
                    )
                    * matrix[j]
                )
            targets[i, j] = (1 - beta) * target + beta * cosine
        total += vaccinated
    return total, targets


@pytest.mark.parametrize("m", [2, 3, 5, 24])
def test_matches_direct_implementation(m: int) -> None:
    matrix = torch.randn(m, 9, dtype=torch.float64)
    targets = torch.empty(m, m, dtype=torch.float64).uniform_(-0.5, 0.8)
    rng = np.random.default_rng(m)
    orders = [list(rng.permutation([j for j in range(m) if j != i])) for i in range(m)]
    weights, new_targets = gradvac_weights(
        (matrix @ matrix.T).numpy(), targets.numpy(), orders, beta=0.3, epsilon=1e-8
    )
    expected_update, expected_targets = _direct_gradvac(matrix, targets, orders, beta=0.3)
    torch.testing.assert_close(torch.from_numpy(weights) @ matrix, expected_update)
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    torch.testing.assert_close(
        torch.from_numpy(new_targets)[off_diagonal], expected_targets[off_diagonal]
    )


def test_adjusted_cosine_equals_target() -> None:
    g1 = torch.tensor([1.0, 0.2, -0.3], dtype=torch.float64)
    g2 = torch.tensor([-0.5, 1.0, 0.4], dtype=torch.float64)
    matrix = torch.stack([g1, g2])
    assert float(g1 @ g2 / (g1.norm() * g2.norm())) < 0.6
    # Target 0.6 for (1, 2); target -1 for (2, 1), which no cosine is below: g_2' = g_2.
    targets = np.array([[0.0, 0.6], [-1.0, 0.0]])
    weights, _ = gradvac_weights((matrix @ matrix.T).numpy(), targets, [[1], [0]], 0.5, 1e-8)
    vaccinated = torch.from_numpy(weights) @ matrix - g2
    cosine = vaccinated @ g2 / (vaccinated.norm() * g2.norm())
    assert float(cosine) == pytest.approx(0.6, abs=1e-12)


def test_first_call_with_two_rows_is_pcgrad() -> None:
    matrix = torch.tensor([[1.0, 0.0, 2.0], [-2.0, 1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(GradVac(seed=0)(matrix), PCGrad(seed=0)(matrix))


def test_targets_follow_ema() -> None:
    matrix = torch.tensor([[1.0, 0.5], [0.3, 1.0]], dtype=torch.float64)
    cosine = float(matrix[0] @ matrix[1] / (matrix[0].norm() * matrix[1].norm()))
    weighting = GradVacWeighting(beta=0.25, seed=0)
    gramian = matrix @ matrix.T
    weighting(gramian)
    assert weighting.targets[0, 1].item() == pytest.approx(0.25 * cosine)
    weighting(gramian)
    assert weighting.targets[1, 0].item() == pytest.approx(0.25 * cosine + 0.75 * 0.25 * cosine)


def test_state_dict_round_trip() -> None:
    matrices = [torch.randn(4, 6, dtype=torch.float64) for _ in range(4)]
    aggregator = GradVac(beta=0.3, seed=4)
    aggregator(matrices[0])
    aggregator(matrices[1])
    buffer = io.BytesIO()
    torch.save(aggregator.state_dict(), buffer)
    buffer.seek(0)
    restored = GradVac(beta=0.3, seed=99)
    restored.load_state_dict(torch.load(buffer))
    for matrix in matrices[2:]:
        torch.testing.assert_close(restored(matrix), aggregator(matrix))
    assert aggregator.is_stateful


def test_reset_forgets_targets() -> None:
    matrix = torch.randn(3, 5, dtype=torch.float64)
    aggregator = GradVac(seed=2)
    first = aggregator(matrix)
    aggregator(matrix)
    aggregator.reset()
    assert aggregator.weighting.targets is None
    torch.testing.assert_close(aggregator(matrix), first)


def test_changing_number_of_objectives_needs_reset() -> None:
    aggregator = GradVac(seed=0)
    aggregator(torch.randn(3, 4))
    with pytest.raises(ValueError, match="reset"):
        aggregator(torch.randn(2, 4))
    aggregator.reset()
    aggregator(torch.randn(2, 4))


def test_target_one_does_not_divide_by_zero() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    weights, _ = gradvac_weights(
        (matrix @ matrix.T).numpy(), np.ones((2, 2)), [[1], [0]], 0.5, 1e-8
    )
    assert np.isfinite(weights).all()


def test_zero_row_is_skipped() -> None:
    matrix = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.3]], dtype=torch.float64)
    update = GradVac(seed=1)(matrix)
    assert torch.isfinite(update).all()
    expected = PCGrad(seed=0)(
        matrix[[0, 2]]
    )  # φ̂ = 0 at the first call: PCGrad on the non-zero rows
    torch.testing.assert_close(update, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    update = GradVac(seed=0)(torch.randn(3, 7, dtype=dtype))
    assert update.dtype == dtype and update.shape == (7,)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"beta": -0.1}, ValueError),
        ({"beta": 1.5}, ValueError),
        ({"beta": "x"}, TypeError),
        ({"epsilon": 0.0}, ValueError),
        ({"epsilon": math.inf}, ValueError),
        ({"seed": -3}, ValueError),
    ],
)
def test_bad_parameters(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        GradVac(**kwargs)


def test_bad_state() -> None:
    with pytest.raises(ValueError, match="keys"):
        GradVac().load_state_dict({"targets": None})
    generator_state = GradVac().state_dict()["generator"]
    with pytest.raises(ValueError, match="square"):
        GradVac().load_state_dict({"targets": torch.zeros(2, 3), "generator": generator_state})


def test_negative_diagonal_is_not_a_gramian() -> None:
    with pytest.raises(ValueError, match="negative diagonal"):
        GradVacWeighting(seed=0)(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_several_calls_match_direct_implementation() -> None:
    """Orders from the seeded generator and targets carried over between calls."""
    from hf_jd.aggregation._generator import random_orders

    m, beta = 4, 0.3
    generator = torch.Generator().manual_seed(13)
    aggregator = GradVac(beta=beta, seed=13)
    targets = torch.zeros(m, m, dtype=torch.float64)
    for _ in range(4):
        matrix = torch.randn(m, 7, dtype=torch.float64)
        expected, targets = _direct_gradvac(matrix, targets, random_orders(m, generator), beta)
        torch.testing.assert_close(aggregator(matrix), expected)
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    torch.testing.assert_close(aggregator.weighting.targets[off_diagonal], targets[off_diagonal])
