"""Smoke tests of the scripts in ``examples/``: each ``main(argv)`` runs a few steps on tiny sizes.

The examples are scripts, not a package, so they are loaded from their files. Beyond "it runs",
each test checks an outcome against an independent computation: the mean baseline's weights are
exactly uniform, the Δm% formula on hand-made numbers, per-task metrics recomputed from the model's
outputs, losses that decrease where a few steps reliably decrease them, plots that are real PNGs.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from transformers import default_data_collator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# (as when an example runs as a script: its folder is on sys.path, for the helpers it shares with the others)
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as module ``examples_<name>`` (registered, for dataclass type hints); ``name`` may
    name a subfolder, e.g. ``accelerate/train_multi_gpu``."""
    module_name = f"examples_{name.replace('/', '_')}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f"{path} is not a plausible PNG plot"


def last_printed_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


# ---------------------------------------------------------------------------------------------------------
# The main job: examples/multi_head_finetune.py

DEMO_TINY = [
    "--max_steps", "4", "--batch_size", "8", "--num_train", "64", "--num_eval", "16",
    "--hidden_size", "32", "--num_layers", "1", "--logging_steps", "2",
]


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return load_example("multi_head_finetune")


def test_demo_end_to_end(demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = demo.main([*DEMO_TINY, "--output_dir", str(tmp_path)])
    printed = capsys.readouterr()
    out = printed.out
    heads = results["heads"]
    runs = results["runs"]
    assert list(runs) == ["upgrad", "mean"]
    for run in runs.values():
        for split in ("train", "eval"):
            for task, spec in heads.items():
                values = run[split][task]
                assert math.isfinite(values["loss"]) and math.isfinite(values["metric"])
                if spec["kind"] == "classification":
                    assert 0.0 <= values["metric"] <= 1.0
        assert run["seconds_per_step"] > 0
        # The train columns are measured on the first len(eval) training examples, and the table says so.
        assert (run["train_examples"], run["eval_examples"]) == (16, 16)
        logged = [entry for entry in run["history"] if "jd/weight_balance" in entry]
        assert [entry["step"] for entry in logged] == [2, 4]
        assert all("jd/min_cosine" in entry and "jd/conflicting_pairs" in entry for entry in logged)
    # The mean is the aggregator with uniform weights 1/m: an exact, independent truth.
    for entry in runs["mean"]["history"]:
        for task in heads:
            assert entry[f"jd/weight_{task}"] == pytest.approx(1 / len(heads), abs=1e-6)
    # The table: one loss row and one metric row per task, seconds per step, Δm% of the eval metrics.
    for task in heads:
        assert any(line.startswith(task) and "loss" in line for line in out.splitlines())
    accuracy_line = next(line for line in out.splitlines() if line.startswith("balance") and "accuracy" in line)
    printed_cells = [float(cell) for cell in accuracy_line.split()[2:]]
    expected_cells = [runs[method][split]["balance"]["metric"] for method in runs for split in ("train", "eval")]
    assert printed_cells == pytest.approx(expected_cells, abs=1e-4)
    assert "seconds per step" in out
    expected = demo.delta_m(runs["upgrad"]["eval"], runs["mean"]["eval"], heads)
    assert f"{expected:+.2f}%" in out
    assert results["delta_m"] == pytest.approx(expected)
    # The Trainer's progress bar is on (tqdm writes to stderr).
    assert "it/s]" in printed.err or "s/it]" in printed.err
    # The plot is written and named in the last printed line.
    plot = Path(results["plot"])
    assert_png(plot)
    assert plot.parent == tmp_path
    assert str(plot) in last_printed_line(out)


def test_demo_table_keeps_long_aggregator_names_apart(
    demo: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each value sits right under its column label, also for names longer than the default column (they ran
    together: 'aligned_mtl trainaligned_mtl eval...'), and each method's seconds per step says how it was computed."""
    (args,) = demo.parse_demo_args(
        ["--aggregator", "aligned_mtl", "--baseline", "graddrop", "--output_dir", str(tmp_path)]
    )
    heads = demo.generated_heads()
    metrics = {task: {"loss": 0.123456 * (i + 1), "metric": 0.5} for i, task in enumerate(heads)}
    run = {"history": [], "seconds_per_step": 0.01, "train": metrics, "eval": metrics, "train_examples": 512,
           "eval_examples": 512}  # fmt: skip
    demo.print_table({"aligned_mtl": run, "graddrop": run}, heads, args, improvement=1.0)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("task"))
    labels = ["aligned_mtl train", "aligned_mtl eval", "graddrop train", "graddrop eval"]
    ends = [header.index(label) + len(label) for label in labels]
    assert all(header[header.index(label) - 1] == " " for label in labels)
    for line in lines:
        if line.startswith(tuple(heads)):
            values = line.split()[-4:]
            assert [line.index(value, end - len(value)) + len(value) for value, end in zip(values, ends)] == ends
    seconds = next(line for line in lines if line.startswith("seconds per step"))
    assert "aligned_mtl 0.010 (weights from the Gramian" in seconds
    assert "graddrop 0.010 (explicit Jacobian, autojac engine)" in seconds
    assert demo.how_computed("mean") == "Gramian computed for the logged statistics only"


def test_demo_table_says_which_training_examples_it_scores(
    demo: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """The train columns are measured on the first len(eval) training examples, not the whole training set: the
    table says so (it read as if it were the final loss on all of them)."""
    (args,) = demo.parse_demo_args(["--output_dir", "unused"])
    heads = demo.generated_heads()
    metrics = {task: {"loss": 0.5, "metric": 0.5} for task in heads}
    run = {"history": [], "seconds_per_step": 0.01, "train": metrics, "eval": metrics, "train_examples": 40,
           "eval_examples": 40}  # fmt: skip
    demo.print_table({"upgrad": run, "mean": run}, heads, args, improvement=0.0)
    out = capsys.readouterr().out
    assert "train: the first 40 training examples" in out and "not the whole training set" in out
    assert "eval: the 40 evaluation examples" in out


def test_demo_help_suggests_krum_kwargs_that_work(demo: ModuleType, tmp_path: Path) -> None:
    """--help suggested '{"n_byzantine": 1}' for krum, which failed at the first step with the 3 generated tasks."""
    from transformers import HfArgumentParser

    text = " ".join(HfArgumentParser(demo.DemoArguments).format_help().split())
    assert '\'{"n_byzantine": 0}\' for krum' in text and '"n_byzantine": 1' not in text
    (args,) = demo.parse_demo_args(["--aggregator", "krum", "--aggregator_kwargs", '{"n_byzantine": 0}',
                                    "--output_dir", str(tmp_path)])  # fmt: skip
    assert args.aggregator == "krum"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--aggregator", "krum", "--aggregator_kwargs", '{"n_byzantine": 1}'],
         r"--aggregator 'krum' with --aggregator_kwargs \{'n_byzantine': 1\} cannot aggregate the 3 task losses"),
        (["--baseline", "constant", "--baseline_kwargs", '{"weights": [1, 2]}'],
         r"--baseline 'constant'.*cannot aggregate the 3 task losses.*2 weights"),
        (["--dataset_name", "d", "--model_name_or_path", "m", "--task_columns", "a:regression,b:regression",
          "--aggregator", "trimmed_mean", "--aggregator_kwargs", '{"trim_number": 1}'],
         r"trimmed_mean.*cannot aggregate the 2 task losses"),
    ],
)  # fmt: skip
def test_demo_checks_aggregator_kwargs_against_the_number_of_tasks(
    demo: ModuleType, tmp_path: Path, argv: list[str], message: str
) -> None:
    """Keyword arguments that only fail on a Jacobian of the run's height fail when the arguments are parsed (they
    failed at the first training step, after the data and the model were made)."""
    with pytest.raises(ValueError, match=message):
        demo.main([*DEMO_TINY, *argv, "--output_dir", str(tmp_path)])


