"""Tests of CAGrad against SciPy solutions of its dual and primal problems."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from hf_jd.aggregation import CAGrad, CAGradWeighting
from hf_jd.aggregation.cagrad import solve_cagrad_dual


def _dual_objective(w: np.ndarray, gramian: np.ndarray, c: float) -> float:
    m = len(w)
    s = c * math.sqrt(gramian.sum() / m**2)
    return float(w @ gramian.sum(axis=1) / m + s * math.sqrt(max(w @ gramian @ w, 0.0)))


def _scipy_dual(gramian: np.ndarray, c: float) -> np.ndarray:
    m = gramian.shape[0]
    result = minimize(
        _dual_objective,
        np.full(m, 1.0 / m),
        args=(gramian, c),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return result.x


def _scipy_primal(matrix: np.ndarray, c: float) -> np.ndarray:
    """max_d min_i g_iᵀd  s.t. |d - g0| <= c|g0|, as max t s.t. g_iᵀd >= t."""
    g0 = matrix.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    n = matrix.shape[1]
    constraints = [
        {"type": "ineq", "fun": lambda x: matrix @ x[:n] - x[n]},
        {"type": "ineq", "fun": lambda x: radius**2 - np.sum((x[:n] - g0) ** 2)},
    ]
    start = np.concatenate([g0, [float((matrix @ g0).min())]])
    result = minimize(
        lambda x: -x[n],
        start,
        method="SLSQP",
        constraints=constraints,
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    return result.x[:n]


def _conflicting(m: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
    matrix[0] = -0.7 * matrix[1:].mean(dim=0) + 0.3 * matrix[0]
    return matrix


@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("c", [0.1, 0.5, 2.0])
def test_dual_matches_scipy(m: int, c: float) -> None:
    gramian = (lambda j: (j @ j.T).numpy())(_conflicting(m, 12, seed=m))
    ours = solve_cagrad_dual(gramian, c)
    reference = _scipy_dual(gramian, c)
    assert ours.min() >= 0 and ours.sum() == pytest.approx(1.0)
    assert _dual_objective(ours, gramian, c) <= _dual_objective(reference, gramian, c) + 1e-10


@pytest.mark.parametrize("m", [2, 3, 4])
def test_update_solves_primal_problem(m: int) -> None:
    c = 0.5
    matrix = _conflicting(m, 6, seed=10 + m)
    update = CAGrad(c=c)(matrix).numpy()
    reference = _scipy_primal(matrix.numpy(), c)
    g0 = matrix.numpy().mean(axis=0)
    assert np.linalg.norm(update - g0) == pytest.approx(c * np.linalg.norm(g0), rel=1e-8)
    assert (matrix.numpy() @ update).min() >= (matrix.numpy() @ reference).min() - 1e-7
    np.testing.assert_allclose(update, reference, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 1e-5, 1e-7])
def test_a_small_row_picked_by_the_dual_is_not_a_cancellation(scale: float) -> None:
    """One objective with a tiny gradient (a nearly converged task): the dual puts its weight there, so ``|g_w|`` is
    tiny, but its direction is well determined and the update is still the primal solution (below 1e-4 of the rows'
    size, it was taken for a cancellation and the update was the mean, which conflicts with a row)."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    matrix[3] *= scale
    update = CAGrad(c=0.5)(matrix).numpy()
    reference = _scipy_primal(matrix.numpy(), 0.5)
    np.testing.assert_allclose(update, reference, atol=1e-5)
    assert not np.allclose(update, matrix.mean(dim=0).numpy())


@pytest.mark.parametrize(
    "rows",
    [
        [[-1.48, 0.99], [0.18, 1.01], [0.96, -0.98]],  # the rows positively span the plane
        [[0.01, 0.5], [-1.35, -1.03], [1.12, 0.84]],
        "random",
    ],
)
def test_zero_in_convex_hull_still_solves_primal_problem(rows: list | str) -> None:
    """With 0 in the convex hull of the rows (min-norm point ~1e-16) no direction improves every
    objective, but the paper's update is still the ball's point with the least bad worst objective,
    not the mean (the root search once trusted the sign of a rounding-level residual there)."""
    if rows == "random":
        matrix = torch.randn(5, 3, generator=torch.Generator().manual_seed(96), dtype=torch.float64)
    else:
        matrix = torch.tensor(rows, dtype=torch.float64)
    update = CAGrad(c=0.5)(matrix).numpy()
    reference = _scipy_primal(matrix.numpy(), 0.5)
    worst, reference_worst = (matrix.numpy() @ update).min(), (matrix.numpy() @ reference).min()
    assert worst >= reference_worst - 1e-7
    assert worst > (matrix.numpy() @ matrix.mean(dim=0).numpy()).min() + 1e-3  # better than the mean


