"""Name-based registry of aggregators and weightings (what ``JDTrainingArguments`` uses).

Each entry maps a lower-case name to the module and class names of its aggregator and, when the
aggregator is Gramian-based, of its weighting. Classes are imported on first use.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, NamedTuple

import torch

from ._base import Aggregator, GramianWeightedAggregator, Weighting, class_updates_weighted_rows

__all__ = [
    "AggregatorSpec",
    "available_aggregators",
    "available_weightings",
    "get_aggregator",
    "get_weighting",
    "get_aggregator_class",
    "get_weighting_class",
    "is_gramian_based",
    "register_aggregator",
    "unregister_aggregator",
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


class _Registered(NamedTuple):
    """An aggregator registered at run time: its class (``None`` for a weighting alone) and its weighting's."""

    aggregator: type[Aggregator] | None
    weighting: type[Weighting] | None


# Aggregators registered with register_aggregator, by normalised name.
_REGISTERED: dict[str, _Registered] = {}


def _key(name: str) -> str:
    """The registry key of ``name``: surrounding spaces dropped, lower case, ``-`` read as ``_``."""
    if not isinstance(name, str):
        raise TypeError(f"An aggregator name must be a string, got {type(name).__name__}.")
    return name.strip().lower().replace("-", "_")


def register_aggregator(
    name: str, aggregator: type[Aggregator] | None = None, *, weighting: type[Weighting] | None = None
) -> None:
    """Make an aggregator of your own available by name, next to the built-in ones: to :func:`get_aggregator`,
    :func:`get_weighting`, and to ``JDTrainingArguments(jd_aggregator=name, jd_aggregator_kwargs=...)`` (whose
    ``jd_engine="auto"`` then picks the autogram engine when it has a weighting).

    Register it before building the arguments, in every process of a multi-process run (at the top of the training
    script), and again before resuming from a checkpoint that names it. Registering a name again replaces the
    earlier registration.

    Parameters
    ----------
    name
        The name (spaces around it are dropped, case is ignored and ``-`` reads as ``_``); not a built-in one.
    aggregator
        An :class:`Aggregator` subclass, built with the keyword arguments given by name (``jd_aggregator_kwargs``).
        A subclass of :class:`GramianWeightedAggregator` that does not override ``aggregate`` or ``__call__`` counts
        as Gramian-based (its update is the rows weighted by its weighting: usable by the autogram engine).
    weighting
        A :class:`Weighting` subclass (Gramian → weights), built with those keyword arguments. Given alone, the
        aggregator is ``GramianWeightedAggregator(weighting(**kwargs))``.

    Raises
    ------
    TypeError
        If ``name`` is not a string, neither class is given, or one is not a subclass of the expected base (a class,
        not an instance).
    ValueError
        If ``name`` is empty or the name of a built-in aggregator.

    Examples
    --------
    >>> import torch
    >>> from hf_jd.aggregation import Weighting, get_aggregator, register_aggregator, unregister_aggregator
    >>> class InverseNorm(Weighting):
    ...     \"\"\"Weights each loss by the inverse norm of its gradient.\"\"\"
    ...     def __init__(self, eps: float = 1e-8) -> None:
    ...         self.eps = eps
    ...     def compute(self, gramian: torch.Tensor) -> torch.Tensor:
    ...         return 1 / (gramian.diagonal().sqrt() + self.eps) / gramian.shape[0]
    >>> register_aggregator("inverse_norm", weighting=InverseNorm)
    >>> get_aggregator("inverse_norm", eps=0.0)(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    tensor([0.3000, 0.9000])
    >>> unregister_aggregator("inverse_norm")
    """
    key = _key(name)
    if not key:
        raise ValueError("An aggregator name must not be empty.")
    if key in REGISTRY:
        raise ValueError(
            f"{name!r} is the name of a built-in aggregator of hf_jd: register yours under another name."
        )
    if aggregator is None and weighting is None:
        raise TypeError(f"register_aggregator({name!r}) needs the aggregator class, the weighting class, or both.")
    for given, base, keyword in ((aggregator, Aggregator, "aggregator"), (weighting, Weighting, "weighting")):
        if given is not None and not (isinstance(given, type) and issubclass(given, base)):
            what = f"an instance of {type(given).__name__}" if not isinstance(given, type) else repr(given)
            raise TypeError(
                f"register_aggregator's {keyword} must be a subclass of hf_jd.aggregation.{base.__name__} (the class: "
                f"it is built with the keyword arguments given by name), got {what}."
            )
    _REGISTERED[key] = _Registered(aggregator, weighting)


def unregister_aggregator(name: str) -> None:
    """Remove an aggregator registered with :func:`register_aggregator`.

    Parameters
    ----------
    name
        Its name.

    Raises
    ------
    ValueError
        If no aggregator was registered under ``name`` (built-in ones cannot be removed).
    """
    key = _key(name)
    if key not in _REGISTERED:
        raise ValueError(
            f"No aggregator was registered under {name!r}"
            + (" (it is a built-in one, which cannot be removed)." if key in REGISTRY else ".")
        )
    del _REGISTERED[key]


def available_aggregators() -> list[str]:
    """Return the names of the aggregators, built-in and registered, sorted.

    Returns
    -------
    list of str
        The names accepted by :func:`get_aggregator`.
    """
    return sorted({*REGISTRY, *_REGISTERED})


def available_weightings() -> list[str]:
    """Return the names of the aggregators that have a Gramian weighting, sorted.

    Returns
    -------
    list of str
        The names accepted by :func:`get_weighting`.
    """
    registered = (name for name, entry in _REGISTERED.items() if entry.weighting is not None)
    return sorted({*(name for name, spec in REGISTRY.items() if spec.weighting is not None), *registered})


def _entry(name: str) -> _Registered:
    """The aggregator and weighting classes of ``name`` (built-in ones imported on first use)."""
    key = _key(name)
    if key in _REGISTERED:
        return _REGISTERED[key]
    if key not in REGISTRY:
        raise ValueError(
            f"Unknown aggregator {name!r}. Valid names are: {', '.join(available_aggregators())}. (An aggregator "
            "of your own takes a name with hf_jd.aggregation.register_aggregator.)"
        )
    spec = REGISTRY[key]
    weighting = None if spec.weighting is None else _load(spec.module, spec.weighting)
    return _Registered(_load(spec.module, spec.aggregator), weighting)


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
    _entry(name)  # (raises for a non-string or unknown name)
    return _key(name)


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
    entry = _entry(name)
    if entry.aggregator is None:  # (a weighting registered alone)
        return True
    return entry.weighting is not None if _key(name) in REGISTRY else class_updates_weighted_rows(entry.aggregator)


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
    entry = _entry(name)
    return GramianWeightedAggregator if entry.aggregator is None else entry.aggregator


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
    entry = _entry(name)
    if entry.weighting is None:
        raise ValueError(
            f"Aggregator {name!r} has no weighting (it is not Gramian-based, or was registered without its "
            f"weighting class). Aggregators with a weighting: {', '.join(available_weightings())}."
        )
    return entry.weighting


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
    entry = _entry(name)
    if entry.aggregator is None:  # (a weighting registered alone)
        assert entry.weighting is not None
        return GramianWeightedAggregator(_instantiate(entry.weighting, name, kwargs))
    return _instantiate(entry.aggregator, name, kwargs)


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
