"""Tests of FairGrad: the α-fair fixed point G w = w^{-1/α}."""

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize

from hf_jd.aggregation import FairGrad, FairGradWeighting, NashMTLWeighting


def _random_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.5, m, dtype=torch.float64)[:, None]
    return torch.randn(m, n, generator=generator, dtype=torch.float64) * scales


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("m", [2, 3, 6])
def test_fixed_point(alpha: float, m: int) -> None:
    matrix = _random_matrix(m, 25, seed=m)
    gramian = matrix @ matrix.T
    weights = FairGradWeighting(alpha)(gramian)
    assert (weights > 0).all()
    torch.testing.assert_close(gramian @ weights, weights ** (-1 / alpha), rtol=1e-9, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_matches_scipy_least_squares(alpha: float) -> None:
    """The authors' own method: least squares on G w - w^{-1/α} with w > 0."""
    matrix = _random_matrix(4, 10, seed=3)
    gramian = (matrix @ matrix.T).numpy()
    result = least_squares(
        lambda w: gramian @ w - w ** (-1 / alpha),
        np.full(4, 0.25),
        bounds=(1e-9, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    ours = FairGradWeighting(alpha)(torch.from_numpy(gramian)).numpy()
    np.testing.assert_allclose(ours, result.x, rtol=1e-6)


def test_alpha_one_is_nash_mtl() -> None:
    matrix = _random_matrix(4, 9, seed=4)
    gramian = matrix @ matrix.T
    torch.testing.assert_close(
        FairGradWeighting(1.0)(gramian), NashMTLWeighting(max_norm=None)(gramian)
    )


def test_scaling_the_gramian() -> None:
    matrix = _random_matrix(3, 8, seed=5)
    gramian = matrix @ matrix.T
    alpha, k = 2.0, 10.0
    weighting = FairGradWeighting(alpha)
    torch.testing.assert_close(
        weighting(k * gramian), k ** (-alpha / (1 + alpha)) * weighting(gramian)
    )


def test_rank_deficient_fixed_point() -> None:
    base = _random_matrix(3, 8, seed=6)
    matrix = torch.cat([base, (0.5 * base[0] + base[2]).unsqueeze(0)])
    gramian = matrix @ matrix.T
    weights = FairGradWeighting(2.0)(gramian)
    torch.testing.assert_close(gramian @ weights, weights ** (-1 / 2.0), rtol=1e-8, atol=0)


def test_large_alpha_approaches_max_min_fairness() -> None:
    """As α grows, min_i g_iᵀd/|d| increases to max_{|d|≤1} min_i g_iᵀd = min_{w∈Δ} |wᵀJ|."""
    matrix = _random_matrix(3, 8, seed=7)
    array = matrix.numpy()
    result = minimize(
        lambda w: float(np.sum((w @ array) ** 2)),
        np.full(3, 1 / 3),
        method="SLSQP",
        bounds=[(0, 1)] * 3,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        options={"ftol": 1e-15},
    )
    max_min = float(np.sqrt(result.fun))
    worst = []
    for alpha in [1.0, 10.0, 100.0]:
        update = FairGrad(alpha)(matrix)
        worst.append(((matrix @ update).min() / update.norm()).item())
    assert worst[0] < worst[1] < worst[2] <= max_min + 1e-9
    assert worst[2] == pytest.approx(max_min, rel=1e-2)


def test_opposite_rows_give_zero_weights() -> None:
    matrix = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.5, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(FairGrad()(matrix), torch.zeros(2, dtype=torch.float64))


def test_zero_row_gets_zero_weight() -> None:
    matrix = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    gramian = matrix @ matrix.T
    weights = FairGradWeighting(2.0)(gramian)
    assert weights[1].item() == 0.0
    torch.testing.assert_close(weights[[0, 2]], FairGradWeighting(2.0)(gramian[[0, 2]][:, [0, 2]]))
    torch.testing.assert_close(FairGrad()(torch.zeros(2, 3)), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    matrix = torch.randn(3, 8, dtype=dtype)
    update = FairGrad(alpha=0.5)(matrix)
    assert update.dtype == dtype and update.shape == (8,)
    torch.testing.assert_close(
        update.double(), FairGrad(alpha=0.5)(matrix.double()), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    ("alpha", "error"),
    [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError)],
)
def test_bad_alpha(alpha: object, error: type) -> None:
    with pytest.raises(error, match="alpha"):
        FairGrad(alpha=alpha)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        FairGradWeighting()(torch.ones(2, 3))


def test_repr() -> None:
    assert repr(FairGrad(2)) == "FairGrad(FairGradWeighting(alpha=2.0))"


def test_negative_diagonal_is_not_a_gramian() -> None:
    with pytest.raises(ValueError, match="negative diagonal"):
        FairGradWeighting()(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_float32_collinear_conflicting_rows_give_zero() -> None:
    """Rounding noise of a float32 Gramian must not create a fake common direction."""
    matrix = torch.tensor([[1.5410], [-0.2934], [-2.1788]], dtype=torch.float32)
    torch.testing.assert_close(FairGrad()(matrix), torch.zeros(1))
    torch.testing.assert_close(FairGrad(alpha=3.0)(matrix.double()), torch.zeros(1).double())


@pytest.mark.parametrize("name", ["fairgrad", "nash_mtl"])
def test_float32_feasibility_threshold_does_not_grow_with_m(name: str) -> None:
    """Rounding moves the squared min-norm of the unit rows by ~eps whatever m. The threshold
    once grew as 100·m·eps: 1.2e-4 for these 10 rows (centred simplex plus a small common
    component: squared min-norm 5.4e-5, a genuine common direction), and 3.6e-3 for 300 generic
    independent rows (squared min-norm ~1/m): every float32 IWRM batch of 300 got no update."""
    from hf_jd.aggregation import get_weighting

    m = 10
    rows = torch.eye(m, m + 1, dtype=torch.float64)
    rows[:, :m] -= 1.0 / m
    rows[:, m] = 0.007
    kwargs = {"max_norm": None} if name == "nash_mtl" else {}
    exact = get_weighting(name, **kwargs)(rows @ rows.T)
    single = rows.float()
    weights = get_weighting(name, **kwargs)(single @ single.T).double()
    assert bool((exact > 0).all())
    torch.testing.assert_close(weights, exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["fairgrad", "nash_mtl"])
def test_half_precision_is_solved(name: str, dtype: torch.dtype) -> None:
    """Half-precision Gramians and Jacobians of 5 generic rows: weights close to the float64 ones
    (they were all zero: the noise threshold 100·m·eps exceeded the squared min-norm)."""
    from hf_jd.aggregation import get_aggregator, get_weighting

    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    kwargs = {"max_norm": None} if name == "nash_mtl" else {}
    exact = get_weighting(name, **kwargs)(matrix @ matrix.T)
    from_gramian = get_weighting(name, **kwargs)((matrix @ matrix.T).to(dtype))
    assert from_gramian.dtype == dtype
    torch.testing.assert_close(from_gramian.double(), exact, rtol=0.1, atol=0)
    update = get_aggregator(name, **kwargs)(matrix.to(dtype))
    assert update.dtype == dtype
    expected = exact @ matrix
    assert float((update.double() - expected).norm()) <= 0.05 * float(expected.norm())