@pytest.mark.parametrize("c", [0.9, 1.0, 2.0, 5.0])
@pytest.mark.parametrize(
    "rows", [[[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0]], "random"]
)
def test_a_ball_that_reaches_the_dual_cone(c: float, rows: list | str) -> None:
    """0 in the convex hull of the rows and a ball reaching points that conflict with no row: the primal optimum is 0
    and the dual's g_w cancels. The update is the point of the dual cone closest to g0 (in the ball, worst objective
    0), not the mean (worst objective -2/3 for the first rows, where the optimum is 0)."""
    if rows == "random":  # (rows around a common direction: 0 in their convex hull for c large enough)
        generator = torch.Generator().manual_seed(3)
        matrix = torch.randn(12, 6, generator=generator, dtype=torch.float64) + 0.3
    else:
        matrix = torch.tensor(rows, dtype=torch.float64)
    update = CAGrad(c=c)(matrix).numpy()
    jacobian = matrix.numpy()
    g0 = jacobian.mean(axis=0)
    reference = _scipy_primal(jacobian, c)
    assert (jacobian @ update).min() >= (jacobian @ reference).min() - 1e-6
    assert np.linalg.norm(update - g0) <= c * np.linalg.norm(g0) * (1 + 1e-8)


def test_weights_formula_and_aggregator_consistency() -> None:
    matrix = _conflicting(4, 10, seed=3)
    gramian = matrix @ matrix.T
    weights = CAGradWeighting(c=0.4)(gramian)
    dual = solve_cagrad_dual((gramian / gramian.diagonal().mean()).numpy(), 0.4)
    g_w = torch.from_numpy(dual) @ matrix
    g0 = matrix.mean(dim=0)
    expected = g0 + 0.4 * g0.norm() / g_w.norm() * g_w
    torch.testing.assert_close(weights @ matrix, expected)
    torch.testing.assert_close(CAGrad(c=0.4)(matrix), weights @ matrix)


def test_c_zero_is_mean() -> None:
    matrix = _conflicting(3, 7, seed=1)
    torch.testing.assert_close(CAGrad(c=0.0)(matrix), matrix.mean(dim=0))


def test_scale_invariant_weights() -> None:
    gramian = (lambda j: j @ j.T)(_conflicting(5, 9, seed=2))
    weighting = CAGradWeighting()
    torch.testing.assert_close(weighting(gramian), weighting(1e4 * gramian))


def test_non_conflicting_rows_get_more_than_mean() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    update = CAGrad(c=0.5)(matrix)
    # The worst improvement is maximised by moving towards the smaller-progress direction: by
    # symmetry the update is parallel to the mean, with |d - g0| = c|g0|.
    torch.testing.assert_close(update, torch.tensor([0.75, 0.75], dtype=torch.float64))