def test_demo_accepts_aggregator_names_in_any_case(demo: ModuleType, tmp_path: Path) -> None:
    """hf_jd.aggregation.get_aggregator("UPGrad") works; the demo rejected --aggregator UPGrad as unknown."""
    (args,) = demo.parse_demo_args(["--aggregator", "UPGrad", "--baseline", " MEAN ", "--output_dir", str(tmp_path)])
    assert (args.aggregator, args.baseline) == ("upgrad", "mean")
    (args,) = demo.parse_demo_args(["--aggregator", "Aligned-MTL", "--output_dir", str(tmp_path)])
    assert args.aggregator == "aligned_mtl"
    with pytest.raises(ValueError, match="both 'mean'"):
        demo.parse_demo_args(["--aggregator", "Mean", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown --aggregator 'UPGrade'"):
        demo.parse_demo_args(["--aggregator", "UPGrade", "--output_dir", str(tmp_path)])


def test_demo_hub_failure_is_a_short_message(tmp_path: Path) -> None:
    """A backbone that is neither a local directory nor reachable on the hub ends the script with a short message
    that says what to do, not a long chained traceback. HF_HUB_OFFLINE=1 makes the loading fail at once (without it,
    with no network, transformers retries for about a minute first)."""
    command = [
        sys.executable, str(EXAMPLES / "multi_head_finetune.py"), "--model_name_or_path", "no-such-org/no-such-model",
        "--dataset_name", "no-such-org/no-such-data", "--task_columns", "label:classification:2",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert "Could not load the tokenizer of --model_name_or_path 'no-such-org/no-such-model'" in result.stderr
    assert "local directory" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 5, result.stderr


def test_demo_load_errors_name_the_option(demo: ModuleType) -> None:
    """An OSError or HFValidationError of a loader becomes a HubLoadError naming the option; other errors pass."""
    from huggingface_hub.errors import HFValidationError

    def fail(error: Exception) -> Any:
        raise error

    with pytest.raises(demo.HubLoadError) as raised:
        demo.load_or_explain("backbone", "--model_name_or_path", "x", lambda: fail(OSError("no connection\nmore")))
    first_line = str(raised.value).splitlines()[0]
    assert first_line == "Could not load the backbone of --model_name_or_path 'x': no connection"
    with pytest.raises(demo.HubLoadError, match="dataset of --dataset_name"):
        demo.load_or_explain("dataset", "--dataset_name", "/a//b", lambda: fail(HFValidationError("bad id")))
    with pytest.raises(KeyError):
        demo.load_or_explain("dataset", "--dataset_name", "d", lambda: fail(KeyError("a bug, not a load failure")))
    assert demo.load_or_explain("dataset", "--dataset_name", "d", lambda: 3) == 3


def test_demo_aggregator_kwargs_reach_the_run(demo: ModuleType, tmp_path: Path) -> None:
    (args,) = demo.parse_demo_args(
        [*DEMO_TINY, "--max_steps", "2", "--aggregator", "krum", "--aggregator_kwargs", '{"n_byzantine": 0}',
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    data, heads, vocab_size = demo.load_data(args)
    run = demo.train_one(args, "aggregator", data, heads, vocab_size)
    assert run["history"] and all(math.isfinite(value["metric"]) for value in run["eval"].values())


def test_demo_mean_baseline_is_the_plain_trainer(demo: ModuleType, tmp_path: Path) -> None:
    """JD with the mean aggregator must train exactly like transformers.Trainer on the model's mean loss."""
    from transformers import Trainer, TrainingArguments

    (args,) = demo.parse_demo_args([*DEMO_TINY, "--max_steps", "6", "--output_dir", str(tmp_path)])
    data, heads, vocab_size = demo.load_data(args)
    assert args.baseline == "mean"
    jd_mean = demo.train_one(args, "baseline", data, heads, vocab_size)["eval"]
    model = demo.build_model(args, heads, vocab_size)
    plain_args = TrainingArguments(
        output_dir=str(tmp_path / "plain"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 20), seed=args.seed,
        data_seed=args.seed, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False,
        label_names=[f"labels_{task}" for task in heads],
    )
    Trainer(model=model, args=plain_args, train_dataset=data["train"], data_collator=default_data_collator).train()
    plain = demo.evaluate_tasks(model, data["eval"], heads, batch_size=16)
    for task in heads:
        assert jd_mean[task]["loss"] == pytest.approx(plain[task]["loss"], rel=1e-4)
        assert jd_mean[task]["metric"] == pytest.approx(plain[task]["metric"], rel=1e-4)


def test_delta_m_follows_maninis_definition(demo: ModuleType) -> None:
    heads = {"a": {"kind": "classification", "num_labels": 2}, "r": {"kind": "regression"}}
    method = {"a": {"metric": 0.66}, "r": {"metric": 3.0}}
    baseline = {"a": {"metric": 0.60}, "r": {"metric": 4.0}}
    # accuracy +10 % (higher is better), MSE −25 % (lower is better): mean of +10 and +25.
    assert demo.delta_m(method, baseline, heads) == pytest.approx(17.5)
    assert demo.delta_m(baseline, baseline, heads) == pytest.approx(0.0)
    worse = {"a": {"metric": 0.54}, "r": {"metric": 5.0}}
    assert demo.delta_m(worse, baseline, heads) == pytest.approx(-17.5)


def test_delta_m_rejects_a_zero_baseline_metric(demo: ModuleType) -> None:
    heads = {"r": {"kind": "regression"}}
    with pytest.raises(ValueError, match="zero"):
        demo.delta_m({"r": {"metric": 1.0}}, {"r": {"metric": 0.0}}, heads)


def test_evaluate_tasks_matches_a_direct_computation(demo: ModuleType) -> None:
    from hf_jd.synthetic import make_multitask_text_dataset

    (args,) = demo.parse_demo_args([*DEMO_TINY, "--output_dir", "unused"])
    data = make_multitask_text_dataset(40, 13, vocab_size=demo.GENERATED_VOCAB_SIZE, score_scale=5.0, seed=1)
    heads = demo.generated_heads()
    model = demo.build_model(args, heads, demo.GENERATED_VOCAB_SIZE)
    # Batches of 8 do not divide 13 examples: the weighting by batch size must still be exact.
    measured = demo.evaluate_tasks(model, data["eval"], heads, batch_size=8)
    batch = default_data_collator([data["eval"][i] for i in range(13)])
    model.eval()
    with torch.no_grad():
        outputs = model(**batch)
    for task, spec in heads.items():
        logits, labels = outputs.logits[task], batch[f"labels_{task}"]
        if spec["kind"] == "classification":
            loss = torch.nn.functional.cross_entropy(logits, labels)
            metric = (logits.argmax(-1) == labels).float().mean()
        else:
            loss = metric = torch.nn.functional.mse_loss(logits.view(-1), labels.float())
        assert measured[task]["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert measured[task]["metric"] == pytest.approx(float(metric), rel=1e-5)


def test_parse_task_columns(demo: ModuleType) -> None:
    heads = demo.parse_task_columns("topic:classification:4, rating:regression")
    assert heads == {"topic": {"kind": "classification", "num_labels": 4}, "rating": {"kind": "regression"}}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("topic", "column:classification:N"),
        ("topic:ranking", "column:classification:N"),
        ("topic:classification", "number of labels"),
        ("topic:classification:many", "integer"),
        ("topic:classification:1", "at least 2"),
        ("a:regression,a:regression", "twice"),
    ],
)
def test_parse_task_columns_rejects_bad_specs(demo: ModuleType, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        demo.parse_task_columns(spec)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset_name", "some/dataset"], "--task_columns"),
        (["--dataset_name", "some/dataset", "--task_columns", "label:classification:2"], "--model_name_or_path"),
        (["--aggregator", "mean"], "baseline"),
        (["--max_steps", "0"], "max_steps"),
        (["--model_name_or_path", "some/bert"], "--dataset_name"),
        (["--cpu_threads", "0"], "cpu_threads"),
        (["--hidden_size", "40"], "multiple of 16"),
        (["--aggregator", "no_such_aggregator"], "no_such_aggregator"),
        (["--aggregator", "krum"], r"krum.*n_byzantine.*--aggregator_kwargs"),
        (["--baseline", "sum", "--baseline_kwargs", '{"bogus": 1}'], r"--baseline 'sum'.*'bogus'"),
        (["--aggregator_kwargs", "[1]"], "must be a JSON object"),
        (["--aggregator_kwargs", "{bad"], "not valid JSON"),
    ],
)
def test_demo_rejects_bad_arguments_before_training(
    demo: ModuleType, tmp_path: Path, argv: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        demo.main([*argv, "--output_dir", str(tmp_path)])


def _word_tokenizer() -> Any:
    """A small word-level fast tokenizer built in memory (stands in for a hub tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["good", "bad", "movie", "film", "great", "awful", "plot", "actor", "boring", "fun"]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{word: i + 4 for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def test_demo_hub_path_with_offline_stand_ins(
    demo: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model_name_or_path``/``--dataset_name`` go through AutoTokenizer/AutoModel.from_pretrained and
    datasets.load_dataset; here those three are replaced by in-memory stand-ins (no network)."""
    import datasets
    import transformers
    from datasets import Dataset, DatasetDict
    from transformers import BertConfig, BertModel

    calls: dict[str, Any] = {}
    texts = ["good movie", "bad plot", "great fun film", "awful boring actor", "good actor", "bad film plot"] * 4

    def fake_load_dataset(path: str, name: str | None = None) -> DatasetDict:
        calls["dataset"] = (path, name)
        columns = {"text": texts, "label": [i % 2 for i in range(24)], "rating": [i % 5 for i in range(24)]}
        # No "validation" split: the demo must fall back to "test".
        return DatasetDict(train=Dataset.from_dict(columns), test=Dataset.from_dict(columns).select(range(8)))

    def fake_tokenizer(name: str, *args: Any, **kwargs: Any) -> Any:
        calls["tokenizer"] = name
        return _word_tokenizer()

    def fake_model(name: str, *args: Any, **kwargs: Any) -> BertModel:
        calls["model"] = name
        return BertModel(BertConfig(vocab_size=14, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=16))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_model)
    results = demo.main([
        "--model_name_or_path", "some-org/some-bert", "--dataset_name", "some-org/reviews",
        "--task_columns", "label:classification:2,rating:regression", "--max_length", "8",
        "--max_steps", "2", "--batch_size", "4", "--logging_steps", "1", "--output_dir", str(tmp_path),
    ])
    assert calls == {
        "dataset": ("some-org/reviews", None), "tokenizer": "some-org/some-bert", "model": "some-org/some-bert"
    }
    assert results["heads"] == {"label": {"kind": "classification", "num_labels": 2}, "rating": {"kind": "regression"}}
    for run in results["runs"].values():
        assert 0.0 <= run["eval"]["label"]["metric"] <= 1.0 and math.isfinite(run["eval"]["rating"]["metric"])
    assert_png(Path(results["plot"]))
    assert "label" in capsys.readouterr().out


def test_hub_data_are_tokenised_with_float_regression_labels(demo: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import transformers
    from datasets import Dataset, DatasetDict

    columns = {"sentence": ["good movie", "bad plot film", "fun"], "stars": [1, 4, 3], "label": [0, 1, 1]}
    raw = DatasetDict(train=Dataset.from_dict(columns), validation=Dataset.from_dict(columns).select([0]))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None: raw)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, *a, **k: _word_tokenizer())
    (args,) = demo.parse_demo_args([
        "--model_name_or_path", "m", "--dataset_name", "d", "--text_column", "sentence",
        "--task_columns", "stars:regression,label:classification:2", "--max_length", "5",
    ])
    data = demo.load_hub_data(args, demo.parse_task_columns(args.task_columns))
    assert data["train"].num_rows == 3 and data["eval"].num_rows == 1  # "validation" is preferred
    batch = default_data_collator([data["train"][i] for i in range(3)])
    assert batch["labels_stars"].dtype == torch.float32 and batch["labels_stars"].tolist() == [1.0, 4.0, 3.0]
    assert batch["labels_label"].dtype == torch.int64 and batch["labels_label"].tolist() == [0, 1, 1]
    assert batch["input_ids"].tolist()[1] == [5, 10, 7, 0, 0]  # "bad plot film", padded to --max_length
    (bad,) = demo.parse_demo_args(["--model_name_or_path", "m", "--dataset_name", "d", "--text_column", "review",
                                   "--task_columns", "stars:regression"])
    with pytest.raises(ValueError, match="review"):
        demo.load_hub_data(bad, demo.parse_task_columns(bad.task_columns))


# ---------------------------------------------------------------------------------------------------------
# examples/iwrm.py


@pytest.fixture(scope="module")
def iwrm() -> ModuleType:
    return load_example("iwrm")


def test_iwrm_end_to_end(iwrm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--max_steps", "4", "--batch_size", "8", "--num_train", "64", "--probe_size", "32",
        "--probe_every", "2", "--hidden_size", "32", "--output_dir", str(tmp_path),
    ]
    results = iwrm.main(argv)
    out = capsys.readouterr().out
    runs = results["runs"]
    assert list(runs) == ["IWRM upgrad", "ERM (mean)"]
    for name, records in runs.items():
        assert [record["step"] for record in records] == [0, 2, 4]
        for record in records:
            assert record["mean"] <= record["p90"] + 1e-6 and record["p90"] <= record["max"] + 1e-6
            assert all(math.isfinite(record[key]) for key in ("mean", "p90", "max", "hard_mean"))
        assert name in out
    # Both runs start from the same weights, so their step-0 distributions are identical.
    first_upgrad, first_erm = runs["IWRM upgrad"][0], runs["ERM (mean)"][0]
    assert first_upgrad == pytest.approx(first_erm)
    assert_png(Path(results["plot"]))
    assert results["plot"] in last_printed_line(out)


def test_iwrm_marks_exactly_the_hard_examples(iwrm: ModuleType) -> None:
    arguments = dict(num_train=64, hard_fraction=0.3, seed=1)
    marked = iwrm.training_set(iwrm.IWRMArguments(**arguments))
    plain = iwrm.training_set(iwrm.IWRMArguments(mark_hard=False, **arguments))
    assert 0 < sum(plain["is_hard"]) < len(plain)
    for row, original in zip(marked, plain):
        assert row["input_ids"][0] == (iwrm.MARKER_ID if original["is_hard"] else original["input_ids"][0])
        assert row["input_ids"][1:] == original["input_ids"][1:] and row["labels"] == original["labels"]
    # The marker is no token of the generated sequences themselves.
    assert all(iwrm.MARKER_ID not in ids for ids in plain["input_ids"])


def test_iwrm_tracker_matches_per_example_cross_entropy(iwrm: ModuleType) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=16, num_labels=2)
    )
    probe = {
        "input_ids": torch.randint(2, 16, (20, 6)),
        "attention_mask": torch.ones(20, 6, dtype=torch.long),
        "labels": torch.randint(0, 2, (20,)),
    }
    hard = torch.zeros(20, dtype=torch.bool)
    hard[:5] = True
    tracker = iwrm.LossDistributionTracker(probe, hard, every=3)
    state = type("State", (), {"global_step": 3, "max_steps": 10})()
    tracker.on_step_end(None, state, None, model=model)
    tracker.on_step_end(None, type("State", (), {"global_step": 4, "max_steps": 10})(), None, model=model)
    assert len(tracker.records) == 1  # step 4 is not a multiple of 3 nor the last step
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    losses = torch.nn.functional.cross_entropy(logits, probe["labels"], reduction="none")
    record = tracker.records[0]
    assert record["step"] == 3
    assert record["mean"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert record["max"] == pytest.approx(float(losses.max()), rel=1e-5)
    assert record["p90"] == pytest.approx(float(torch.quantile(losses, 0.9)), rel=1e-5)
    assert record["hard_mean"] == pytest.approx(float(losses[:5].mean()), rel=1e-5)


def test_iwrm_stateful_aggregator_crosses_an_epoch_with_a_short_last_batch(iwrm: ModuleType, tmp_path: Path) -> None:
    """20 examples in batches of 8: the short last batch (4 rows) is dropped, which NashMTL's per-row state needs
    (it raised there)."""
    argv = [
        "--max_steps", "3", "--batch_size", "8", "--num_train", "20", "--probe_size", "8", "--probe_every", "3",
        "--hidden_size", "32", "--aggregator", "nash_mtl", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    results = iwrm.main(argv)
    assert [record["step"] for record in results["runs"]["IWRM nash_mtl"]] == [0, 3]



IWRM_TINY = [
    "--max_steps", "2", "--batch_size", "8", "--num_train", "32", "--probe_size", "8", "--probe_every", "2",
    "--hidden_size", "32",
]  # fmt: skip


def test_iwrm_aggregator_kwargs_and_any_case(iwrm: ModuleType, tmp_path: Path) -> None:
    """--aggregator_kwargs reaches the IWRM run (krum cannot be built without n_byzantine), and the name is read in
    any case (the example had no --aggregator_kwargs and rejected 'KRUM')."""
    results = iwrm.main([*IWRM_TINY, "--aggregator", "KRUM", "--aggregator_kwargs", '{"n_byzantine": 1}',
                         "--output_dir", str(tmp_path)])  # fmt: skip
    assert list(results["runs"]) == ["IWRM krum", "ERM (mean)"]
    assert [record["step"] for record in results["runs"]["IWRM krum"]] == [0, 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--aggregator", "krum"], r"'krum' cannot be built.*n_byzantine.*--aggregator_kwargs"),
        (["--aggregator", "krum", "--aggregator_kwargs", '{"n_byzantine": 3}'],
         r"cannot aggregate the 8 example losses of a step \(--batch_size\)"),
        (["--aggregator_kwargs", "[1]"], "must be a JSON object"),
        (["--aggregator_kwargs", "{bad"], "not valid JSON"),
        (["--aggregator", "MEAN"], "ERM"),
    ],
)  # fmt: skip
def test_iwrm_checks_the_aggregator_before_training(
    iwrm: ModuleType, tmp_path: Path, argv: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        iwrm.main([*IWRM_TINY, *argv, "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--probe_every", "0"], "probe_every"), (["--hard_fraction", "1.5"], "hard_fraction"),
     (["--probe_size", "0"], "probe_size"), (["--aggregator", "mean"], "ERM")],
)
def test_iwrm_rejects_bad_arguments(iwrm: ModuleType, tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iwrm.main([*argv, "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------
# examples/causal_lm_iwrm.py


@pytest.fixture(scope="module")
def causal_lm() -> ModuleType:
    return load_example("causal_lm_iwrm")


def test_causal_lm_iwrm_learns(causal_lm: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--max_steps", "12", "--batch_size", "8", "--num_train", "96", "--num_eval", "16",
        "--hidden_size", "32", "--num_layers", "1", "--learning_rate", "1e-2", "--logging_steps", "4",
        "--output_dir", str(tmp_path),
    ]
    results = causal_lm.main(argv)
    assert math.isfinite(results["before"]) and math.isfinite(results["after"])
    # At initialisation the predictions are nearly uniform over the 64 tokens.
    assert results["before"] == pytest.approx(math.log(64), abs=0.15)
    # The Markov chain has 4 successors per token: a few steps already learn part of it.
    assert results["after"] < results["before"] - 0.15
    assert results["attainable"] < results["after"]
    logged = [entry for entry in results["history"] if "jd/weight_mean" in entry]
    assert len(logged) == 3
    for entry in logged:
        # Eight sequence losses, UPGrad weights: all positive, conflicts among the sequences measured.
        assert 0 < entry["jd/weight_min"] <= entry["jd/weight_mean"] <= entry["jd/weight_max"]
        assert 0 <= entry["jd/conflicting_pairs"] <= 8 * 7 / 2
    assert "before" in capsys.readouterr().out


def test_causal_lm_mean_token_loss_matches_the_model_loss(causal_lm: ModuleType) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

    (args,) = HfArgumentParser(causal_lm.CausalLMArguments).parse_args_into_dataclasses(
        args=["--num_train", "8", "--num_eval", "10"]
    )
    _, evaluation = causal_lm.language_modelling_data(args)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=24, n_embd=16, n_layer=1, n_head=2))
    model.eval()
    batch = default_data_collator([evaluation[i] for i in range(10)])
    with torch.no_grad():
        # One batch with labels: the model's own loss is the mean over the shifted, non-ignored tokens.
        expected = float(model(**batch).loss)
    assert causal_lm.mean_token_loss(model, evaluation, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_markov_dataset_follows_a_sparse_chain() -> None:
    from hf_jd.synthetic import CLS_ID, PAD_ID, make_markov_text_dataset

    data = make_markov_text_dataset(200, 20, vocab_size=32, successors=3, min_length=6, max_length=12, seed=5)
    assert data["train"].num_rows == 200 and data["eval"].num_rows == 20
    successors: dict[int, set[int]] = {}
    for split in ("train", "eval"):
        for row in data[split]:
            ids = [t for t, m in zip(row["input_ids"], row["attention_mask"]) if m == 1]
            assert len(row["input_ids"]) == 12 and 6 <= len(ids) <= 12
            assert set(row["input_ids"][len(ids):]) <= {PAD_ID}
            assert ids[0] == CLS_ID and all(2 <= t < 32 for t in ids[1:])
            for current, following in itertools.pairwise(ids[1:]):
                successors.setdefault(current, set()).add(following)
    # Every token is followed by at most 3 distinct tokens across the whole dataset (both splits share the chain).
    assert max(len(values) for values in successors.values()) == 3
    again = make_markov_text_dataset(200, 20, vocab_size=32, successors=3, min_length=6, max_length=12, seed=5)
    assert again["train"]["input_ids"] == data["train"]["input_ids"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"successors": 0}, "successors"), ({"successors": 63}, "successors"), ({"vocab_size": 4}, "vocab_size"),
     ({"min_length": 1}, "min_length")],
)
def test_markov_dataset_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    from hf_jd.synthetic import make_markov_text_dataset

    with pytest.raises(ValueError, match=message):
        make_markov_text_dataset(4, 2, **kwargs)


