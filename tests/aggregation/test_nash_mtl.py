"""Tests of Nash-MTL: the bargaining fixed point G α = 1/α and its reference behaviour."""

import io
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from hf_jd.aggregation import NashMTL, NashMTLWeighting


def _random_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, m, dtype=torch.float64)[:, None]
    return torch.randn(m, n, generator=generator, dtype=torch.float64) * scales


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_fixed_point(m: int) -> None:
    matrix = _random_matrix(m, 30, seed=m)
    gramian = matrix @ matrix.T
    alpha = NashMTLWeighting(max_norm=None)(gramian)
    assert (alpha > 0).all()
    torch.testing.assert_close(gramian @ alpha, 1 / alpha, rtol=1e-9, atol=0)


def test_update_maximises_bargaining_objective() -> None:
    """d* = argmax Σ log(g_iᵀd) - ½|d|², solved by SciPy directly over d ∈ R^n."""
    matrix = _random_matrix(3, 5, seed=7)
    # Make every row have a positive inner product with the start point of SciPy.
    matrix[:, 0] = matrix[:, 0].abs() + 1.0
    array = matrix.numpy()

    def negative(d: np.ndarray) -> float:
        inner = array @ d
        return math.inf if inner.min() <= 0 else float(-np.log(inner).sum() + 0.5 * d @ d)

    start = np.zeros(5)
    start[0] = 1.0
    result = minimize(
        negative,
        start,
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 40000},
    )
    update = NashMTL(max_norm=None)(matrix).numpy()
    assert negative(update) <= result.fun + 1e-9
    np.testing.assert_allclose(update, result.x, atol=1e-4)


def test_update_norm_and_clipping() -> None:
    matrix = _random_matrix(4, 12, seed=1)
    unclipped = NashMTL(max_norm=None)(matrix)
    assert unclipped.norm().item() == pytest.approx(2.0)  # |d|² = αᵀGα = m
    clipped = NashMTL(max_norm=1.0)(matrix)
    assert clipped.norm().item() == pytest.approx(1.0)
    torch.testing.assert_close(clipped, unclipped / 2)
    torch.testing.assert_close(NashMTL(max_norm=5.0)(matrix), unclipped)


def test_rank_deficient_fixed_point() -> None:
    base = _random_matrix(3, 10, seed=2)
    matrix = torch.cat([base, (base[0] + base[1]).unsqueeze(0)])
    gramian = matrix @ matrix.T
    alpha = NashMTLWeighting(max_norm=None)(gramian)
    torch.testing.assert_close(gramian @ alpha, 1 / alpha, rtol=1e-8, atol=0)


def test_update_weights_every_reuses_weights() -> None:
    first, second, third = (_random_matrix(3, 6, seed=s) for s in (1, 2, 3))
    weighting = NashMTLWeighting(max_norm=None, update_weights_every=2)
    w1 = weighting(first @ first.T)
    torch.testing.assert_close(weighting(second @ second.T), w1)
    w3 = weighting(third @ third.T)
    torch.testing.assert_close(w3, NashMTLWeighting(max_norm=None)(third @ third.T))


def test_state_dict_round_trip_and_reset() -> None:
    matrices = [_random_matrix(3, 6, seed=s) for s in range(4)]
    aggregator = NashMTL(update_weights_every=3)
    aggregator(matrices[0])
    buffer = io.BytesIO()
    torch.save(aggregator.state_dict(), buffer)
    buffer.seek(0)
    restored = NashMTL(update_weights_every=3)
    restored.load_state_dict(torch.load(buffer))
    for matrix in matrices[1:]:
        torch.testing.assert_close(restored(matrix), aggregator(matrix))
    aggregator.reset()
    assert aggregator.state_dict() == {"step": 0, "previous_weights": None}
    assert aggregator.is_stateful


def test_infeasible_problem_falls_back() -> None:
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    feasible = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    weighting = NashMTLWeighting(max_norm=None)
    torch.testing.assert_close(
        weighting(opposite @ opposite.T), torch.zeros(2, dtype=torch.float64)
    )
    previous = weighting(feasible @ feasible.T)
    torch.testing.assert_close(weighting(opposite @ opposite.T), previous)


def test_zero_row_gets_zero_weight() -> None:
    matrix = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    alpha = NashMTLWeighting(max_norm=None)(matrix @ matrix.T)
    assert alpha[1].item() == 0.0
    torch.testing.assert_close(
        alpha[[0, 2]], NashMTLWeighting(max_norm=None)((matrix @ matrix.T)[[0, 2]][:, [0, 2]])
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    matrix = torch.randn(3, 8, dtype=dtype)
    update = NashMTL()(matrix)
    assert update.dtype == dtype and update.shape == (8,)


def test_n_tasks_mismatch() -> None:
    with pytest.raises(ValueError, match="n_tasks=3"):
        NashMTL(n_tasks=3)(torch.randn(2, 4))


def test_changing_number_of_objectives_needs_reset() -> None:
    aggregator = NashMTL()
    aggregator(torch.randn(3, 4))
    with pytest.raises(ValueError, match="reset"):
        aggregator(torch.randn(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_tasks": 0}, ValueError),
        ({"n_tasks": 2.0}, TypeError),
        ({"max_norm": 0.0}, ValueError),
        ({"max_norm": -1.0}, ValueError),
        ({"max_norm": "1"}, TypeError),
        ({"update_weights_every": 0}, ValueError),
        ({"optim_niter": 0}, ValueError),
    ],
)
def test_bad_parameters(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        NashMTL(**kwargs)


@pytest.mark.parametrize(
    "state",
    [
        {"step": 0},
        {"step": -1, "previous_weights": None},
        {"step": 1, "previous_weights": torch.ones(2, 2)},
    ],
)
def test_bad_state(state: dict) -> None:
    with pytest.raises(ValueError, match="state"):
        NashMTL().load_state_dict(state)


def test_negative_diagonal_is_not_a_gramian() -> None:
    with pytest.raises(ValueError, match="negative diagonal"):
        NashMTLWeighting()(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_row_scaling_equivariance() -> None:
    """Scaling row i by k_i divides α_i by k_i (the update is unchanged), even for k up to 1e6."""
    matrix = _random_matrix(4, 10, seed=9)
    scales = torch.tensor([1e-3, 1.0, 1e3, 7.0], dtype=torch.float64)
    scaled = matrix * scales[:, None]
    alpha = NashMTLWeighting(max_norm=None)(matrix @ matrix.T)
    alpha_scaled = NashMTLWeighting(max_norm=None)(scaled @ scaled.T)
    torch.testing.assert_close(alpha_scaled, alpha / scales, rtol=1e-9, atol=0)


def test_float32_collinear_conflicting_rows_give_zero() -> None:
    """Rounding noise of a float32 Gramian must not create a fake common direction."""
    matrix = torch.tensor([[1.5410], [-0.2934], [-2.1788]], dtype=torch.float32)
    torch.testing.assert_close(NashMTL()(matrix), torch.zeros(1))
