"""Weightings (Gramian → weights) and aggregators (Jacobian → update vector).

Every aggregator class and its weighting are importable from here, e.g.
``from hf_jd.aggregation import UPGrad, UPGradWeighting``; ``get_aggregator("upgrad")`` builds
one by name.
"""

from __future__ import annotations

from typing import Any

from ._base import Aggregator, GramianWeightedAggregator, Weighting, check_gramian, check_matrix
from ._registry import (
    REGISTRY,
    available_aggregators,
    available_weightings,
    canonical_name,
    check_fits_rows,
    get_aggregator,
    get_aggregator_class,
    get_weighting,
    get_weighting_class,
    is_gramian_based,
    register_aggregator,
    unregister_aggregator,
)

_LAZY: dict[str, tuple[str, str]] = {}
for _spec in REGISTRY.values():
    _LAZY[_spec.aggregator] = (_spec.module, _spec.aggregator)
    if _spec.weighting is not None:
        _LAZY[_spec.weighting] = (_spec.module, _spec.weighting)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Aggregator",
    "GramianWeightedAggregator",
    "Weighting",
    "check_gramian",
    "check_matrix",
    "available_aggregators",
    "available_weightings",
    "canonical_name",
    "check_fits_rows",
    "get_aggregator",
    "get_aggregator_class",
    "get_weighting",
    "get_weighting_class",
    "is_gramian_based",
    "register_aggregator",
    "unregister_aggregator",
    *sorted(_LAZY),
]
