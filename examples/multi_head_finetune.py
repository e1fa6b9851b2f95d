"""The main job: multi-task fine-tuning with Jacobian descent (UPGrad) against the mean of the losses.

A shared transformer encoder with three task heads — two classifications and a regression whose
loss is on a larger scale — is trained twice with :class:`hf_jd.JDTrainer`, on the same seed, data
and initial weights: once with ``jd_aggregator="upgrad"`` (UPGrad, Quinton & Rey, "Jacobian Descent
For Multi-Objective Optimization", arXiv 2406.16232) and once with ``jd_aggregator="mean"``, the usual
average of the task losses (step for step what ``transformers.Trainer`` does with the model's mean
loss; a test checks it). At the end it prints a table of the per-task train and eval losses and
metrics (train: on the first training examples, as many as the evaluation set holds, not on all of
them), the relative multi-task improvement Δm% of UPGrad over the baseline (Maninis et al., CVPR
2019) and the seconds per step, and saves a plot of the training losses, of the weights UPGrad chose
and of the conflict between the task gradients; the last printed line names the plot.

By default it needs no network: the data come from :func:`hf_jd.synthetic.make_multitask_text_dataset`
and the encoder is a small BERT built from a config. For real use, ``--model_name_or_path`` loads a
pretrained backbone and its tokenizer from the hub, and ``--dataset_name`` a dataset with
``datasets.load_dataset``; ``--text_column`` and ``--task_columns`` say where the text and the task
labels are, e.g. ``--task_columns 'label:classification:2,score:regression'``.

Run: ``python examples/multi_head_finetune.py [--max_steps 300] [--output_dir out/multi_head_demo]``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from datasets import Dataset, DatasetDict
from huggingface_hub.errors import HFValidationError
from transformers import BertConfig, HfArgumentParser, default_data_collator, set_seed

from _aggregator_options import aggregator_kwargs, canonical_aggregator, check_aggregator

from hf_jd import JDTrainer, JDTrainingArguments, MultiHeadModel
from hf_jd.aggregation import is_gramian_based
from hf_jd.synthetic import MULTITASK_TASKS, make_multitask_text_dataset
from hf_jd.trainer.multi_head import POOLINGS

#: Vocabulary of the generated data (and of the BERT built for it).
GENERATED_VOCAB_SIZE = 64

HeadSpecs = dict[str, dict[str, Any]]
Metrics = dict[str, dict[str, float]]
Loaded = TypeVar("Loaded")


class HubLoadError(RuntimeError):
    """A pretrained model, its tokenizer or a dataset could not be loaded (from the hub or a local path)."""


def load_or_explain(what: str, flag: str, name: str, load: Callable[[], Loaded]) -> Loaded:
    """Call ``load()``; turn its failure to find or download ``name`` into a short :class:`HubLoadError`.

    Without network, transformers and datasets retry for about a minute and then raise an ``OSError``
    (or huggingface_hub's ``HFValidationError`` for a name that is neither a directory nor a hub id)
    under a long chained traceback; the message of this error says what to do instead.

    Parameters
    ----------
    what
        What is loaded (``"tokenizer"``, ``"backbone"``, ``"dataset"``), for the message.
    flag
        The option that named it (``"--model_name_or_path"``, ``"--dataset_name"``).
    name
        The value of that option.
    load
        Loads and returns the object.

    Returns
    -------
    object
        What ``load()`` returned.

    Raises
    ------
    HubLoadError
        If ``load()`` raised ``OSError`` or ``HFValidationError``.
    """
    try:
        return load()
    except (OSError, HFValidationError) as error:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        raise HubLoadError(
            f"Could not load the {what} of {flag} {name!r}: {reason}\n"
            f"Give a local directory in {flag} (e.g. one written by save_pretrained), or check the network "
            "connection. If the files are already in the Hugging Face cache, set HF_HUB_OFFLINE=1 to use them "
            "without the minute of connection retries."
        ) from error


@dataclass
class DemoArguments:
    """Options of the demo; the defaults run offline in well under a minute on two idle CPU cores."""

    output_dir: str = field(default="out/multi_head_demo", metadata={"help": "Where runs, table and plot go."})
    aggregator: str = field(
        default="upgrad", metadata={"help": "Aggregator of the Jacobian-descent run (a registry name, any case)."}
    )
    baseline: str = field(default="mean", metadata={"help": "Aggregator of the baseline run (any case)."})
    aggregator_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of --aggregator as a JSON object, e.g. '{\"n_byzantine\": 0}' for krum (Krum "
            "needs more than 2*n_byzantine+2 tasks: with the 3 generated tasks only 0 works). Checked on a "
            "Jacobian with one row per task before training."
        },
    )
    baseline_kwargs: str | None = field(
        default=None, metadata={"help": "Keyword arguments of --baseline as a JSON object."}
    )
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps of each run."})
    batch_size: int = field(default=32, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (linear decay)."})
    logging_steps: int = field(default=5, metadata={"help": "Log (and plot) every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed of data, initial weights and data order."})
    num_train: int = field(default=2048, metadata={"help": "Generated training examples."})
    num_eval: int = field(default=512, metadata={"help": "Generated evaluation examples."})
    score_scale: float = field(default=10.0, metadata={"help": "Scale of the generated regression target."})
    generated_max_length: int = field(default=16, metadata={"help": "Length of the generated sequences."})
    hidden_size: int = field(
        default=64,
        metadata={
            "help": "Hidden size of the generated BERT encoder; a multiple of 16, the size of each attention head "
            "(hidden_size // 16 heads)."
        },
    )
    num_layers: int = field(default=2, metadata={"help": "Layers of the generated BERT encoder."})
    pooling: str = field(
        default="mean",
        metadata={"help": "How every head reads the token states.", "choices": list(POOLINGS)},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub name or local path of a pretrained backbone (needs network)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset for datasets.load_dataset (needs network); see --task_columns."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    text_column: str = field(default="text", metadata={"help": "Text column of --dataset_name."})
    task_columns: str | None = field(
        default=None,
        metadata={"help": "Tasks of --dataset_name, comma-separated 'column:classification:N' or 'column:regression'."},
    )
    max_length: int = field(default=128, metadata={"help": "Tokenizer truncation length for --dataset_name."})
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads. Default: 1 for the small generated model (more threads only add "
            "synchronisation, which is slow on a busy machine), torch's own default for --model_name_or_path."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "logging_steps", "num_train", "num_eval", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--cpu_threads must be at least 1, got {self.cpu_threads}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"Unknown --pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}.")
        if self.hidden_size % 16:
            raise ValueError(
                f"--hidden_size must be a multiple of 16 (the size of each attention head), got {self.hidden_size}."
            )
        for name in ("aggregator", "baseline"):
            setattr(self, name, canonical_aggregator(getattr(self, name), name))
        if self.aggregator == self.baseline:
            raise ValueError(
                f"--aggregator and --baseline are both {self.aggregator!r}: compare two different aggregators."
            )
        if self.model_name_or_path is not None and self.dataset_name is None:
            raise ValueError(
                "--model_name_or_path needs --dataset_name (and --task_columns): the generated data are ids of "
                f"their own {GENERATED_VOCAB_SIZE}-token vocabulary, meaningless to a pretrained model."
            )
        if self.dataset_name is not None:
            if self.task_columns is None:
                raise ValueError("--dataset_name needs --task_columns, e.g. 'label:classification:2,score:regression'.")
            if self.model_name_or_path is None:
                raise ValueError("--dataset_name needs --model_name_or_path (its tokenizer encodes the text).")
        num_tasks = len(MULTITASK_TASKS) if self.task_columns is None else len(parse_task_columns(self.task_columns))
        for name in ("aggregator", "baseline"):
            kwargs = aggregator_kwargs(getattr(self, f"{name}_kwargs"), name)
            check_aggregator(
                getattr(self, name), kwargs, num_tasks, f"the {num_tasks} task losses of this run", flag=name
            )





def parse_demo_args(argv: list[str] | None = None) -> tuple[DemoArguments]:
    """Parse the command line (``argv=None``: ``sys.argv``) into :class:`DemoArguments`."""
    return HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)  # type: ignore[return-value]


def parse_task_columns(spec: str) -> HeadSpecs:
    """Parse ``'col:classification:3,col2:regression'`` into head specifications of ``MultiHeadModel``."""
    heads: HeadSpecs = {}
    for item in spec.split(","):
        parts = [part.strip() for part in item.strip().split(":")]
        if len(parts) < 2 or parts[1] not in ("classification", "regression") or not parts[0]:
            raise ValueError(f"Bad task column {item!r}: expected 'column:classification:N' or 'column:regression'.")
        column, kind = parts[0], parts[1]
        if column in heads:
            raise ValueError(f"Task column {column!r} is given twice in --task_columns.")
        if kind == "regression":
            if len(parts) != 2:
                raise ValueError(f"Bad task column {item!r}: a regression is written 'column:regression'.")
            heads[column] = {"kind": "regression"}
            continue
        if len(parts) != 3:
            raise ValueError(f"Classification task {column!r} needs its number of labels: 'column:classification:N'.")
        try:
            num_labels = int(parts[2])
        except ValueError:
            raise ValueError(f"The number of labels of {column!r} must be an integer, got {parts[2]!r}.") from None
        if num_labels < 2:
            raise ValueError(f"Classification task {column!r} needs at least 2 labels, got {num_labels}.")
        heads[column] = {"kind": "classification", "num_labels": num_labels}
    return heads


def generated_heads() -> HeadSpecs:
    """Head specifications of the generated tasks (:data:`hf_jd.synthetic.MULTITASK_TASKS`)."""
    return {
        task: {"kind": "classification", "num_labels": size} if kind == "classification" else {"kind": "regression"}
        for task, (kind, size) in MULTITASK_TASKS.items()
    }


def with_pooling(heads: HeadSpecs, pooling: str) -> HeadSpecs:
    """The head specifications with ``pooling`` (how each head reads the token states) set."""
    return {task: {**spec, "pooling": pooling} for task, spec in heads.items()}


def load_hub_data(args: DemoArguments, heads: HeadSpecs) -> DatasetDict:
    """Tokenise ``--dataset_name`` with the tokenizer of ``--model_name_or_path`` (needs network)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    assert args.dataset_name is not None and args.model_name_or_path is not None
    model_name, dataset_name = args.model_name_or_path, args.dataset_name
    tokenizer = load_or_explain(
        "tokenizer", "--model_name_or_path", model_name, lambda: AutoTokenizer.from_pretrained(model_name)
    )
    raw = load_or_explain(
        "dataset", "--dataset_name", dataset_name, lambda: load_dataset(dataset_name, args.dataset_config_name)
    )
    if "validation" in raw:
        train, evaluation = raw["train"], raw["validation"]
    elif "test" in raw:
        train, evaluation = raw["train"], raw["test"]
    else:
        parts = raw["train"].train_test_split(test_size=0.1, seed=args.seed)
        train, evaluation = parts["train"], parts["test"]
    missing = [column for column in [args.text_column, *heads] if column not in train.column_names]
    if missing:
        raise ValueError(f"{args.dataset_name} has no column(s) {missing}; its columns are {train.column_names}.")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_length, padding="max_length")
        for task, spec in heads.items():
            labels = batch[task]
            encoded[f"labels_{task}"] = [float(v) for v in labels] if spec["kind"] == "regression" else labels
        return dict(encoded)

    def prepare(split: Dataset) -> Dataset:
        return split.map(encode, batched=True, remove_columns=split.column_names)

    return DatasetDict(train=prepare(train), eval=prepare(evaluation))


