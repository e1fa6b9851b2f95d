"""Argument types shared by the benchmark scripts: ``type=`` functions for argparse that reject out-of-range values.

A script run as ``python benchmarks/bench_x.py`` has this folder on ``sys.path``, so it imports them as
``from _cli import positive_int``. Each function raises :class:`argparse.ArgumentTypeError`, which argparse reports as
``error: argument --repeats: must be a positive integer, got 0`` (with the usage line, exit status 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _bounded_int(text: str, description: str, minimum: int, maximum: int | None = None) -> int:
    """``text`` as an integer from ``minimum`` to ``maximum`` (no upper bound if None), or an
    :class:`argparse.ArgumentTypeError` saying what was expected (``description``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"must be {description}, got {value}")
    return value


def _bounded_float(text: str, description: str, strictly_positive: bool) -> float:
    """``text`` as a finite float ``> 0`` (``strictly_positive``) or ``>= 0``, or an :class:`argparse.ArgumentTypeError`
    saying what was expected (``description``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (strictly_positive and value == 0):
        raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer ``>= 1`` (a count of repeats, steps, a size).

    Parameters
    ----------
    text : str
        The command-line value.

    Returns
    -------
    int
        The value.

    Raises
    ------
    argparse.ArgumentTypeError
        If ``text`` is not an integer or is below 1.
    """
    return _bounded_int(text, "a positive integer", 1)


def non_negative_int(text: str) -> int:
    """An integer ``>= 0`` (a count where 0 is meaningful, e.g. warm-up calls).

    Parameters
    ----------
    text : str
        The command-line value.

    Returns
    -------
    int
        The value.

    Raises
    ------
    argparse.ArgumentTypeError
        If ``text`` is not an integer or is negative.
    """
    return _bounded_int(text, "a non-negative integer", 0)


def int_in_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A type function accepting the integers from ``minimum`` to ``maximum`` (inclusive; no upper bound if None).

    Parameters
    ----------
    minimum : int
        The smallest value accepted.
    maximum : int or None, default None
        The largest value accepted, or None for no upper bound.

    Returns
    -------
    Callable[[str], int]
        The type function, raising :class:`argparse.ArgumentTypeError` for an out-of-range or non-integer value.
    """
    if maximum is not None and maximum < minimum:
        raise ValueError(f"empty range: minimum {minimum} > maximum {maximum}")
    description = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def integer(text: str) -> int:
        return _bounded_int(text, description, minimum, maximum)

    integer.__name__ = f"int_in_range({minimum}, {maximum})"
    return integer


def positive_float(text: str) -> float:
    """A finite number ``> 0`` (a duration in seconds).

    Parameters
    ----------
    text : str
        The command-line value.

    Returns
    -------
    float
        The value.

    Raises
    ------
    argparse.ArgumentTypeError
        If ``text`` is not a finite number or is not above 0.
    """
    return _bounded_float(text, "a positive number", strictly_positive=True)


def non_negative_float(text: str) -> float:
    """A finite number ``>= 0``.

    Parameters
    ----------
    text : str
        The command-line value.

    Returns
    -------
    float
        The value.

    Raises
    ------
    argparse.ArgumentTypeError
        If ``text`` is not a finite number or is negative.
    """
    return _bounded_float(text, "a non-negative number", strictly_positive=False)


def torchjd_skipped(reason: str | BaseException) -> str:
    """The line a benchmark prints when it leaves out its comparison with torchjd (same wording in every script).

    Parameters
    ----------
    reason : str or BaseException
        Why: a phrase, or the error raised by importing torchjd (then worded as "torchjd is not importable").

    Returns
    -------
    str
        The line, e.g. ``torchjd comparison skipped: torchjd is not importable (ModuleNotFoundError: ...)``.
    """
    if isinstance(reason, BaseException):
        reason = f"torchjd is not importable ({type(reason).__name__}: {reason})"
    return f"torchjd comparison skipped: {reason}"
