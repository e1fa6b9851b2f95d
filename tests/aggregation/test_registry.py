"""Tests of the name-based registry: every registered aggregator and weighting builds."""

from __future__ import annotations

import pytest

import hf_jd.aggregation as aggregation
from hf_jd.aggregation import (
    Aggregator,
    GramianWeightedAggregator,
    Weighting,
    available_aggregators,
    available_weightings,
    get_aggregator,
    get_aggregator_class,
    get_weighting,
    get_weighting_class,
    is_gramian_based,
)

from _aggregation_references import CONSTRUCTOR_DEFAULTS

NAMES = available_aggregators()


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds(name: str) -> None:
    aggregator = get_aggregator(name, **CONSTRUCTOR_DEFAULTS.get(name, {}))
    assert isinstance(aggregator, Aggregator)
    assert isinstance(aggregator, get_aggregator_class(name))
    assert isinstance(aggregator, GramianWeightedAggregator) == is_gramian_based(name)
    assert repr(aggregator).startswith(type(aggregator).__name__ + "(")
    # The lazy package attribute is the same class.
    assert getattr(aggregation, type(aggregator).__name__) is type(aggregator)


@pytest.mark.parametrize("name", available_weightings())
def test_every_weighting_builds_and_matches_its_aggregator(name: str) -> None:
    kwargs = CONSTRUCTOR_DEFAULTS.get(name, {})
    weighting = get_weighting(name, **kwargs)
    assert isinstance(weighting, Weighting)
    assert type(weighting) is get_weighting_class(name)
    aggregator = get_aggregator(name, **kwargs)
    assert isinstance(aggregator, GramianWeightedAggregator)
    assert type(aggregator.weighting) is type(weighting)


def test_names_are_normalised() -> None:
    assert type(get_aggregator("UPGrad")).__name__ == "UPGrad"
    assert type(get_aggregator(" imtl-g ")).__name__ == "IMTLG"


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown aggregator 'nope'") as info:
        get_aggregator("nope")
    for name in NAMES:
        assert name in str(info.value)


def test_non_string_name() -> None:
    with pytest.raises(TypeError, match="string"):
        get_aggregator(3)  # type: ignore[arg-type]


def test_bad_keyword_is_named() -> None:
    with pytest.raises(TypeError, match=r"'bogus'.*upgrad.*pref_vector, norm_eps, reg_eps"):
        get_aggregator("upgrad", bogus=1)
    with pytest.raises(TypeError, match="'bogus' for weighting 'mgda'"):
        get_weighting("mgda", bogus=1)


@pytest.mark.parametrize("name", ["UPGrad", "DualProj"])
def test_a_misspelt_constructor_argument_is_reported_for_the_class_itself(name: str) -> None:
    # (they share their base class's constructor arguments; Python names the class whose __init__ ran)
    with pytest.raises(TypeError, match=rf"^{name}\.__init__\(\) got an unexpected keyword argument 'reg_epss'"):
        getattr(aggregation, name)(reg_epss=0)


@pytest.mark.parametrize("name", ["imtl_g", "mean", "sum"])
def test_bad_keyword_of_a_weighting_without_arguments_is_named(name: str) -> None:
    # (their classes have no __init__ of their own: object's signature takes *args, **kwargs)
    with pytest.raises(TypeError, match=rf"'bogus'.*{name}.*Valid keywords: \(none\)"):
        get_weighting(name, bogus=1)


def test_weighting_of_non_gramian_aggregator() -> None:
    with pytest.raises(ValueError, match="not Gramian-based"):
        get_weighting("trimmed_mean")


def test_my_aggregators_are_registered() -> None:
    for name in ["upgrad", "dualproj", "mgda", "mean", "sum", "constant", "random", "krum", "trimmed_mean"]:
        assert name in NAMES


@pytest.mark.parametrize(("written", "name"), [("UPGrad", "upgrad"), (" Nash-MTL ", "nash_mtl"), ("imtl_g", "imtl_g")])
def test_canonical_name_reads_names_as_the_registry_does(written: str, name: str) -> None:
    assert aggregation.canonical_name(written) == name
    assert type(get_aggregator(written)) is type(get_aggregator(name))


def test_canonical_name_of_an_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="Unknown aggregator 'nope'. Valid names are: .*upgrad"):
        aggregation.canonical_name("nope")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("constant", {"weights": [0.5, 0.5, 0.0]}),
        ("upgrad", {"pref_vector": [1.0, 2.0, 3.0]}),
        ("krum", {"n_byzantine": 1}),
    ],
)
def test_check_fits_rows_finds_arguments_made_for_another_number_of_rows(name: str, kwargs: dict) -> None:
    aggregator = get_aggregator(name, **kwargs)
    with pytest.raises(ValueError):
        aggregation.check_fits_rows(aggregator, 2)
    aggregation.check_fits_rows(get_aggregator(name, **kwargs), 3 if name != "krum" else 5)



@pytest.mark.parametrize(("name", "keyword"), [("krum", "n_byzantine"), ("trimmed_mean", "trim_number")])
def test_a_missing_required_argument_is_named(name: str, keyword: str) -> None:
    """Krum and TrimmedMean have a required argument: its absence is named with an example call, not Python's raw
    "missing positional argument"."""
    from hf_jd.aggregation import get_aggregator

    with pytest.raises(TypeError, match=rf"needs the keyword argument\(s\) '{keyword}'.*get_aggregator\('{name}', "):
        get_aggregator(name)