@pytest.mark.parametrize("matrix", [torch.zeros(3, 4), torch.tensor([[1.0, 2.0], [-1.0, -2.0]])])
def test_degenerate_inputs_give_mean(matrix: torch.Tensor) -> None:
    torch.testing.assert_close(CAGrad()(matrix), matrix.mean(dim=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    matrix = _conflicting(4, 11, seed=5).to(dtype)
    update = CAGrad()(matrix)
    assert update.dtype == dtype and update.shape == (11,)
    torch.testing.assert_close(update.double(), CAGrad()(matrix.double()), rtol=1e-4, atol=1e-4)


def test_single_row_is_scaled_row() -> None:
    row = torch.tensor([[3.0, -4.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(c=0.5)(row), 1.5 * row[0])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"c": -0.1}, ValueError),
        ({"c": float("nan")}, ValueError),
        ({"c": "0.5"}, TypeError),
        ({"norm_eps": 0.0}, ValueError),
        ({"norm_eps": True}, TypeError),
    ],
)
def test_bad_parameters(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        CAGrad(**kwargs)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        CAGrad()(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="square"):
        CAGradWeighting()(torch.ones(2, 3))


def test_repr() -> None:
    assert repr(CAGrad(c=0.2)) == "CAGrad(CAGradWeighting(c=0.2, norm_eps=0.0001))"


def test_negative_diagonal_is_not_a_gramian() -> None:
    with pytest.raises(ValueError, match="negative diagonal"):
        CAGradWeighting()(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_one_gramian(dtype: torch.dtype) -> None:
    """A rank-one float32 Gramian is slightly indefinite; the simplex QPs must still solve."""
    matrix = torch.tensor([[1.5410], [-0.2934], [-2.1788], [0.5684]], dtype=dtype)
    update = CAGrad()(matrix)
    assert torch.isfinite(update).all() and update.shape == (1,)
    torch.testing.assert_close(update.double(), CAGrad()(matrix.double()), rtol=1e-4, atol=1e-5)


def _random_gramian(m: int, n: int, shift: float, seed: int, spread: float = 0.0) -> np.ndarray:
    """Normalised Gramian of random rows (plus ``shift`` times a common row), row norms spread over
    ``10^±spread``."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
    matrix += shift * torch.randn(n, generator=generator, dtype=torch.float64)
    matrix *= torch.logspace(-spread, spread, m, dtype=torch.float64).unsqueeze(1)
    gramian = (matrix @ matrix.T).numpy()
    return gramian / (np.trace(gramian) / m)


def _assert_dual_kkt(gramian: np.ndarray, weights: np.ndarray, c: float, tol: float = 1e-8) -> None:
    """Optimality of the convex dual: w ∈ Δ and b + s·Gw/|g_w| − μ ≥ 0 with equality on the support."""
    m = len(weights)
    b = gramian.sum(axis=1) / m
    s = c * math.sqrt(gramian.sum() / m**2)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0, abs=1e-12)
    gradient = b + s * (gramian @ weights) / math.sqrt(weights @ gramian @ weights)
    support = weights > 1e-12
    mu = gradient[support].mean()
    size = np.abs(gradient).max()
    assert np.abs(gradient[support] - mu).max() <= tol * size
    assert (gradient - mu).min() >= -tol * size


@pytest.mark.parametrize(
    "m, n, shift, spread",
    [(6, 3, 0.0, 0.0), (12, 12, 0.0, 0.0), (16, 64, 1.0, 0.0), (16, 4, 1.0, 0.0), (16, 40, 1.0, 3.0)],
)
def test_support_pivoting_matches_root_search_and_scipy(
    m: int, n: int, shift: float, spread: float
) -> None:
    """The support solver (closed form per support) gives the optimum that the quadprog root search
    and SciPy's SLSQP find, including with 0 in the convex hull of the rows (n < m) and with row
    norms spread over six orders of magnitude."""
    from hf_jd.aggregation.cagrad import _solve_by_root_search, _solve_by_supports

    gramian = _random_gramian(m, n, shift, seed=m + n, spread=spread)
    b, s = gramian.sum(axis=1) / m, 0.5 * math.sqrt(gramian.sum() / m**2)
    ours = _solve_by_supports(gramian, b, s)
    assert ours is not None
    _assert_dual_kkt(gramian, ours, 0.5)
    root = _solve_by_root_search(gramian, b, s)
    reference = _scipy_dual(gramian, 0.5)
    assert _dual_objective(ours, gramian, 0.5) <= _dual_objective(root, gramian, 0.5) + 1e-12
    assert _dual_objective(ours, gramian, 0.5) <= _dual_objective(reference, gramian, 0.5) + 1e-12
    if spread == 0.0:  # |g_w|², which sets the update; the root search is less accurate otherwise
        assert ours @ gramian @ ours == pytest.approx(root @ gramian @ root, rel=1e-6)


@pytest.mark.parametrize("n, shift", [(48, 0.0), (192, 0.0), (600, 1.0)])
def test_large_m_needs_no_quadprog(monkeypatch: pytest.MonkeyPatch, n: int, shift: float) -> None:
    """At IWRM sizes (m = 192) the quadprog root search took 0.5 s to minutes (m = 512: 9 s); the
    support solver must answer alone, exactly (KKT of the convex dual)."""
    import quadprog

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("quadprog was called")

    monkeypatch.setattr(quadprog, "solve_qp", forbidden)
    gramian = _random_gramian(192, n, shift, seed=n)
    weights = solve_cagrad_dual(gramian, 0.5)
    _assert_dual_kkt(gramian, weights, 0.5)