def test_attainable_loss_counts_first_and_later_tokens(causal_lm: ModuleType) -> None:
    from datasets import Dataset

    # Two sequences: 3 predicted tokens (1 first + 2 later) and 1 predicted token (first only).
    data = Dataset.from_dict({"labels": [[1, 5, 9, 7, -100], [1, 6, -100, -100, -100]]})
    expected = (2 * math.log(62) + 2 * math.log(4)) / 4
    assert causal_lm.attainable_loss(data, successors=4) == pytest.approx(expected)


def test_causal_lm_rejects_bad_arguments(causal_lm: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        causal_lm.main(["--hidden_size", "33", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="max_steps"):
        causal_lm.main(["--max_steps", "0", "--output_dir", str(tmp_path)])
    # This example trains with the autogram engine: a non-Gramian aggregator is named before any data is made.
    with pytest.raises(ValueError, match="graddrop is not Gramian-based.*use one of .*upgrad"):
        causal_lm.main(["--aggregator", "graddrop", "--output_dir", str(tmp_path)])
    # (it named make_markov_text_dataset's min_length, which the example has no option for)
    with pytest.raises(ValueError, match="--max_length must be at least 8"):
        causal_lm.main(["--max_length", "2", "--output_dir", str(tmp_path)])


CAUSAL_TINY = [
    "--max_steps", "2", "--batch_size", "8", "--num_train", "16", "--num_eval", "8", "--hidden_size", "16",
    "--num_layers", "1", "--logging_steps", "1",
]  # fmt: skip


def test_causal_lm_aggregator_kwargs_and_any_case(causal_lm: ModuleType, tmp_path: Path) -> None:
    """--aggregator_kwargs reaches the run (krum cannot be built without n_byzantine), and the name is read in any
    case (the example had no --aggregator_kwargs and rejected 'Krum')."""
    results = causal_lm.main([*CAUSAL_TINY, "--aggregator", "Krum", "--aggregator_kwargs", '{"n_byzantine": 1}',
                              "--output_dir", str(tmp_path)])  # fmt: skip
    assert math.isfinite(results["after"])
    assert any("jd/weight_mean" in entry for entry in results["history"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--aggregator", "krum"], r"'krum' cannot be built.*n_byzantine.*--aggregator_kwargs"),
        (["--aggregator", "krum", "--aggregator_kwargs", '{"n_byzantine": 3}'], "cannot aggregate the 8 sequence"),
        (["--aggregator", "GradDrop"], "graddrop is not Gramian-based"),
        (["--aggregator_kwargs", '{"n_byzantine": 0}'], r"'upgrad' cannot be built.*n_byzantine"),
    ],
)  # fmt: skip
def test_causal_lm_checks_the_aggregator_before_training(
    causal_lm: ModuleType, tmp_path: Path, argv: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        causal_lm.main([*CAUSAL_TINY, *argv, "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------------
# examples/custom_losses.py


@pytest.fixture(scope="module")
def custom() -> ModuleType:
    return load_example("custom_losses")


def test_custom_losses_trains_a_plain_module(
    custom: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--max_steps", "30", "--num_train", "256", "--num_eval", "128", "--logging_steps", "10",
        "--learning_rate", "1e-2", "--output_dir", str(tmp_path),
    ]
    results = custom.main(argv)
    before, after = results["before"], results["after"]
    assert set(before) == set(after) == {"sum", "product"}
    # The sum of four features is linear: a few steps reliably lower its error.
    assert after["sum"] < 0.8 * before["sum"]
    assert all(math.isfinite(value) for value in after.values())
    logged = [entry for entry in results["history"] if "jd/weight_sum" in entry]
    assert len(logged) == 3
    assert all({"loss_sum", "loss_product", "jd/weight_product", "jd/min_cosine"} <= set(entry) for entry in logged)
    out = capsys.readouterr().out
    assert "sum" in out and "product" in out


def test_custom_compute_losses_is_the_per_task_mse(custom: ModuleType) -> None:
    data = custom.make_data(12, seed=3)
    batch = default_data_collator([data[i] for i in range(12)])
    model = custom.TwoTaskMLP()
    losses, outputs = custom.compute_losses(model, batch)
    assert losses.shape == (2,)
    features = batch["features"]
    expected_targets = {"sum": features[:, :4].sum(1), "product": 5 * features[:, 0] * features[:, 1]}
    for index, task in enumerate(custom.TASKS):
        assert torch.allclose(batch[f"target_{task}"], expected_targets[task], atol=1e-5)
        expected = ((outputs[task] - expected_targets[task]) ** 2).mean()
        assert float(losses[index].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_custom_losses_rejects_bad_arguments(custom: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_train"):
        custom.main(["--num_train", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="no_such_aggregator"):
        custom.main(["--aggregator", "no_such_aggregator", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="trim_number.*--aggregator_kwargs"):
        custom.main(["--aggregator", "trimmed_mean", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="JSON object"):
        custom.main(["--aggregator_kwargs", "[1]", "--output_dir", str(tmp_path)])
    # Keyword arguments given but wrong: the message has no hint to give them.
    with pytest.raises(ValueError, match=r"reg_eps.*\.$") as raised:
        custom.main(["--aggregator_kwargs", '{"reg_eps": -1}', "--output_dir", str(tmp_path)])
    assert "Give the aggregator's keyword arguments" not in str(raised.value)


# ---------------------------------------------------------------------------------------------------------
# examples/accelerate/train_multi_gpu.py (in one process here; tests/trainer/test_distributed.py runs it in two)


@pytest.fixture(scope="module")
def multi_gpu() -> ModuleType:
    return load_example("accelerate/train_multi_gpu")


def test_multi_gpu_rejects_a_pretrained_backbone_on_generated_data(multi_gpu: ModuleType, tmp_path: Path) -> None:
    """Its data are ids of a 64-token vocabulary: a local backbone with a smaller vocabulary crashed with an
    IndexError at the first step (and a real one trained on meaningless ids)."""
    from transformers import BertConfig, BertModel

    backbone = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(backbone)  # fmt: skip
    argv = ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--num_train", "32", "--num_eval", "16",
            "--model_name_or_path", str(backbone)]  # fmt: skip
    with pytest.raises(ValueError, match=r"--model_name_or_path .* is not supported.*64-token.*multi_head_finetune"):
        multi_gpu.main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned memory is used, and wanted, with CUDA")
def test_multi_gpu_on_cpu_trains_without_the_pin_memory_warning(multi_gpu: ModuleType, tmp_path: Path) -> None:
    """On CPU the dataloaders do not pin memory (torch warned "'pin_memory' argument is set as true but no
    accelerator is found" at every dataloader)."""
    argv = ["--output_dir", str(tmp_path), "--max_steps", "1", "--num_train", "32", "--num_eval", "16",
            "--hidden_size", "32", "--num_layers", "1", "--disable_tqdm", "true"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = multi_gpu.main(argv)
    assert not [str(warning.message) for warning in caught if "pin_memory" in str(warning.message)]
    assert math.isfinite(metrics["eval_loss"])
