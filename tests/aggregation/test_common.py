"""Properties every registered aggregator must have (parametrised over the whole registry)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_jd.aggregation import (
    Aggregator,
    GramianWeightedAggregator,
    Weighting,
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


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_input_is_a_clear_error(name: str) -> None:
    """Tensors without values (raw torch errors about copying out of meta tensors before)."""
    with pytest.raises(ValueError, match="meta device"):
        build(name)(torch.empty(N_ROWS, 8, device="meta"))
    aggregator = build(name)
    if isinstance(aggregator, GramianWeightedAggregator):
        with pytest.raises(ValueError, match="meta device"):
            aggregator.weighting(torch.empty(N_ROWS, N_ROWS, device="meta"))


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


def _not_gramians() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(N_ROWS, 8, generator=generator, dtype=torch.float64)
    gramian = matrix @ matrix.T
    skewed = gramian + torch.triu(torch.ones_like(gramian), diagonal=1) * gramian.diagonal().max()
    indefinite = torch.eye(N_ROWS, dtype=torch.float64)
    indefinite[0, 1] = indefinite[1, 0] = 5.0  # |G01| > sqrt(G00 G11): no real rows have these norms
    orphan = gramian.clone()
    orphan[2, :] = orphan[:, 2] = 0.0
    orphan[2, 3] = orphan[3, 2] = 1.0  # a zero row with a non-zero inner product
    return {"non-symmetric": skewed, "indefinite": indefinite, "zero row with inner products": orphan}


@pytest.mark.parametrize("case", ["non-symmetric", "indefinite", "zero row with inner products"])
@pytest.mark.parametrize("name", available_weightings())
def test_matrices_that_are_no_gramian_are_rejected(name: str, case: str) -> None:
    """A non-symmetric matrix, or one violating |Gᵢⱼ| ≤ sqrt(Gᵢᵢ Gⱼⱼ) (Cauchy–Schwarz), is J Jᵀ of
    no matrix J: every weighting raises a ValueError saying so (they silently returned weights)."""
    weighting = build(name).weighting
    with pytest.raises(ValueError, match=r"not J @ J\.T"):
        weighting(_not_gramians()[case])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rounding_asymmetry_and_cauchy_schwarz_excess_are_accepted(dtype: torch.dtype) -> None:
    """Gramians computed in low precision (asymmetric, and |Gᵢⱼ| a little above sqrt(Gᵢᵢ Gⱼⱼ) for
    parallel rows) are still Gramians."""
    from hf_jd.aggregation import check_gramian

    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 300, generator=generator).to(dtype)
    matrix[1] = matrix[0] * 3  # parallel rows: Cauchy–Schwarz with equality
    low = matrix @ matrix.T  # not symmetrised: rounding asymmetry in float16/bfloat16
    check_gramian(low)
    exact = matrix.double() @ matrix.double().T  # accumulated elsewhere: 1e-4 relative noise
    check_gramian(exact * (1 + 1e-4 * torch.rand(6, 6, generator=generator, dtype=torch.float64)))


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl"])
def test_short_last_batch_raises_and_leaves_the_state_intact(name: str) -> None:
    """IWRM: the last batch of an epoch may have fewer rows. Aggregators whose state is per row
    raise a ValueError naming the rows and reset() (JDTrainer adds its drop_last hint to errors
    that mention rows), without touching their state: the next full batch continues exactly as if
    the short one had not been seen; after reset() the short batch is accepted."""
    full = [jacobian(seed=s) for s in (1, 2, 3)]
    short = torch.randn(3, 8, dtype=torch.float64)
    reference = build(name, seed=4)
    expected = [reference(matrix) for matrix in full]
    aggregator = build(name, seed=4)
    torch.testing.assert_close(aggregator(full[0]), expected[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"(?s)rows.*reset\(\)"):
        aggregator(short)
    for matrix, value in zip(full[1:], expected[1:]):
        torch.testing.assert_close(aggregator(matrix), value, rtol=0, atol=0)
    aggregator.reset()
    assert bool(torch.isfinite(aggregator(short)).all())


@pytest.mark.parametrize("name", NAMES)
def test_pickle_and_deepcopy_continue_identically(name: str) -> None:
    """Copies (pickle, deepcopy) taken after a step carry the whole state: they continue exactly
    like the original (needed by DataParallel-style replication and by checkpointing objects)."""
    import pickle

    aggregator = build(name, seed=6)
    aggregator(jacobian(seed=1))
    copies = [pickle.loads(pickle.dumps(aggregator)), copy.deepcopy(aggregator)]
    expected = [aggregator(jacobian(seed=s)) for s in (2, 3)]
    for twin in copies:
        for s, value in zip((2, 3), expected):
            torch.testing.assert_close(twin(jacobian(seed=s)), value, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1e-25, 1e25])
@pytest.mark.parametrize("name", available_weightings())
def test_float32_jacobians_whose_gramian_leaves_float32_range(name: str, scale: float) -> None:
    """Rows of size 1e±25 in float32: their Gramian (1e±50) under- or overflows float32. It is
    computed in float64, so the update is the float64 one (it was the mean, as for a zero Jacobian,
    or a ValueError blaming the losses for non-finite entries)."""
    matrix = jacobian(torch.float64) * scale
    single = matrix.float()
    update = build(name, seed=2)(single)
    expected = build(name, seed=2)(single.double())
    assert update.dtype == torch.float32 and bool(torch.isfinite(update).all())
    torch.testing.assert_close(update.double(), expected, rtol=1e-5, atol=0)


def test_gramian_overflowing_float64_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"overflows torch.float64.*scale the losses down"):
        build("upgrad")(jacobian(torch.float64) * 1e160)


# Exponent e of the weights' scaling w(s·G) = s^e·w(G) (Nash-MTL and FairGrad: G w = w^{-1/α});
# the other weightings are invariant to the scale of the Gramian.
_SCALE_EXPONENT = {"nash_mtl": -0.5, "fairgrad": -0.5}
_WEIGHTING_KWARGS = {"nash_mtl": {"max_norm": None}}  # clipping at a fixed norm is not scale-free


def _weighting(name: str) -> Weighting:
    from hf_jd.aggregation import get_weighting

    torch.manual_seed(0)
    kwargs = {**CONSTRUCTOR_DEFAULTS.get(name, {}), **_WEIGHTING_KWARGS.get(name, {})}
    return get_weighting(name, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("name", available_weightings())
def test_weights_of_extremely_scaled_gramians(name: str, scale: float, dtype: torch.dtype) -> None:
    """Gramians with entries ~1e±30 (in float32 too): the weights are those of the unscaled
    Gramian (times s^(-1/2) for Nash-MTL and FairGrad), finite, in the Gramian's dtype."""
    matrix = jacobian(seed=5)
    matrix[0] = -0.5 * matrix[1] + 0.1 * matrix[0]  # a conflict
    gramian = matrix @ matrix.T
    expected = _weighting(name)(gramian) * scale ** _SCALE_EXPONENT.get(name, 0.0)
    weights = _weighting(name)((gramian * scale).to(dtype))
    assert weights.dtype == dtype and bool(torch.isfinite(weights).all())
    rtol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(weights.double(), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


_PERMUTATION_EQUIVARIANT = [
    name for name in available_weightings() if name not in {"pcgrad", "gradvac", "random", "constant"}
]


@pytest.mark.parametrize("name", _PERMUTATION_EQUIVARIANT)
def test_permuting_the_rows_permutes_the_weights(name: str) -> None:
    """Deterministic weightings do not depend on the order of the objectives: w(P G Pᵀ) = P w(G)
    (PCGrad and GradVac draw random orders, Random random weights, Constant fixes them per index)."""
    matrix = jacobian(seed=8)
    matrix[2] = -0.6 * matrix[4] + 0.2 * matrix[2]
    gramian = matrix @ matrix.T
    permutation = torch.tensor([3, 0, 4, 1, 2])
    weights = _weighting(name)(gramian)
    permuted = _weighting(name)(gramian[permutation][:, permutation])
    torch.testing.assert_close(permuted, weights[permutation], rtol=1e-7, atol=1e-10)
