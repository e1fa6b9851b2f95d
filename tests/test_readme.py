"""README.md stays true: its code runs and its tables match the code.

- Every ``python`` code block of README.md is executed, in order, in one namespace, inside a
  temporary directory. Blocks fenced as ```` ```python ```` run; other languages (bash, text) are
  documentation only.
- The table of ``jd_*`` arguments, between the markers ``<!-- jd-arguments:start -->`` and
  ``<!-- jd-arguments:end -->``, is generated from the fields of ``JDTrainingArguments`` (name,
  default, ``metadata["help"]``). ``python tests/test_readme.py --write`` regenerates it in place;
  ``python tests/test_readme.py`` prints it.
- The aggregator table has one row per registered name, whose class, "Gramian-based" and
  "stateful" cells agree with the registry and the classes.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
JD_START = "<!-- jd-arguments:start -->"
JD_END = "<!-- jd-arguments:end -->"
AGGREGATOR_HEADER = "| name | class | Gramian-based | stateful | paper |"

#: Constructor arguments for the aggregators that have required ones (to ask whether they are stateful).
REQUIRED_KWARGS: dict[str, dict[str, Any]] = {
    "constant": {"weights": [1.0, 1.0]},
    "krum": {"n_byzantine": 1},
    "trimmed_mean": {"trim_number": 1},
}


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _python_blocks() -> list[str]:
    return BLOCK.findall(_readme())


# ---------------------------------------------------------------------------- jd_* table
def _format_default(value: Any) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def jd_arguments_table() -> str:
    """The markdown table of the ``jd_*`` fields of ``JDTrainingArguments``."""
    from hf_jd import JDTrainingArguments

    lines = ["| argument | default | meaning |", "|---|---|---|"]
    for spec in dataclasses.fields(JDTrainingArguments):
        if not spec.name.startswith("jd_"):
            continue
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            raise ValueError(f"JDTrainingArguments.{spec.name} has no default; the README table needs one.")
        meaning = spec.metadata.get("help")
        if not meaning:
            raise ValueError(f'JDTrainingArguments.{spec.name} has no metadata["help"]; add one.')
        lines.append(f"| `{spec.name}` | {_format_default(default)} | {_cell(meaning)} |")
    return "\n".join(lines)


def _jd_section(text: str) -> tuple[int, int]:
    start = text.find(JD_START)
    end = text.find(JD_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md must contain {JD_START} followed by {JD_END}.")
    return start + len(JD_START), end


def write_jd_arguments_table() -> None:
    """Regenerate the ``jd_*`` table of README.md in place."""
    text = _readme()
    start, end = _jd_section(text)
    README.write_text(text[:start] + "\n" + jd_arguments_table() + "\n" + text[end:], encoding="utf-8")


# ---------------------------------------------------------------------------- aggregator table
def _aggregator_rows() -> dict[str, list[str]]:
    """Rows of the aggregator table: registry name -> cells (name cell without backticks)."""
    lines = _readme().splitlines()
    try:
        first = lines.index(AGGREGATOR_HEADER)
    except ValueError:
        raise AssertionError(f"README.md has no aggregator table with the header {AGGREGATOR_HEADER!r}.") from None
    rows: dict[str, list[str]] = {}
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


# ---------------------------------------------------------------------------- tests
def test_readme_has_python_examples() -> None:
    assert len(_python_blocks()) >= 3


def test_jd_arguments_table_is_up_to_date() -> None:
    text = _readme()
    start, end = _jd_section(text)
    assert text[start:end].strip() == jd_arguments_table(), (
        "The jd_* table of README.md differs from JDTrainingArguments' fields: run "
        "`.venv/bin/python tests/test_readme.py --write` to regenerate it."
    )


def test_every_jd_field_is_documented() -> None:
    from hf_jd import JDTrainingArguments

    text = _readme()
    names = [spec.name for spec in dataclasses.fields(JDTrainingArguments) if spec.name.startswith("jd_")]
    assert names, "JDTrainingArguments has no jd_* field"
    missing = [name for name in names if f"| `{name}` |" not in text]
    assert not missing, f"jd_* fields missing from the README table: {missing}"


def test_jd_table_generation_reflects_the_fields() -> None:
    table = jd_arguments_table()
    assert '| `jd_aggregator` | `"upgrad"` |' in table
    assert "| `jd_update_weights_every` | `1` |" in table
    assert "| `jd_log_weights` | `True` |" in table


def test_every_registered_aggregator_has_a_correct_row() -> None:
    from hf_jd.aggregation import available_aggregators, get_aggregator, get_aggregator_class, is_gramian_based

    rows = _aggregator_rows()
    names = available_aggregators()
    missing = [name for name in names if name not in rows]
    assert not missing, f"Registered aggregators missing from the README table: {missing}"
    unknown = sorted(set(rows) - set(names))
    assert not unknown, f"README aggregator table lists names that are not registered: {unknown}"
    for name in names:
        cells = rows[name]
        assert len(cells) == 5, f"Row of {name!r} must have 5 cells, got {cells}"
        assert cells[1] == f"`{get_aggregator_class(name).__name__}`", f"class cell of {name!r}: {cells[1]}"
        assert cells[2] == _yes_no(is_gramian_based(name)), f"Gramian-based cell of {name!r}: {cells[2]}"
        aggregator = get_aggregator(name, **REQUIRED_KWARGS.get(name, {}))
        assert cells[3] == _yes_no(aggregator.is_stateful), f"stateful cell of {name!r}: {cells[3]}"
        assert cells[4], f"paper cell of {name!r} is empty"


def test_aggregator_rows_parser_reads_the_table() -> None:
    rows = _aggregator_rows()
    assert rows["upgrad"][:4] == ["`upgrad`", "`UPGrad`", "yes", "no"]
    assert "2406.16232" in rows["upgrad"][4]


def test_setup_commands_exist_and_ci_runs_the_readme_test_command() -> None:
    root = README.parent
    text = _readme()
    for command in ("bash scripts/run_demo.sh", "bash scripts/run_tests.sh"):
        assert command in text, f"README must show the set-up command {command!r}"
        script = root / command.split()[1]
        assert script.is_file(), f"README names {script}, which does not exist"
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/run_tests.sh" in ci, ".ci/run must run the README's test command"


def test_every_example_and_benchmark_is_mentioned() -> None:
    root = README.parent
    text = _readme()
    files = sorted((root / "examples").rglob("*.py")) + sorted((root / "benchmarks").glob("bench_*.py"))
    assert files, "no examples or benchmarks found"
    missing = [str(path.relative_to(root)) for path in files if str(path.relative_to(root)) not in text]
    assert not missing, f"README does not mention: {missing}"


def test_relative_links_point_to_existing_files() -> None:
    root = README.parent
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", _readme(), flags=re.MULTILINE | re.DOTALL))
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", prose)
    assert targets, "README has no relative link"
    missing = [target for target in targets if not (root / target).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_jd.aggregation import _registry

    monkeypatch.chdir(tmp_path)
    # (the aggregators the README registers are forgotten after it)
    monkeypatch.setattr(_registry, "_REGISTERED", dict(_registry._REGISTERED))
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for index, block in enumerate(_python_blocks()):
        try:
            exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is what matters
            raise AssertionError(f"README python block {index} failed:\n{block}") from error


if __name__ == "__main__":
    sys.path.insert(0, str(README.parent))  # run as a script from a checkout: import this hf_jd
    if sys.argv[1:] == ["--write"]:
        write_jd_arguments_table()
        print(f"Regenerated the jd_* table of {README}.")
    elif not sys.argv[1:]:
        print(jd_arguments_table())
    else:
        sys.exit("usage: python tests/test_readme.py [--write]")
