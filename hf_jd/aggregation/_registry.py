"""Name-based registry of aggregators and weightings (what ``JDTrainingArguments`` uses).

Each entry maps a lower-case name to the module and class names of its aggregator and, when the
aggregator is Gramian-based, of its weighting. Classes are imported on first use.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, NamedTuple

import torch

from ._base import Aggregator, Weighting

__all__ = [
    "AggregatorSpec",
    "available_aggregators",
    "available_weightings",
    "get_aggregator",
    "get_weighting",
    "get_aggregator_class",
    "get_weighting_class",
    "is_gramian_based",
    "REGISTRY",
]


class AggregatorSpec(NamedTuple):
    """Where an aggregator (and its weighting, if any) is defined."""

    module: str
    aggregator: str
    weighting: str | None


REGISTRY: dict[str, AggregatorSpec] = {
    "upgrad": AggregatorSpec("upgrad", "UPGrad", "UPGradWeighting"),
    "dualproj": AggregatorSpec("dualproj", "DualProj", "DualProjWeighting"),
    "mgda": AggregatorSpec("mgda", "MGDA", "MGDAWeighting"),
    "cagrad": AggregatorSpec("cagrad", "CAGrad", "CAGradWeighting"),
    "pcgrad": AggregatorSpec("pcgrad", "PCGrad", "PCGradWeighting"),
    "gradvac": AggregatorSpec("gradvac", "GradVac", "GradVacWeighting"),
    "imtl_g": AggregatorSpec("imtl_g", "IMTLG", "IMTLGWeighting"),
    "aligned_mtl": AggregatorSpec("aligned_mtl", "AlignedMTL", "AlignedMTLWeighting"),
    "nash_mtl": AggregatorSpec("nash_mtl", "NashMTL", "NashMTLWeighting"),
    "config": AggregatorSpec("config", "ConFIG", "ConFIGWeighting"),
    "graddrop": AggregatorSpec("graddrop", "GradDrop", None),
    "fairgrad": AggregatorSpec("fairgrad", "FairGrad", "FairGradWeighting"),
    "krum": AggregatorSpec("krum", "Krum", "KrumWeighting"),
    "trimmed_mean": AggregatorSpec("trimmed_mean", "TrimmedMean", None),
    "mean": AggregatorSpec("basic", "Mean", "MeanWeighting"),
    "sum": AggregatorSpec("basic", "Sum", "SumWeighting"),
    "constant": AggregatorSpec("basic", "Constant", "ConstantWeighting"),
    "random": AggregatorSpec("basic", "Random", "RandomWeighting"),
}


def available_aggregators() -> list[str]:
    """Return the registered aggregator names, sorted.

    Returns
    -------
    list of str
        The names accepted by :func:`get_aggregator`.
    """
    return sorted(REGISTRY)


def available_weightings() -> list[str]:
    """Return the names of the aggregators that have a Gramian weighting, sorted.

    Returns
    -------
    list of str
        The names accepted by :func:`get_weighting`.
    """
    return sorted(name for name, spec in REGISTRY.items() if spec.weighting is not None)


def _spec(name: str) -> AggregatorSpec:
    if not isinstance(name, str):
        raise TypeError(f"An aggregator name must be a string, got {type(name).__name__}.")
    key = name.strip().lower().replace("-", "_")
    if key not in REGISTRY:
        raise ValueError(
            f"Unknown aggregator {name!r}. Valid names are: {', '.join(available_aggregators())}."
        )
    return REGISTRY[key]


def canonical_name(name: str) -> str:
    """The registry name of an aggregator written in any case (``"UPGrad"``, ``" Nash-MTL"``).

    Parameters
    ----------
    name
        An aggregator name: surrounding spaces are dropped, case is ignored and ``-`` reads as ``_``.

    Returns
    -------
    str
        The name as :func:`available_aggregators` lists it.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If no aggregator has that name (the message lists the valid names).
    """
    _spec(name)  # (raises for a non-string or unknown name)
    return name.strip().lower().replace("-", "_")


def check_fits_rows(aggregator: Aggregator, num_rows: int) -> None:
    """Aggregate a random Jacobian of ``num_rows`` rows, to find before training an aggregator whose arguments
    need another number of rows (``Constant``'s weights, a preference vector, ``Krum``'s ``n_byzantine``).

    The global random state is left as it was (a random aggregator draws from it).

    Parameters
    ----------
    aggregator
        The aggregator (a fresh one: a stateful aggregator's state moves on).
    num_rows
        The number of rows of the Jacobians it will aggregate.

    Raises
    ------
    ValueError
        The aggregator's own error, when it cannot aggregate ``num_rows`` rows.
    """
    with torch.random.fork_rng(devices=[]):
        aggregator(torch.randn(num_rows, 4, generator=torch.Generator().manual_seed(0)))


def _load(module: str, attribute: str) -> type:
    return getattr(importlib.import_module(f"hf_jd.aggregation.{module}"), attribute)


def is_gramian_based(name: str) -> bool:
    """Whether the named aggregator's weights depend only on the Gramian.

    Parameters
    ----------
    name
        A registered aggregator name.

    Returns
    -------
    bool
        ``True`` when the aggregator has a weighting (usable with the autogram engine).

    Raises
    ------
    ValueError
        If ``name`` is not registered.
    """
    return _spec(name).weighting is not None


def get_aggregator_class(name: str) -> type[Aggregator]:
    """Return the aggregator class registered under ``name``.

    Parameters
    ----------
    name
        A registered aggregator name.

    Returns
    -------
    type
        The :class:`Aggregator` subclass.

    Raises
    ------
    ValueError
        If ``name`` is not registered.
    """
    spec = _spec(name)
    return _load(spec.module, spec.aggregator)


def get_weighting_class(name: str) -> type[Weighting]:
    """Return the weighting class registered under ``name`` (Gramian-based aggregators only).

    Parameters
    ----------
    name
        A registered aggregator name.

    Returns
    -------
    type
        The :class:`Weighting` subclass.

    Raises
    ------
    ValueError
        If ``name`` is not registered or the aggregator is not Gramian-based.
    """
    spec = _spec(name)
    if spec.weighting is None:
        raise ValueError(
            f"Aggregator {name!r} is not Gramian-based, so it has no weighting and cannot be used "
            f"with the autogram engine. Gramian-based aggregators: {', '.join(available_weightings())}."
        )
    return _load(spec.module, spec.weighting)


def _kind_of(cls: type[Aggregator] | type[Weighting]) -> str:
    return "weighting" if issubclass(cls, Weighting) else "aggregator"


def _instantiate(cls: type[Aggregator] | type[Weighting], name: str, kwargs: dict[str, Any]) -> Any:
    # (a class without an __init__ of its own takes no argument: object.__init__'s signature says *args, **kwargs)
    parameters = {} if cls.__init__ is object.__init__ else inspect.signature(cls.__init__).parameters
    accepts_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not accepts_var_kwargs:
        valid = [p for p in parameters if p != "self"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(
                f"Unknown keyword argument(s) {', '.join(map(repr, unknown))} for {_kind_of(cls)} "
                f"{name!r}. Valid keywords: {', '.join(valid) if valid else '(none)'}."
            )
    required = [
        p.name
        for p in parameters.values()
        if p.name != "self"
        and p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    missing = [parameter for parameter in required if parameter not in kwargs]
    if missing:
        raise TypeError(
            f"The {_kind_of(cls)} {name!r} needs the keyword argument(s) {', '.join(map(repr, missing))} (no default), "
            f"e.g. get_{'aggregator' if issubclass(cls, Aggregator) else 'weighting'}({name!r}, "
            f"{', '.join(f'{parameter}=...' for parameter in missing)})."
        )
    return cls(**kwargs)


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Build the aggregator registered under ``name`` with the given constructor arguments.

    Parameters
    ----------
    name
        A registered aggregator name (see :func:`available_aggregators`).
    **kwargs
        Keyword arguments of the aggregator's constructor.

    Returns
    -------
    Aggregator
        The new aggregator.

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the valid names).
    TypeError
        If a keyword argument is not accepted by the aggregator (the message names it).
    """
    return _instantiate(get_aggregator_class(name), name, kwargs)


def get_weighting(name: str, **kwargs: Any) -> Weighting:
    """Build the weighting of the Gramian-based aggregator registered under ``name``.

    Parameters
    ----------
    name
        A registered Gramian-based aggregator name (see :func:`available_weightings`).
    **kwargs
        Keyword arguments of the weighting's constructor.

    Returns
    -------
    Weighting
        The new weighting.

    Raises
    ------
    ValueError
        If ``name`` is not registered or the aggregator is not Gramian-based.
    TypeError
        If a keyword argument is not accepted by the weighting (the message names it).
    """
    return _instantiate(get_weighting_class(name), name, kwargs)
