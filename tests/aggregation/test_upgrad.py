"""Tests of UPGrad and UPGradWeighting against primal projections and the paper's properties."""

from __future__ import annotations

import pytest
import torch

from hf_jd.aggregation import UPGrad, UPGradWeighting

from _aggregation_references import upgrad_primal

DT = torch.float64


def non_conflict_bound(jac: torch.Tensor, weights: torch.Tensor, reg_eps: float) -> torch.Tensor:
    """Lower bound on J·A(J) implied by the relative regularisation: (G w)ᵢ ≥ −m·reg_eps·Gᵢᵢ·wᵢ
    (each row's slack relative to its own squared norm)."""
    rounding = 1e-9 * (jac.abs().sum(dim=1) * (weights.abs() @ jac.abs()).max())
    return -reg_eps * jac.shape[0] * (jac * jac).sum(dim=1) * weights - rounding


def adversarial_matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 30, generator=g, dtype=DT)
    near_parallel = base.clone()
    near_parallel[1] = base[0] + 1e-7 * torch.randn(30, generator=g, dtype=DT)
    near_parallel[2] = -base[0] + 1e-3 * torch.randn(30, generator=g, dtype=DT)
    opposite = torch.stack([base[0], -base[0], base[1], -2 * base[1]])
    scaled = base * torch.logspace(-3, 3, 8, dtype=DT).unsqueeze(1)  # norms differ by 1e6
    big = torch.randn(64, 100, generator=g, dtype=DT)
    wide = torch.randn(64, 20, generator=g, dtype=DT)  # rank 20 < m
    return {
        "near_parallel": near_parallel,
        "opposite": opposite,
        "scaled": scaled,
        "m64": big,
        "m64_rank20": wide,
    }


@pytest.mark.parametrize("name", list(adversarial_matrices()))
def test_non_conflicting_adversarial(name: str) -> None:
    jac = adversarial_matrices()[name]
    aggregator = UPGrad()
    weights = aggregator.weights(jac)
    update = aggregator(jac)
    torch.testing.assert_close(update, weights @ jac)
    assert bool((jac @ update >= non_conflict_bound(jac, weights, 1e-4)).all())


@pytest.mark.parametrize("seed", range(5))
def test_non_conflicting_random_exact_without_regularisation(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(10, 40, generator=g, dtype=DT)
    update = UPGrad(reg_eps=0.0)(jac)
    assert float((jac @ update).min()) >= -1e-10 * float(jac.norm() * update.norm())


@pytest.mark.parametrize(("m", "n"), [(2, 5), (5, 8), (12, 30)])
def test_matches_primal_projections(m: int, n: int) -> None:
    jac = torch.randn(m, n, dtype=DT)
    expected = upgrad_primal(jac)
    torch.testing.assert_close(UPGrad(reg_eps=0.0)(jac), expected, rtol=1e-8, atol=1e-10)
    # The default regularisation moves the answer only slightly.
    torch.testing.assert_close(UPGrad()(jac), expected, rtol=0, atol=1e-2 * float(expected.norm()))


def test_preference_vector_matches_primal() -> None:
    jac = torch.randn(4, 9, dtype=DT)
    pref = torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=DT)
    expected = upgrad_primal(jac, pref)
    torch.testing.assert_close(UPGrad(pref_vector=pref, reg_eps=0.0)(jac), expected, rtol=1e-8, atol=1e-10)
    from_list = UPGrad(pref_vector=[0.5, 0.0, 2.0, 1.0], reg_eps=0.0)(jac)
    torch.testing.assert_close(from_list, expected, rtol=1e-8, atol=1e-10)


def test_equals_mean_without_conflict() -> None:
    jac = torch.rand(7, 20, dtype=DT) + 0.1  # positive entries: all inner products positive
    assert torch.equal(UPGrad().weights(jac), torch.full((7,), 1 / 7, dtype=DT))
    torch.testing.assert_close(UPGrad()(jac), jac.mean(dim=0))


