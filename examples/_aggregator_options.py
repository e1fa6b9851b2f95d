"""Command-line options that name an aggregator, shared by the examples.

An example run as ``python examples/<name>.py`` has this folder on ``sys.path`` and imports these helpers as
``from _aggregator_options import ...``. Each helper raises :class:`ValueError` with a message that names the option
(``--aggregator``, ``--baseline_kwargs``, ...), so that a wrong value fails before any data is made or any step runs.
"""

from __future__ import annotations

import json
from typing import Any

from hf_jd.aggregation import available_aggregators, canonical_name, check_fits_rows, get_aggregator


def canonical_aggregator(name: str, flag: str = "aggregator") -> str:
    """Return the registry name of the aggregator given with ``--{flag}``, written in any case.

    :func:`hf_jd.aggregation.canonical_name` reads it (surrounding spaces dropped, lower case, ``-`` read as
    ``_``), so that ``--aggregator UPGrad`` means ``upgrad``.

    Parameters
    ----------
    name
        The name given on the command line.
    flag
        The option that gave it, for the error message.

    Returns
    -------
    str
        The name as listed by :func:`hf_jd.aggregation.available_aggregators`.

    Raises
    ------
    ValueError
        If no aggregator has that name.
    """
    try:
        return canonical_name(name)
    except ValueError:
        names = ", ".join(available_aggregators())
        raise ValueError(f"Unknown --{flag} {name!r}: choose one of {names} (any case).") from None


def aggregator_kwargs(text: str | None, flag: str = "aggregator") -> dict[str, Any]:
    """The keyword arguments given as a JSON object by ``--{flag}_kwargs`` (``{}`` when not given).

    Parameters
    ----------
    text
        The option's value.
    flag
        The aggregator option whose keyword arguments these are, for the error message.

    Returns
    -------
    dict
        The keyword arguments.

    Raises
    ------
    ValueError
        If ``text`` is not valid JSON or not a JSON object.
    """
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--{flag}_kwargs is not valid JSON ({error}): give an object, e.g. '{{\"n_byzantine\": 0}}'."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"--{flag}_kwargs must be a JSON object (keyword -> value), got {text!r}.")
    return value


def check_aggregator(name: str, kwargs: dict[str, Any], rows: int, rows_are: str, flag: str = "aggregator") -> None:
    """Build the aggregator of ``--{flag}`` and aggregate a random Jacobian of ``rows`` rows, before any training.

    Some keyword arguments only fail on a Jacobian of the wrong height (Krum's ``n_byzantine``, Constant's
    ``weights``), which would otherwise stop the run at its first step.

    Parameters
    ----------
    name
        A registry name of an aggregator.
    kwargs
        The keyword arguments given with ``--{flag}_kwargs``.
    rows
        Rows of the Jacobian of every step.
    rows_are
        What the rows are, for the error message (``"the 3 task losses of this run"``).
    flag
        The aggregator option, for the error message.

    Raises
    ------
    ValueError
        If the aggregator cannot be built with ``kwargs`` or cannot aggregate ``rows`` rows.
    """
    try:
        aggregator = get_aggregator(name, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"--{flag} {name!r} cannot be built with --{flag}_kwargs {kwargs}: {str(error).rstrip('.')}. Give its "
            f"keyword arguments with --{flag}_kwargs (JSON); each step aggregates {rows_are}."
        ) from None
    try:
        check_fits_rows(aggregator, rows)
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"--{flag} {name!r} with --{flag}_kwargs {kwargs} cannot aggregate {rows_are}: "
            f"{str(error).rstrip('.')}. Change --{flag}_kwargs (or the aggregator)."
        ) from None
