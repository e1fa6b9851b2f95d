"""Aggregators of the user's own, made available by name with ``register_aggregator``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from hf_jd.aggregation import (
    Aggregator,
    GramianWeightedAggregator,
    UPGradWeighting,
    Weighting,
    available_aggregators,
    available_weightings,
    canonical_name,
    get_aggregator,
    get_aggregator_class,
    get_weighting,
    get_weighting_class,
    is_gramian_based,
    register_aggregator,
    unregister_aggregator,
)


class InverseNorm(Weighting):
    """Weights each row by the inverse of its norm, divided by the number of rows."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps

    def compute(self, gramian: Tensor) -> Tensor:
        return 1 / (gramian.diagonal().sqrt() + self.eps) / gramian.shape[0]


class FirstRow(Aggregator):
    """Returns the first row, scaled (not Gramian-based)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def aggregate(self, matrix: Tensor) -> Tensor:
        return self.scale * matrix[0]


class LooseUPGrad(GramianWeightedAggregator):
    """UPGrad with a regularisation of the user's choice: Gramian-based through its base class."""

    def __init__(self, reg_eps: float = 1e-2) -> None:
        super().__init__(UPGradWeighting(reg_eps=reg_eps))


class ScaledUPGrad(GramianWeightedAggregator):
    """UPGrad times a factor: its own aggregate, so the weights alone do not give its update."""

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__(UPGradWeighting())
        self.factor = factor

    def aggregate(self, matrix: Tensor) -> Tensor:
        return self.factor * super().aggregate(matrix)


@pytest.fixture(autouse=True)
def _clean_registry() -> Iterator[None]:
    yield
    for name in ["inverse_norm", "first_row", "loose_upgrad", "scaled_upgrad", "both"]:
        if name in available_aggregators():
            unregister_aggregator(name)


MATRIX = torch.tensor([[3.0, 4.0], [0.0, 2.0]])


def test_a_weighting_registered_alone_builds_its_gramian_aggregator() -> None:
    register_aggregator("Inverse-Norm", weighting=InverseNorm)
    assert "inverse_norm" in available_aggregators() and "inverse_norm" in available_weightings()
    assert canonical_name(" INVERSE-norm ") == "inverse_norm"
    assert is_gramian_based("inverse_norm")
    aggregator = get_aggregator("inverse_norm", eps=0.0)
    assert isinstance(aggregator, GramianWeightedAggregator) and isinstance(aggregator.weighting, InverseNorm)
    assert get_aggregator_class("inverse_norm") is GramianWeightedAggregator
    assert get_weighting_class("inverse_norm") is InverseNorm
    torch.testing.assert_close(aggregator(MATRIX), torch.tensor([0.3, 0.9]))  # (3, 4) / 5 / 2 + (0, 2) / 2 / 2
    torch.testing.assert_close(get_weighting("inverse_norm", eps=0.0)(MATRIX @ MATRIX.T), torch.tensor([0.1, 0.25]))
    with pytest.raises(TypeError, match=r"'bogus'.*weighting 'inverse_norm'.*Valid keywords: eps"):
        get_aggregator("inverse_norm", bogus=1)


def test_an_aggregator_registered_alone() -> None:
    register_aggregator("first_row", FirstRow)
    assert "first_row" in available_aggregators() and "first_row" not in available_weightings()
    assert not is_gramian_based("first_row")
    torch.testing.assert_close(get_aggregator("first_row", scale=2.0)(MATRIX), torch.tensor([6.0, 8.0]))
    with pytest.raises(TypeError, match=r"needs the keyword argument\(s\) 'scale'"):
        get_aggregator("first_row")
    with pytest.raises(ValueError, match="has no weighting"):
        get_weighting("first_row")


def test_a_gramian_weighted_subclass_counts_as_gramian_based_unless_it_aggregates_otherwise() -> None:
    register_aggregator("loose_upgrad", LooseUPGrad)
    register_aggregator("scaled_upgrad", ScaledUPGrad)
    assert is_gramian_based("loose_upgrad") and not is_gramian_based("scaled_upgrad")
    expected = get_aggregator("upgrad", reg_eps=0.5)(MATRIX)
    torch.testing.assert_close(get_aggregator("loose_upgrad", reg_eps=0.5)(MATRIX), expected)
    expected = 3.0 * get_aggregator("upgrad")(MATRIX)
    torch.testing.assert_close(get_aggregator("scaled_upgrad", factor=3.0)(MATRIX), expected)


def test_registering_again_replaces_and_unregistering_removes() -> None:
    register_aggregator("both", FirstRow)
    register_aggregator("both", weighting=InverseNorm)
    assert is_gramian_based("both")
    unregister_aggregator("both")
    assert "both" not in available_aggregators()
    with pytest.raises(ValueError, match="Unknown aggregator 'both'.*register_aggregator"):
        get_aggregator("both")
    with pytest.raises(ValueError, match="No aggregator was registered under 'both'"):
        unregister_aggregator("both")


def test_bad_registrations_are_rejected() -> None:
    with pytest.raises(ValueError, match="built-in aggregator"):
        register_aggregator("UPGrad", FirstRow)
    with pytest.raises(ValueError, match="built-in one, which cannot be removed"):
        unregister_aggregator("upgrad")
    with pytest.raises(ValueError, match="must not be empty"):
        register_aggregator("  ", FirstRow)
    with pytest.raises(TypeError, match="string"):
        register_aggregator(3, FirstRow)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs the aggregator class, the weighting class, or both"):
        register_aggregator("first_row")
    with pytest.raises(TypeError, match=r"subclass of hf_jd\.aggregation\.Weighting .*got an instance of InverseNorm"):
        register_aggregator("inverse_norm", weighting=InverseNorm())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"aggregator must be a subclass of hf_jd\.aggregation\.Aggregator"):
        register_aggregator("inverse_norm", InverseNorm)  # type: ignore[arg-type]
    assert "first_row" not in available_aggregators() and "inverse_norm" not in available_aggregators()
