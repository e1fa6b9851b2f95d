"""Packaging facts a user relies on: the version and the PEP 561 typing marker."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import hf_jd


def test_version_matches_pyproject() -> None:
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE)
    assert version is not None
    assert hf_jd.__version__ == version.group(1)


def test_typing_marker_is_shipped() -> None:
    """Type checkers only read the annotations of an installed package that has ``py.typed``."""
    assert importlib.resources.files("hf_jd").joinpath("py.typed").is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'hf_jd = ["py.typed"]' in pyproject