@pytest.mark.parametrize("reg_eps", [0.0, 1e-4])
def test_linear_under_scaling(reg_eps: float) -> None:
    # Paper property: c ↦ A(diag(c) J) is linear on c > 0 (also with the relative regularisation).
    jac = torch.randn(5, 12, dtype=DT)
    aggregator = UPGrad(reg_eps=reg_eps)
    c1 = torch.rand(5, dtype=DT) + 0.1
    c2 = torch.rand(5, dtype=DT) + 0.1

    def f(c: torch.Tensor) -> torch.Tensor:
        return aggregator(c.unsqueeze(1) * jac)

    torch.testing.assert_close(f(2.0 * c1 + 3.0 * c2), 2.0 * f(c1) + 3.0 * f(c2), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("ratio", [30.0, 100.0, 1e4])
def test_rows_of_very_different_norms_do_not_conflict(ratio: float) -> None:
    """One row ``ratio`` times larger than the others: with a ridge common to all rows (relative to the
    trace) the projection conflicted with the small rows (cos −0.17 at 100×); the relative ridge keeps
    every row's slack relative to its own norm."""
    g = torch.Generator().manual_seed(3)
    jac = torch.randn(4, 20, generator=g, dtype=DT)
    jac[0] *= ratio
    update = UPGrad()(jac)
    cosines = (jac @ update) / (jac.norm(dim=1) * update.norm())
    # The slack (J d)ᵢ ≥ −m·reg_eps·Gᵢᵢ·wᵢ bounds each cosine by −m·reg_eps times the share of the
    # update that row i's weight makes, whatever the norms (the common ridge gave −0.17 at 100×).
    assert float(cosines.min()) >= -4 * 1e-4
    exact = UPGrad(reg_eps=0.0)(jac)
    torch.testing.assert_close(update, exact, rtol=0, atol=1e-3 * float(exact.norm()))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
def test_small_gradients_are_still_projected(scale: float) -> None:
    """The default norm_eps = 0 treats only an all-zero Gramian as zero: small gradients (late in
    training) are projected like large ones (a trace below 1e-4 used to give the plain mean)."""
    jac = scale * torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=DT)
    update = UPGrad()(jac)
    assert bool((jac @ update >= 0).all())
    torch.testing.assert_close(update / scale, UPGrad()(jac / scale), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(update, jac.mean(dim=0))


def test_permutation_invariant() -> None:
    jac = torch.randn(9, 15, dtype=DT)
    perm = torch.randperm(9)
    aggregator = UPGrad()
    torch.testing.assert_close(aggregator(jac[perm]), aggregator(jac), rtol=1e-9, atol=1e-11)
    permuted_weights = aggregator.weights(jac[perm])
    torch.testing.assert_close(permuted_weights, aggregator.weights(jac)[perm], rtol=1e-9, atol=1e-11)


def test_aggregator_equals_weighting_of_gramian() -> None:
    jac = torch.randn(20, 50, dtype=DT)
    aggregator = UPGrad()
    torch.testing.assert_close(aggregator(jac), UPGradWeighting()(jac @ jac.T) @ jac)


def test_zero_jacobian_gives_mean_weights() -> None:
    jac = torch.zeros(3, 4)
    assert torch.equal(UPGrad().weights(jac), torch.full((3,), 1 / 3))
    assert torch.equal(UPGrad()(jac), torch.zeros(4))


def test_float32_input() -> None:
    jac = torch.randn(6, 10)
    update = UPGrad()(jac)
    assert update.dtype == torch.float32
    torch.testing.assert_close(update, UPGrad()(jac.double()).float(), rtol=1e-4, atol=1e-5)


def test_large_m_non_conflicting() -> None:
    jac = torch.randn(64, 300, dtype=DT)
    aggregator = UPGrad()
    weights = aggregator.weights(jac)
    assert bool((jac @ (weights @ jac) >= non_conflict_bound(jac, weights, 1e-4)).all())
    assert bool((weights >= 1 / 64 - 1e-12).all())  # each vᵢ ≥ eᵢ, so w ≥ p


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pref_vector": [1.0, -1.0]}, ValueError, "pref_vector"),
        ({"pref_vector": [float("nan"), 1.0]}, ValueError, "pref_vector"),
        ({"pref_vector": [[1.0, 1.0]]}, ValueError, "1-D"),
        ({"pref_vector": [0.0, 0.0]}, ValueError, "positive"),
        ({"pref_vector": "abc"}, TypeError, "pref_vector"),
        ({"norm_eps": -1.0}, ValueError, "norm_eps"),
        ({"reg_eps": float("inf")}, ValueError, "reg_eps"),
        ({"reg_eps": "0.1"}, TypeError, "reg_eps"),
    ],
)
def test_bad_parameters(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        UPGrad(**kwargs)
    with pytest.raises(error, match=match):
        UPGradWeighting(**kwargs)


def test_pref_vector_wrong_length_at_call() -> None:
    with pytest.raises(ValueError, match="3 entries but the Jacobian has 2 rows"):
        UPGrad(pref_vector=[1.0, 1.0, 1.0])(torch.randn(2, 5))


@pytest.mark.parametrize(
    "bad",
    [torch.randn(3), torch.randn(0, 3), torch.full((2, 3), float("nan")), torch.ones(2, 3, dtype=torch.long)],
)
def test_bad_matrix(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        UPGrad()(bad)


def test_repr() -> None:
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, norm_eps=0.0, reg_eps=0.0001)"
    expected = "UPGradWeighting(pref_vector=[1.0, 2.0], norm_eps=0.1, reg_eps=0.2)"
    assert repr(UPGradWeighting([1, 2], 0.1, 0.2)) == expected


def test_realistic_per_sample_gradients_of_a_small_network() -> None:
    # Per-sample gradients (explicit Jacobian from torch.func) of a tiny MLP: ill-conditioned,
    # with many conflicting pairs. Check non-conflict and agreement with quadprog on a few rows.
    from torch.func import functional_call, grad, vmap

    from _aggregation_references import project_onto_dual_cone_primal

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    inputs, labels = torch.randn(48, 6, dtype=DT), torch.randint(0, 3, (48,))
    params = {name: value.detach() for name, value in model.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    jac = torch.cat([g.reshape(48, -1) for g in grads.values()], dim=1)
    aggregator = UPGrad(reg_eps=0.0)
    weights = aggregator.weights(jac)
    update = weights @ jac
    assert float((jac @ update).min()) >= -1e-8 * float(jac.norm() * update.norm())
    expected = torch.stack([project_onto_dual_cone_primal(jac, jac[i]) for i in range(48)]).mean(dim=0)
    torch.testing.assert_close(update, expected, rtol=1e-6, atol=1e-8 * float(expected.norm()))


def test_exact_projection_on_a_singular_gramian_with_rows_of_different_norms() -> None:
    """reg_eps=0 on a singular Gramian (3 rows in the plane, one 1e6 times larger): the only update that
    conflicts with no row is 0. The fallback ridge used to be absolute (|d| = 8% of the large row); it is
    now the smallest relative ridge that makes the Gramian definite."""
    angles = torch.tensor([0.0, 2.2, 4.2], dtype=DT)
    jac = torch.stack([angles.cos(), angles.sin()], dim=1)
    jac[0] *= 1e6
    update = UPGrad(reg_eps=0.0)(jac)
    assert float(update.norm()) <= 1e-6 * float(jac[0].norm())


def test_positively_spanning_rows_exact_projection_is_zero_and_regularised_within_slack() -> None:
    """Rows that positively span the plane leave only 0 in the dual cone: reg_eps=0 finds it; the default
    ridge keeps a larger update (documented) whose conflicts stay within m·reg_eps·wᵢ‖gᵢ‖²."""
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 0.01], [0.0, -1.0]], dtype=torch.float64)
    mean_norm = float(matrix.mean(dim=0).norm())
    assert float(UPGrad(reg_eps=0.0)(matrix).norm()) < 1e-4 * mean_norm
    aggregator = UPGrad()
    weights = aggregator.weights(matrix)
    products = matrix @ (weights @ matrix)
    slack = 3 * aggregator.weighting.reg_eps * weights * (matrix**2).sum(dim=1)
    assert bool((products >= -slack * (1 + 1e-9)).all())