def load_data(args: DemoArguments) -> tuple[DatasetDict, HeadSpecs, int]:
    """Return the ``train``/``eval`` splits, the head specifications and the vocabulary size."""
    if args.dataset_name is None:
        data = make_multitask_text_dataset(
            args.num_train,
            args.num_eval,
            vocab_size=GENERATED_VOCAB_SIZE,
            max_length=args.generated_max_length,
            score_scale=args.score_scale,
            seed=args.seed,
        )
        return data, generated_heads(), GENERATED_VOCAB_SIZE
    assert args.task_columns is not None
    heads = parse_task_columns(args.task_columns)
    return load_hub_data(args, heads), heads, 0


def build_model(args: DemoArguments, heads: HeadSpecs, vocab_size: int) -> MultiHeadModel:
    """A fresh model from the seed of the run, so that both methods start from the same weights."""
    set_seed(args.seed)
    heads = with_pooling(heads, args.pooling)
    name = args.model_name_or_path
    if name is not None:
        return load_or_explain(
            "backbone", "--model_name_or_path", name, lambda: MultiHeadModel.from_backbone(name, heads)
        )
    backbone = BertConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.hidden_size // 16,
        intermediate_size=2 * args.hidden_size,
        max_position_embeddings=max(64, args.generated_max_length),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return MultiHeadModel.from_backbone(backbone, heads)


