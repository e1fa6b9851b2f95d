"""Tests of PCGrad against a direct implementation on the gradient vectors."""

import io
import itertools

import numpy as np
import pytest
import torch

from hf_jd.aggregation import PCGrad, PCGradWeighting
from hf_jd.aggregation.pcgrad import pcgrad_weights


def _direct_pcgrad(matrix: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 of Yu et al. (2020) on the vectors themselves."""
    total = torch.zeros_like(matrix[0])
    for i, order in enumerate(orders):
        projected = matrix[i].clone()
        for j in order:
            inner = projected @ matrix[j]
            if inner < 0:
                projected = projected - inner / (matrix[j] @ matrix[j]) * matrix[j]
        total += projected
    return total


def _all_orders(m: int) -> list[list[list[int]]]:
    per_row = [list(itertools.permutations([j for j in range(m) if j != i])) for i in range(m)]
    return [[list(order) for order in choice] for choice in itertools.product(*per_row)]


def test_two_rows_closed_form() -> None:
    g1 = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    g2 = torch.tensor([-2.0, 1.0, 0.5], dtype=torch.float64)
    assert g1 @ g2 < 0
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
    torch.testing.assert_close(PCGrad(seed=0)(torch.stack([g1, g2])), expected)


def test_non_conflicting_rows_give_sum() -> None:
    matrix = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(PCGrad(seed=1)(matrix), matrix.sum(dim=0))


@pytest.mark.parametrize("m", [3, 4, 5])
def test_weights_match_direct_implementation_for_given_orders(m: int) -> None:
    matrix = torch.randn(m, 8, dtype=torch.float64)
    gramian = (matrix @ matrix.T).numpy()
    generator = np.random.default_rng(m)
    for _ in range(5):
        orders = [list(generator.permutation([j for j in range(m) if j != i])) for i in range(m)]
        weights = torch.from_numpy(pcgrad_weights(gramian, orders))
        torch.testing.assert_close(weights @ matrix, _direct_pcgrad(matrix, orders))


def test_output_is_one_of_the_possible_orders() -> None:
    matrix = torch.randn(3, 5, dtype=torch.float64)
    candidates = [_direct_pcgrad(matrix, orders) for orders in _all_orders(3)]
    aggregator = PCGrad(seed=7)
    for _ in range(5):
        update = aggregator(matrix)
        assert any(torch.allclose(update, candidate) for candidate in candidates)


def test_deterministic_given_seed_and_reset() -> None:
    matrix = torch.randn(5, 6, dtype=torch.float64)
    first = [PCGrad(seed=3)(matrix) for _ in range(2)]
    aggregator = PCGrad(seed=3)
    sequence = [aggregator(matrix) for _ in range(4)]
    torch.testing.assert_close(sequence[0], first[0])
    aggregator.reset()
    torch.testing.assert_close(aggregator(matrix), sequence[0])
    distinct = {tuple(np.round(u.numpy(), 10)) for u in sequence}
    assert len(distinct) > 1  # the orders are random, so the updates vary across calls


def test_state_dict_round_trip() -> None:
    matrix = torch.randn(4, 6, dtype=torch.float64)
    aggregator = PCGrad(seed=11)
    aggregator(matrix)
    buffer = io.BytesIO()
    torch.save(aggregator.state_dict(), buffer)
    buffer.seek(0)
    restored = PCGrad(seed=0)
    restored.load_state_dict(torch.load(buffer))
    for _ in range(3):
        torch.testing.assert_close(restored(matrix), aggregator(matrix))
    assert aggregator.is_stateful


def test_seed_none_follows_global_seed() -> None:
    matrix = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(123)
    first = PCGrad()(matrix)
    torch.manual_seed(123)
    torch.testing.assert_close(PCGrad()(matrix), first)


def test_aggregator_equals_weighting_times_matrix() -> None:
    matrix = torch.randn(4, 7, dtype=torch.float64)
    weights = PCGradWeighting(seed=5)(matrix @ matrix.T)
    torch.testing.assert_close(PCGrad(seed=5)(matrix), weights @ matrix)


def test_zero_row_is_not_projected_on() -> None:
    matrix = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    orders = [[1, 2], [0, 2], [0, 1]]
    torch.testing.assert_close(PCGrad(seed=0)(matrix), _direct_pcgrad(matrix[[0, 2]], [[1], [0]]))
    assert np.isfinite(pcgrad_weights((matrix @ matrix.T).numpy(), orders)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape(dtype: torch.dtype) -> None:
    matrix = torch.randn(3, 9, dtype=dtype)
    update = PCGrad(seed=2)(matrix)
    assert update.dtype == dtype and update.shape == (9,)


@pytest.mark.parametrize(("seed", "error"), [(-1, ValueError), (1.5, TypeError), ("1", TypeError), (2**64, ValueError)])
def test_bad_seed(seed: object, error: type) -> None:
    with pytest.raises(error, match="seed"):
        PCGrad(seed=seed)


def test_largest_seed_works() -> None:
    PCGrad(seed=2**64 - 1)(torch.randn(3, 4))


def test_bad_state() -> None:
    with pytest.raises(ValueError, match="keys"):
        PCGrad(seed=0).load_state_dict({"foo": 1})


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        PCGrad()(torch.ones(3))


def test_negative_diagonal_is_not_a_gramian() -> None:
    with pytest.raises(ValueError, match="negative diagonal"):
        PCGradWeighting(seed=0)(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_orders_come_from_the_seeded_generator() -> None:
    """Documented behaviour: one torch.randperm per row from a CPU generator seeded with seed."""
    from hf_jd.aggregation._generator import random_orders

    matrix = torch.randn(4, 6, dtype=torch.float64)
    generator = torch.Generator().manual_seed(21)
    aggregator = PCGrad(seed=21)
    for _ in range(3):
        expected = _direct_pcgrad(matrix, random_orders(4, generator))
        torch.testing.assert_close(aggregator(matrix), expected)


def test_random_orders_are_the_documented_permutations() -> None:
    """Row i is one torch.randperm(m - 1) mapped onto the indices other than i, in draw order."""
    from hf_jd.aggregation._generator import random_orders

    m = 7
    orders = random_orders(m, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        expected = [others[k] for k in torch.randperm(m - 1, generator=generator).tolist()]
        assert list(orders[i]) == expected
    assert random_orders(1, generator).shape == (1, 0)


def test_many_rows_match_direct_implementation() -> None:
    """m = 40 rows with many conflicts: only the rows that conflict are updated at each step."""
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    rng = np.random.default_rng(0)
    orders = [list(rng.permutation([j for j in range(40) if j != i])) for i in range(40)]
    weights = pcgrad_weights((matrix @ matrix.T).numpy(), orders)
    torch.testing.assert_close(torch.from_numpy(weights) @ matrix, _direct_pcgrad(matrix, orders))


def test_in_place_update_of_many_rows_matches_direct_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The update used from m = 512 rows (gather into a buffer, index_add_), forced at m = 40: the
    same weights as the direct algorithm, and bit for bit those of the NumPy update."""
    from hf_jd.aggregation import pcgrad

    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    matrix[5] = 0.0  # a zero row: never projected on
    rng = np.random.default_rng(1)
    orders = [list(rng.permutation([j for j in range(40) if j != i])) for i in range(40)]
    gramian = (matrix @ matrix.T).numpy()
    expected = pcgrad_weights(gramian, orders)
    monkeypatch.setattr(pcgrad, "_IN_PLACE_MIN_ROWS", 2)
    weights = pcgrad_weights(gramian, orders)
    np.testing.assert_array_equal(weights, expected)
    torch.testing.assert_close(torch.from_numpy(weights) @ matrix, _direct_pcgrad(matrix, orders))
