"""Instance-wise risk minimisation (IWRM): one loss per training example, UPGrad against ERM.

Empirical risk minimisation (ERM) averages the per-example losses. IWRM with Jacobian descent
(Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization", arXiv 2406.16232)
treats each example's loss as an objective of its own and aggregates their gradients with UPGrad,
computed through the autogram engine (the Gramian of the B per-example gradients, never the
Jacobian). The data, from :func:`hf_jd.synthetic.make_classification_text_dataset`, hold a minority
(15%) of "hard" examples that follow another rule. By default each hard example starts with a marker
token instead of ``[CLS]``, so that the model can tell which rule applies: the minority's rule is
learnable, but averaging gives it little weight.

The script trains a tiny BERT classifier both ways (ERM is the ``mean`` aggregator in IWRM mode, so
both runs share everything but the aggregation) and tracks, on a fixed probe set of training
examples, the mean, 90th percentile and maximum of the per-example losses, plus the mean loss of the
hard examples. It prints the final values and plots the distribution over training.

What it shows at the defaults (checked with seeds 0 to 5; about 30 s on one CPU thread): UPGrad ends
with a much lower mean loss of the hard examples (0.00 to 0.03, against 0.24 to 0.87 with ERM) and a
lower 90th percentile (at most 1e-4, against 0.04 to 0.23); its mean is lower in 5 of the 6 seeds
(0.0884 against 0.0876 in the sixth). Its maximum is lower in 4 of the 6 seeds. In the other two, a single
borderline example of the majority rule (as many group-A tokens as group-B ones, or one more) ends
with a loss of 8.8 and 10.7 under UPGrad, where ERM fits it (0.27 and 0.03), while ERM leaves more
probe examples above a loss of 0.5 (9 and 3, against 1 and 2). UPGrad does not increase the loss of
any example of the current batch (to first order), but the updates of the batches an example is not
in can.

With ``--mark_hard false`` the hard examples look like the others and, on about half of them, their
label contradicts the majority rule. Then UPGrad, which does not lower some examples' losses at the
expense of others, fits them less than ERM: at 300 steps their mean loss is 2.5 to 3.6 against 1.2 to
1.4 with ERM (seeds 0 to 2), and the mean and the maximum are larger too. Jacobian descent does not sacrifice the
majority to a contradicting minority either.

Run: ``python examples/iwrm.py [--max_steps 300] [--mark_hard false] [--output_dir out/iwrm]``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    TrainerCallback,
    default_data_collator,
    set_seed,
)

from _aggregator_options import aggregator_kwargs, canonical_aggregator, check_aggregator

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.synthetic import make_classification_text_dataset
from hf_jd.trainer.losses import per_example_losses

VOCAB_SIZE = 64
MAX_LENGTH = 24
# The token groups of hf_jd.synthetic use the ids 2 .. 61 of a vocabulary of 64: the last id is free.
MARKER_ID = VOCAB_SIZE - 1


@dataclass
class IWRMArguments:
    """Options of the example."""

    output_dir: str = field(default="out/iwrm", metadata={"help": "Where runs and the plot go."})
    aggregator: str = field(
        default="upgrad", metadata={"help": "Aggregator of the per-example Jacobian (a registry name, any case)."}
    )
    aggregator_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of --aggregator as a JSON object, e.g. '{\"n_byzantine\": 0}' for krum "
            "(checked on a Jacobian of --batch_size rows before training)."
        },
    )
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps of each run."})
    batch_size: int = field(default=32, metadata={"help": "Examples per step (= rows of the Jacobian)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    probe_every: int = field(default=10, metadata={"help": "Measure the loss distribution every this many steps."})
    probe_size: int = field(default=128, metadata={"help": "Training examples of the fixed probe set."})
    num_train: int = field(default=1024, metadata={"help": "Generated training examples."})
    hard_fraction: float = field(default=0.15, metadata={"help": "Fraction of minority-rule examples."})
    mark_hard: bool = field(
        default=True,
        metadata={
            "help": "Whether each hard example starts with a marker token instead of [CLS] (its rule is then "
            "learnable). Default: yes; with --no_mark_hard (or --mark_hard false) the hard examples look like the "
            "others and about half contradict the majority rule."
        },
    )
    hidden_size: int = field(default=64, metadata={"help": "Width of the BERT classifier (two attention heads)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order."})
    cpu_threads: int = field(
        default=1,
        metadata={"help": "torch CPU threads; 1 is fastest for this tiny model (more only add synchronisation)."},
    )

    def __post_init__(self) -> None:
        for name in ("cpu_threads", "max_steps", "batch_size", "probe_every", "probe_size", "num_train", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.hard_fraction < 1.0:
            raise ValueError(f"--hard_fraction must be in [0, 1), got {self.hard_fraction}.")
        self.aggregator = canonical_aggregator(self.aggregator)
        if self.aggregator == "mean":
            raise ValueError("--aggregator mean is ERM itself, the baseline: choose another aggregator (e.g. upgrad).")
        if self.hidden_size % 2:
            raise ValueError(f"--hidden_size must be even (two attention heads), got {self.hidden_size}.")
        check_aggregator(
            self.aggregator, aggregator_kwargs(self.aggregator_kwargs), self.batch_size,
            f"the {self.batch_size} example losses of a step (--batch_size)",
        )





class LossDistributionTracker(TrainerCallback):
    """Record mean, 90th percentile and max of the per-example losses on a fixed probe batch.

    Parameters
    ----------
    probe
        A collated batch with ``labels``.
    hard
        Boolean mask ``[len(probe)]`` of the minority-rule examples (their mean loss is recorded as
        ``hard_mean``; NaN when the probe holds none).
    every
        Record at step 0, at every multiple of ``every`` and at the last step.
    """

    def __init__(self, probe: dict[str, torch.Tensor], hard: torch.Tensor, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}.")
        self.probe, self.hard, self.every = probe, hard.bool(), every
        self.records: list[dict[str, float]] = []

    @torch.no_grad()
    def record(self, model: torch.nn.Module, step: int) -> None:
        """Measure the probe's per-example losses with ``model`` in evaluation mode."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        inputs = {key: value.to(device) for key, value in self.probe.items() if key != "labels"}
        losses = per_example_losses(model, model(**inputs), self.probe["labels"].to(device)).float().cpu()
        model.train(was_training)
        hard = losses[self.hard]
        self.records.append(
            {
                "step": step,
                "mean": float(losses.mean()),
                "p90": float(torch.quantile(losses, 0.9)),
                "max": float(losses.max()),
                "hard_mean": float(hard.mean()) if hard.numel() else math.nan,
            }
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.record(model, 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(model, state.global_step)


def train_one(
    args: IWRMArguments,
    aggregator: str,
    data: Any,
    probe: dict[str, torch.Tensor],
    hard: torch.Tensor,
    kwargs: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train a fresh classifier (same seed every time) by IWRM with ``aggregator`` built with ``kwargs``; return the
    records."""
    set_seed(args.seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=MAX_LENGTH,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    tracker = LossDistributionTracker(probe, hard, args.probe_every)
    training_args = JDTrainingArguments(
        output_dir=str(Path(args.output_dir) / aggregator),
        jd_mode="iwrm",
        jd_aggregator=aggregator,
        jd_aggregator_kwargs=kwargs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=args.probe_every,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # Every step has --batch_size rows: aggregators that keep per-row state (nash_mtl, gradvac) or take a fixed
        # number of rows refuse the short last batch of an epoch.
        dataloader_drop_last=True,
    )
    trainer = JDTrainer(
        model=model,
        args=training_args,
        train_dataset=data,
        data_collator=default_data_collator,
        callbacks=[tracker],
    )
    print(f"\n=== IWRM with jd_aggregator={aggregator!r} for {args.max_steps} steps ===", flush=True)
    trainer.train()
    return tracker.records


def plot(runs: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Mean, 90th percentile and max of the per-example losses over training, one line style per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for (name, records), style in zip(runs.items(), ("-", "--")):
        steps = [record["step"] for record in records]
        for key, colour in (("mean", "C0"), ("p90", "C1"), ("max", "C3")):
            axis.plot(steps, [record[key] for record in records], style, color=colour, label=f"{key} ({name})")
    axis.set(xlabel="step", ylabel="per-example training loss", yscale="log",
             title="Per-example loss distribution on the probe set")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run IWRM with ``--aggregator`` and ERM, print the final loss distribution, save the plot.

    Returns
    -------
    dict
        ``runs``: run name → records (``step``, ``mean``, ``p90``, ``max``, ``hard_mean``);
        ``plot``: path of the PNG.
    """
    (args,) = HfArgumentParser(IWRMArguments).parse_args_into_dataclasses(args=argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def training_set(args: IWRMArguments) -> Any:
    """The generated training examples (with ``is_hard``); with ``mark_hard`` the hard ones start with
    :data:`MARKER_ID` instead of ``[CLS]``."""
    train = make_classification_text_dataset(
        args.num_train,
        1,
        hard_fraction=args.hard_fraction,
        max_length=MAX_LENGTH,
        vocab_size=VOCAB_SIZE,
        seed=args.seed,
    )["train"]
    if not args.mark_hard:
        return train

    def mark(example: dict[str, Any]) -> dict[str, Any]:
        if example["is_hard"]:
            example["input_ids"] = [MARKER_ID, *example["input_ids"][1:]]
        return example

    return train.map(mark)


def run(args: IWRMArguments) -> dict[str, Any]:
    """Everything :func:`main` does, with parsed arguments."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train = training_set(args)
    probe_rows = train.select(range(min(args.probe_size, len(train))))
    hard = torch.tensor(probe_rows["is_hard"], dtype=torch.bool)
    probe = default_data_collator(list(probe_rows.remove_columns("is_hard")))
    data = train.remove_columns("is_hard")
    runs = {
        f"IWRM {args.aggregator}": train_one(
            args, args.aggregator, data, probe, hard, aggregator_kwargs(args.aggregator_kwargs)
        ),
        "ERM (mean)": train_one(args, "mean", data, probe, hard),
    }
    print(
        f"\nPer-example training losses on {len(hard)} probe examples ({int(hard.sum())} hard) "
        f"after {args.max_steps} steps"
    )
    print(f"{'run':<16}{'mean':>10}{'p90':>10}{'max':>10}{'hard mean':>12}")
    for name, records in runs.items():
        last = records[-1]
        print(f"{name:<16}{last['mean']:>10.4f}{last['p90']:>10.4f}{last['max']:>10.4f}{last['hard_mean']:>12.4f}")
    path = plot(runs, output_dir / "iwrm_losses.png")
    print(f"Plot of the per-example loss distribution: {path}")
    return {"runs": runs, "plot": str(path)}


if __name__ == "__main__":
    main(sys.argv[1:])