@torch.no_grad()
def evaluate_tasks(model: MultiHeadModel, dataset: Dataset, heads: HeadSpecs, batch_size: int) -> Metrics:
    """Per-task loss and metric (accuracy for a classification, MSE for a regression) on ``dataset``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: Metrics = {task: {"loss": 0.0, "metric": 0.0} for task in heads}
    count = 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {key: value.to(device) for key, value in default_data_collator(rows).items()}
        outputs = model(**batch)
        size = len(rows)
        for task, spec in heads.items():
            logits, labels = outputs.logits[task], batch[f"labels_{task}"]
            sums[task]["loss"] += float(outputs.losses[task]) * size
            if spec["kind"] == "classification":
                sums[task]["metric"] += float((logits.argmax(-1) == labels).float().sum())
            else:
                sums[task]["metric"] += float(((logits.view(-1) - labels.view(-1).float()) ** 2).sum())
        count += size
    model.train(was_training)
    return {task: {key: value / count for key, value in values.items()} for task, values in sums.items()}


def train_one(
    args: DemoArguments, role: str, data: DatasetDict, heads: HeadSpecs, vocab_size: int
) -> dict[str, Any]:
    """Train one model with the aggregator of ``role`` (``"aggregator"`` or ``"baseline"``); return its log history,
    timing and metrics.

    The ``train`` metrics are measured on the first ``len(data["eval"])`` training examples (``train_examples``
    says how many), which keeps the final evaluation as cheap as that of the eval split."""
    method = getattr(args, role)
    model = build_model(args, heads, vocab_size)
    tasks = list(heads)
    training_args = JDTrainingArguments(
        output_dir=str(Path(args.output_dir) / method),
        jd_mode="mtl",
        jd_aggregator=method,
        jd_aggregator_kwargs=aggregator_kwargs(getattr(args, f"{role}_kwargs"), role),
        jd_task_names=tasks,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=args.logging_steps,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        label_names=[f"labels_{task}" for task in tasks],
        disable_tqdm=False,
    )
    trainer = JDTrainer(
        model=model, args=training_args, train_dataset=data["train"], data_collator=default_data_collator
    )
    print(f"\n=== training with jd_aggregator={method!r} for {args.max_steps} steps ===", flush=True)
    result = trainer.train()
    history = [entry for entry in trainer.state.log_history if any(key.startswith("loss_") for key in entry)]
    train_subset = data["train"].select(range(min(len(data["train"]), len(data["eval"]))))
    return {
        "history": history,
        "seconds_per_step": result.metrics["train_runtime"] / max(1, trainer.state.global_step),
        "train_examples": len(train_subset),
        "eval_examples": len(data["eval"]),
        "train": evaluate_tasks(model, train_subset, heads, 4 * args.batch_size),
        "eval": evaluate_tasks(model, data["eval"], heads, 4 * args.batch_size),
    }


def delta_m(method: Metrics, baseline: Metrics, heads: HeadSpecs) -> float:
    """Relative multi-task improvement Δm% of ``method`` over ``baseline`` (Maninis et al., CVPR 2019).

    ``Δm = 100/T · Σ_t (−1)^{l_t} (M_t − B_t) / B_t`` over the ``T`` tasks, one metric per task, with
    ``l_t = 1`` when lower is better (MSE) and ``0`` when higher is better (accuracy); positive
    means that ``method`` beats ``baseline``.
    """
    total = 0.0
    for task, spec in heads.items():
        base = baseline[task]["metric"]
        if base == 0:
            raise ValueError(f"Δm% is undefined: the baseline metric of task {task!r} is zero.")
        change = (method[task]["metric"] - base) / base
        total += -change if spec["kind"] == "regression" else change
    return 100.0 * total / len(heads)


def conflict_summary(history: list[dict[str, float]]) -> tuple[float, float]:
    """Mean of the logged ``jd/min_cosine`` and fraction of logging intervals with a conflicting pair."""
    cosines = [entry["jd/min_cosine"] for entry in history if "jd/min_cosine" in entry]
    pairs = [entry["jd/conflicting_pairs"] for entry in history if "jd/conflicting_pairs" in entry]
    mean_cosine = sum(cosines) / len(cosines) if cosines else math.nan
    conflicting = sum(value > 0 for value in pairs) / len(pairs) if pairs else math.nan
    return mean_cosine, conflicting


#: Aggregators whose weights do not depend on the Gramian: JDTrainer computes it for the logged statistics only.
FIXED_WEIGHTS = frozenset({"mean", "sum", "constant", "random"})


def how_computed(method: str) -> str:
    """How JDTrainer computes a step of ``method`` (for the table's seconds per step)."""
    if method in FIXED_WEIGHTS:
        return "Gramian computed for the logged statistics only"
    if is_gramian_based(method):
        return "weights from the Gramian of the task gradients"
    return "explicit Jacobian, autojac engine"


def print_table(runs: dict[str, dict[str, Any]], heads: HeadSpecs, args: DemoArguments, improvement: float) -> None:
    """The per-task final losses and metrics of both runs, seconds per step and Δm%."""
    methods = list(runs)
    columns = [f"{method} {split}" for method in methods for split in ("train", "eval")]
    cell = max(14, *(len(column) + 2 for column in columns))  # (long aggregator names keep a gap)
    width = 22 + cell * len(columns)
    first = runs[methods[0]]
    print("\n" + "=" * width)
    print(
        f"Final losses and metrics. train: the first {first['train_examples']} training examples (as many as the "
        f"eval split), not the whole training set; eval: the {first['eval_examples']} evaluation examples."
    )
    print(f"{'task':<10}{'value':<12}" + "".join(f"{column:>{cell}}" for column in columns))
    print("-" * width)
    for task, spec in heads.items():
        metric = "accuracy" if spec["kind"] == "classification" else "MSE"
        for key, label in (("loss", "loss"), ("metric", metric)):
            if spec["kind"] == "regression" and key == "metric":
                continue  # the regression loss is its MSE
            cells = [runs[method][split][task][key] for method in methods for split in ("train", "eval")]
            name = f"{label} (MSE)" if spec["kind"] == "regression" else label
            print(f"{task:<10}{name:<12}" + "".join(f"{value:>{cell}.4f}" for value in cells))
    print("-" * width)
    print(
        "seconds per step: "
        + ", ".join(f"{method} {runs[method]['seconds_per_step']:.3f} ({how_computed(method)})" for method in methods)
    )
    cosine, share = conflict_summary(runs[args.aggregator]["history"])
    if math.isnan(cosine) or math.isnan(share):
        print(
            f"task-gradient conflict during the {args.aggregator} run: nothing logged "
            f"(--max_steps {args.max_steps} is below the logging interval)"
        )
    else:
        print(
            f"task-gradient conflict during the {args.aggregator} run: mean of min cosine {cosine:+.3f}, "
            f"conflicting pairs in {100 * share:.0f}% of logging intervals"
        )
    print(
        f"Δm% of {args.aggregator} over {args.baseline} (eval accuracy / MSE, Maninis et al. 2019): "
        f"{improvement:+.2f}% (positive = {args.aggregator} better)"
    )
    print("=" * width)


def plot(runs: dict[str, dict[str, Any]], heads: HeadSpecs, args: DemoArguments) -> Path:
    """Per-task training losses of both runs, weights of the aggregator, min cosine of both runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses_axis, weights_axis, cosine_axis) = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {args.aggregator: "-", args.baseline: "--"}

    def series(method: str, key: str) -> tuple[list[float], list[float]]:
        entries = [entry for entry in runs[method]["history"] if key in entry]
        return [entry["step"] for entry in entries], [entry[key] for entry in entries]

    for index, task in enumerate(heads):
        colour = colours[index % len(colours)]
        for method, style in styles.items():
            losses_axis.plot(*series(method, f"loss_{task}"), style, color=colour, label=f"{task} ({method})")
        for method, style in styles.items():
            steps, weights = series(method, f"jd/weight_{task}")
            if steps:  # (a non-Gramian aggregator logs no weights)
                weights_axis.plot(steps, weights, style, color=colour, label=f"{task} ({method})")
    for method, style in styles.items():
        cosine_axis.plot(*series(method, "jd/min_cosine"), style, color="black", label=method)
    cosine_axis.axhline(0.0, color="grey", linewidth=1)
    losses_axis.set(yscale="log", xlabel="step", ylabel="training loss", title="Per-task training losses")
    weights_axis.set(xlabel="step", ylabel="weight", title="Task weights chosen by each aggregator")
    unweighted = [method for method in styles if not is_gramian_based(method)]
    if unweighted:
        weights_axis.text(
            0.5, 0.95, f"{' and '.join(unweighted)}: no task weights (not Gramian-based)",
            transform=weights_axis.transAxes, ha="center", va="top", fontsize=9,
        )
    cosine_axis.set(xlabel="step", ylabel="min cosine", title="Conflict: min cosine between task gradients")
    for axis in (losses_axis, weights_axis, cosine_axis):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(args.output_dir) / "multi_head_demo.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train with ``--aggregator`` and ``--baseline``, print the table and save the plot.

    Returns
    -------
    dict
        ``heads`` (task → head specification), ``runs`` (method → ``history``, ``seconds_per_step``,
        ``train`` and ``eval`` metrics, the ``train_examples`` and ``eval_examples`` they were measured on),
        ``delta_m`` (Δm% on eval metrics) and ``plot`` (PNG path).
    """
    (args,) = parse_demo_args(argv)
    threads = args.cpu_threads if args.cpu_threads is not None else (1 if args.model_name_or_path is None else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        data, heads, vocab_size = load_data(args)
        runs = {
            getattr(args, role): train_one(args, role, data, heads, vocab_size) for role in ("aggregator", "baseline")
        }
    finally:
        torch.set_num_threads(previous_threads)
    improvement = delta_m(runs[args.aggregator]["eval"], runs[args.baseline]["eval"], heads)
    print_table(runs, heads, args, improvement)
    path = plot(runs, heads, args)
    logged = any(run["history"] for run in runs.values())
    empty = "" if logged else f" (empty: nothing was logged, --max_steps {args.max_steps} < --logging_steps)"
    print(f"Plot of the per-task training losses, task weights and gradient conflicts: {path}{empty}")
    return {"heads": heads, "runs": runs, "delta_m": improvement, "plot": str(path)}


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except HubLoadError as error:
        sys.exit(f"error: {error}")
