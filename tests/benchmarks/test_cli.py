"""Command lines of the benchmark scripts: out-of-range values are rejected by argparse, with the option named.

Every test builds parsers only (no benchmark runs). The scripts are imported by path, with ``benchmarks/`` on
``sys.path`` for the duration of a test, as when they run as ``python benchmarks/bench_x.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("bench_*.py"))

Loader = Callable[[str], ModuleType]


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Iterator[Loader]:
    """Import a module of ``benchmarks/`` by path (``benchmarks/`` on ``sys.path`` meanwhile, for its sibling
    imports); the modules imported from there are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = set(sys.modules)

    def load_module(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    yield load_module
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None)
        if file is not None and Path(file).resolve().parent == BENCHMARKS:
            del sys.modules[name]


def _rejects(parse: Callable[[list[str]], Any], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Parse ``argv``, expect argparse's usage error (exit status 2) and return what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------- _cli


def test_positive_int_boundaries(load: Loader) -> None:
    cli = load("_cli")
    assert cli.positive_int("1") == 1
    assert cli.positive_int("250") == 250
    for text, shown in [("0", "got 0"), ("-2", "got -2"), ("abc", "got 'abc'"), ("1.5", "got '1.5'"), ("", "got ''")]:
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer") as error:
            cli.positive_int(text)
        assert shown in str(error.value)


def test_non_negative_int_boundaries(load: Loader) -> None:
    cli = load("_cli")
    assert cli.non_negative_int("0") == 0
    assert cli.non_negative_int("3") == 3
    for text in ("-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a non-negative integer"):
            cli.non_negative_int(text)


def test_int_in_range_boundaries(load: Loader) -> None:
    cli = load("_cli")
    at_least_two = cli.int_in_range(2)
    assert at_least_two("2") == 2
    assert at_least_two("100000") == 100000
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 2, got 1"):
        at_least_two("1")
    length = cli.int_in_range(1, 128)
    assert length("1") == 1
    assert length("128") == 128
    for text in ("0", "129", "ten"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer from 1 to 128"):
            length(text)
    with pytest.raises(ValueError, match="empty range"):
        cli.int_in_range(3, 2)


def test_positive_float_boundaries(load: Loader) -> None:
    cli = load("_cli")
    assert cli.positive_float("0.001") == 0.001
    assert cli.positive_float("180") == 180.0
    for text in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive number"):
            cli.positive_float(text)


def test_non_negative_float_boundaries(load: Loader) -> None:
    cli = load("_cli")
    assert cli.non_negative_float("0") == 0.0
    assert cli.non_negative_float("20.5") == 20.5
    for text in ("-0.1", "-inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a non-negative number"):
            cli.non_negative_float(text)


def test_type_error_names_the_option(load: Loader, capsys: pytest.CaptureFixture[str]) -> None:
    cli = load("_cli")
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=cli.positive_int, default=3)
    err = _rejects(parser.parse_args, ["--repeats", "0"], capsys)
    assert "argument --repeats: must be a positive integer, got 0" in err


def test_torchjd_skipped_wording(load: Loader) -> None:
    cli = load("_cli")
    line = cli.torchjd_skipped(ModuleNotFoundError("No module named 'torchjd'"))
    expected = "torchjd comparison skipped: torchjd is not importable (ModuleNotFoundError: No module named 'torchjd')"
    assert line == expected
    assert cli.torchjd_skipped("disabled by --no-torchjd") == "torchjd comparison skipped: disabled by --no-torchjd"


# ---------------------------------------------------------------------------- every script


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_parse(script: str, load: Loader) -> None:
    module = load(script)
    assert isinstance(module.build_parser(), argparse.ArgumentParser)
    assert isinstance(module.parse_args([]), argparse.Namespace)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_numeric_option_is_unchecked(script: str, load: Loader) -> None:
    """A plain ``type=int`` or ``type=float`` accepts 0 and negative values: every numeric option has a checking
    type function instead."""
    parser = load(script).build_parser()
    unchecked = [action.option_strings for action in parser._actions if action.type in (int, float)]
    assert not unchecked, f"{script}: options with an unchecked numeric type: {unchecked}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_description_is_whole_sentences(script: str, load: Loader) -> None:
    description = load(script).build_parser().description
    assert description is not None
    assert description.rstrip().endswith("."), f"{script}: --help's description ends mid-sentence: {description!r}"


BAD_VALUES = [
    ("bench_aggregation", ["--repeats", "0"], "--repeats"),
    ("bench_aggregation", ["--torchjd-repeats", "0"], "--torchjd-repeats"),
    ("bench_aggregation", ["--sizes", "0"], "--sizes"),
    ("bench_aggregation", ["--sizes", "-2"], "--sizes"),
    ("bench_aggregation", ["--sizes", "8", "0"], "--sizes"),
    ("bench_aggregation", ["--threads", "0"], "--threads"),
    ("bench_aggregation", ["--n", "0"], "--n"),
    ("bench_aggregation", ["--budget", "-1"], "--budget"),
    ("bench_aggregation", ["--budget", "nan"], "--budget"),
    ("bench_autogram", ["--repeats", "0"], "--repeats"),
    ("bench_autogram", ["--warmup", "-1"], "--warmup"),
    ("bench_autogram", ["--threads", "0"], "--threads"),
    ("bench_autogram", ["--vocab", "1"], "--vocab"),
    ("bench_autogram", ["--lora", "-1"], "--lora"),
    ("bench_autojac", ["--repeats", "0"], "--repeats"),
    ("bench_autojac", ["--warmup", "-1"], "--warmup"),
    ("bench_autojac", ["--batch", "0"], "--batch"),
    ("bench_autojac", ["--length", "0"], "--length"),
    ("bench_autojac", ["--length", "129"], "--length"),
    ("bench_autojac", ["--layers", "0"], "--layers"),
    ("bench_autojac", ["--threads", "0"], "--threads"),
    ("bench_autojac", ["--hidden", "0"], "--hidden"),
    ("bench_autojac", ["--hidden", "100"], "--hidden"),  # 3 heads do not divide it
    ("bench_autojac", ["--chunks", "abc"], "--chunks"),
    ("bench_autojac", ["--chunks", "none,0"], "--chunks"),
    ("bench_autojac", ["--chunks", ""], "--chunks"),
    ("bench_architectures", ["--repeats", "0"], "--repeats"),
    ("bench_architectures", ["--warmup", "-1"], "--warmup"),
    ("bench_checkpointing", ["--batch", "0"], "--batch"),
    ("bench_checkpointing", ["--length", "0"], "--length"),
    ("bench_checkpointing", ["--hidden", "0"], "--hidden"),
    ("bench_checkpointing", ["--hidden", "1"], "--hidden"),  # 2 heads do not divide it
    ("bench_checkpointing", ["--layers", "0"], "--layers"),
    ("bench_checkpointing", ["--vocab", "1"], "--vocab"),
    ("bench_checkpointing", ["--threads", "0"], "--threads"),
    ("bench_coverage", ["--timeout", "0"], "--timeout"),
    ("bench_coverage", ["--timeout", "-5"], "--timeout"),
    ("bench_ddp", ["--steps", "0", "--skip-quality"], "--steps"),
    ("bench_ddp", ["--steps", "-1"], "--steps"),
    ("bench_ddp", ["--batch", "0"], "--batch"),
    ("bench_ddp", ["--length", "0"], "--length"),
    ("bench_ddp", ["--vocab", "1"], "--vocab"),
    ("bench_ddp", ["--quality-repeats", "0", "--steps", "1"], "--quality-repeats"),
    ("bench_ddp", ["--quality-batch", "0"], "--quality-batch"),
    ("bench_ddp", ["--quality-batch", "6"], "--quality-batch"),  # not split into 4 equal parts
    ("bench_ddp", ["--quality-vocab", "1"], "--quality-vocab"),
    ("bench_ddp", ["--quality-length", "0"], "--quality-length"),
]


@pytest.mark.parametrize(("script", "argv", "option"), BAD_VALUES)
def test_bad_value_is_rejected(
    script: str, argv: list[str], option: str, load: Loader, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _rejects(load(script).parse_args, argv, capsys)
    assert option in err
    assert "must be" in err
    assert "Traceback" not in err


GOOD_VALUES = [
    ("bench_aggregation", ["--sizes", "1", "8", "--budget", "0", "--threads", "1", "--n", "1"],
     {"sizes": [1, 8], "budget": 0.0, "threads": 1, "n": 1}),
    ("bench_aggregation", ["--repeats", "1", "--torchjd-repeats", "1"], {"repeats": 1, "torchjd_repeats": 1}),
    ("bench_autogram", ["--repeats", "1", "--warmup", "0", "--lora", "0", "--vocab", "2"],
     {"repeats": 1, "warmup": 0, "lora": 0, "vocab": 2}),
    ("bench_autogram", ["--lora", "16", "--variants", "torchjd"], {"lora": 16, "variants": ["torchjd"]}),
    ("bench_autojac", ["--chunks", "none,4", "--length", "128", "--hidden", "64", "--warmup", "0"],
     {"chunks": [None, 4], "length": 128, "hidden": 64, "warmup": 0}),
    ("bench_autojac", [], {"chunks": [None, 1]}),
    ("bench_autojac", ["--chunks", " NONE , 2 ", "--batch", "1"], {"chunks": [None, 2], "batch": 1}),
    ("bench_architectures", ["--repeats", "1", "--warmup", "0"], {"repeats": 1, "warmup": 0}),
    ("bench_checkpointing", ["--hidden", "128", "--vocab", "2", "--batch", "1"], {"hidden": 128, "vocab": 2}),
    ("bench_coverage", ["--timeout", "0.5", "--models", "llama", "bert"],
     {"timeout": 0.5, "models": ["llama", "bert"]}),
    ("bench_ddp", ["--steps", "1", "--quality-batch", "4", "--quality-repeats", "1"],
     {"steps": 1, "quality_batch": 4, "quality_repeats": 1}),
]


@pytest.mark.parametrize(("script", "argv", "expected"), GOOD_VALUES)
def test_good_values_parse(script: str, argv: list[str], expected: dict[str, Any], load: Loader) -> None:
    args = load(script).parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected


# ---------------------------------------------------------------------------- script-specific


def test_coverage_rejects_unknown_model_before_any_subprocess(
    load: Loader, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    coverage = load("bench_coverage")

    def no_subprocess(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model ran although the command line is invalid")

    monkeypatch.setattr(coverage.subprocess, "run", no_subprocess)
    err = _rejects(coverage.main, ["--heads", "causal-lm", "--models", "llama", "nosuchmodel"], capsys)
    assert "--models" in err
    assert "unknown model type 'nosuchmodel'" in err
    err = _rejects(coverage.parse_args, ["--models", "lama"], capsys)
    assert "close matches:" in err
    assert "llama" in err


def test_torchjd_skipped_line_is_the_same_everywhere(load: Loader, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)  # importing torchjd raises ImportError
    expected = "torchjd comparison skipped: torchjd is not importable ("
    autogram_line = load("bench_autogram").torchjd_unavailable()
    assert autogram_line is not None and autogram_line.startswith(expected)
    torchjd, aggregation_line = load("bench_aggregation").load_torchjd()
    assert torchjd is None and aggregation_line.startswith(expected)
    step, autojac_line = load("bench_autojac").make_torchjd_step(None, [], {})
    assert step is None and autojac_line.startswith(expected)


def test_architectures_summary_is_aligned_for_long_names(load: Loader) -> None:
    architectures = load("bench_architectures")
    ratios = {"hf_jd": 1.5, "hf_jd-1bw": 1.25}
    lines = architectures.summary_table(
        [("llama", {**ratios, "torchjd": 2.0}), ("resnet-frozen-bn", ratios), ("longformer-padded", ratios)]
    )
    assert len({len(line) for line in lines}) == 1, "\n".join(lines)
    assert lines[2].startswith("resnet-frozen-bn  ")
    column = lines[0].index("hf_jd") + len("hf_jd")  # the numbers end where their header ends
    assert all(line[:column].endswith("1.50") for line in lines[1:]), "\n".join(lines)
