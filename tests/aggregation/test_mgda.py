"""Tests of MGDA and MGDAWeighting against closed forms and a quadprog simplex QP."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch

from hf_jd.aggregation import MGDA, MGDAWeighting

DT = torch.float64


def min_norm_quadprog(jac: torch.Tensor) -> torch.Tensor:
    """Min-norm point of the hull in the primal: min ‖x‖² s.t. x = Jᵀw, w ∈ simplex.

    Solved as a QP in (w) with quadprog on G + 1e-12 I (equality Σw = 1 first, then w ≥ 0).
    """
    gram = (jac @ jac.T).numpy()
    m = gram.shape[0]
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    ridge = 1e-12 * np.trace(gram) * np.eye(m)
    w = quadprog.solve_qp(gram + ridge, np.zeros(m), constraints, bounds, meq=1)[0]
    return torch.from_numpy(w) @ jac


def test_two_rows_closed_form() -> None:
    # Sener & Koltun (2018), Algorithm 1: α = clip(((g₂ − g₁)·g₂) / ‖g₁ − g₂‖², 0, 1).
    g1 = torch.tensor([1.0, 0.0, 2.0], dtype=DT)
    g2 = torch.tensor([-1.0, 1.0, 0.5], dtype=DT)
    alpha = torch.clamp((g2 - g1) @ g2 / (g1 - g2).square().sum(), 0, 1)
    expected = alpha * g1 + (1 - alpha) * g2
    torch.testing.assert_close(MGDA()(torch.stack([g1, g2])), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("m", "n"), [(3, 10), (8, 20), (20, 10), (40, 60)])
def test_matches_quadprog_and_properties(m: int, n: int) -> None:
    jac = torch.randn(m, n, dtype=DT)
    aggregator = MGDA()
    weights = aggregator.weights(jac)
    update = aggregator(jac)
    torch.testing.assert_close(update, weights @ jac)
    torch.testing.assert_close(update, min_norm_quadprog(jac), rtol=1e-5, atol=1e-7)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=DT))
    # Optimality: every row has inner product ≥ ‖d‖² ≥ 0 with the min-norm point d.
    norm2 = float(update @ update)
    assert float((jac @ update).min()) >= norm2 - 1e-8 * float(jac.norm() ** 2)


def test_zero_in_hull_gives_zero_update() -> None:
    g = torch.randn(5, dtype=DT)
    jac = torch.stack([g, -g, 2 * g])
    update = MGDA()(jac)
    assert float(update.norm()) < 1e-6 * float(g.norm())


def test_duplicate_and_zero_rows() -> None:
    jac = torch.randn(3, 6, dtype=DT)
    dup = torch.cat([jac, jac[:1]])
    torch.testing.assert_close(MGDA()(dup), MGDA()(jac), rtol=1e-6, atol=1e-8)
    with_zero = torch.cat([jac, torch.zeros(1, 6, dtype=DT)])
    assert float(MGDA()(with_zero).norm()) < 1e-6


def test_non_conflicting_rows_give_the_smallest_or_a_mix() -> None:
    g1 = torch.tensor([1.0, 0.0], dtype=DT)
    g2 = torch.tensor([5.0, 0.0], dtype=DT)
    torch.testing.assert_close(MGDA()(torch.stack([g1, g2])), g1)


def test_aggregator_equals_weighting_of_gramian_and_dtype() -> None:
    jac = torch.randn(7, 9)
    update = MGDA()(jac)
    assert update.dtype == torch.float32
    torch.testing.assert_close(update, MGDAWeighting()(jac @ jac.T) @ jac)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"epsilon": 0.0}, ValueError),
        ({"epsilon": -1.0}, ValueError),
        ({"epsilon": 1.0}, ValueError),
        ({"epsilon": 2.0}, ValueError),
        ({"max_iters": 0}, ValueError),
        ({"max_iters": 2.5}, ValueError),
    ],
)
def test_bad_parameters(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        MGDA(**kwargs)


def test_repr() -> None:
    assert repr(MGDA()) == "MGDA(epsilon=1e-05, max_iters=250)"


def test_all_zero_jacobian_gives_a_zero_update() -> None:
    """A zero Gramian used to be divided by its zero trace (nan, then a misleading error)."""
    torch.testing.assert_close(MGDA()(torch.zeros(3, 5)), torch.zeros(5))
    assert bool(torch.isfinite(MGDAWeighting()(torch.zeros(1, 1))).all())


@pytest.mark.parametrize("seed", [9, 37, 142, 152, 235])
def test_near_duplicate_rows_give_the_minimum_norm_point(seed: int) -> None:
    """Rows drawn from 5 directions plus noise of 1e-5 to 1e-2 (per-example gradients of similar examples): the
    pivoting's tolerance, relative to its large iterates, used to accept a support that is not optimal (up to 3e-4
    of the largest row norm off for these seeds, and ⟨gᵢ, d⟩ < ‖d‖²)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 40, generator=generator, dtype=DT) + 0.5
    jac = base[torch.randint(0, 5, (8,), generator=generator)]
    noise = 10.0 ** -int(torch.randint(2, 6, (1,), generator=generator))
    jac = jac + noise * torch.randn(8, 40, generator=generator, dtype=DT)
    update = MGDA()(jac)
    scale = jac.norm(dim=1).max()
    assert (update - min_norm_quadprog(jac)).norm() <= 1e-8 * scale
    assert (jac @ update).min() >= update @ update - 1e-10 * scale**2
