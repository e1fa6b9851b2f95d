"""Tiny models, datasets and reference computations shared by the JDTrainer tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import Tensor, nn
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

from hf_jd import JDTrainingArguments

TASKS = ["a", "b"]


class TwoTaskNet(nn.Module):
    """Shared MLP encoder with a regression head ``a`` and a 3-class head ``b``.

    Returns a dict with ``losses`` (task → scalar, or task → ``[B]`` when
    ``loss_reduction="none"``), ``loss`` (their mean) and the logits.
    """

    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, 1)
        self.head_b = nn.Linear(hidden, classes)

    def forward(
        self,
        x: Tensor,
        labels_a: Tensor | None = None,
        labels_b: Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> dict[str, Any]:
        hidden = self.encoder(x)
        pred_a = self.head_a(hidden).squeeze(-1)
        logits_b = self.head_b(hidden)
        out: dict[str, Any] = {"logits_a": pred_a, "logits_b": logits_b}
        if labels_a is not None and labels_b is not None:
            loss_a = (pred_a - labels_a) ** 2
            loss_b = F.cross_entropy(logits_b, labels_b, reduction="none")
            if loss_reduction == "mean":
                loss_a, loss_b = loss_a.mean(), loss_b.mean()
            out["losses"] = {"a": loss_a, "b": loss_b}
            out["loss"] = (loss_a.mean() + loss_b.mean()) / 2
        return out


def two_task_dataset(n: int = 16, d_in: int = 6, seed: int = 3) -> Dataset:
    """Regression task ``a`` and 3-class task ``b``; with seed 3 the tasks conflict on the first batches."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator)
    labels_a = 3.0 * x[:, 0] - x[:, 1]
    labels_b = (x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    return Dataset.from_dict({"x": x.tolist(), "labels_a": labels_a.tolist(), "labels_b": labels_b.tolist()})


def tiny_bert(num_labels: int = 3) -> BertForSequenceClassification:
    config = BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def token_dataset(n: int = 16, length: int = 6, vocab: int = 50, num_labels: int = 3, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (n, length), generator=generator)
    labels = input_ids[:, 1] % num_labels
    return Dataset.from_dict(
        {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones(n, length, dtype=torch.long).tolist(),
            "labels": labels.tolist(),
        }
    )


def make_args(tmp_path, **kwargs: Any) -> JDTrainingArguments:
    defaults: dict[str, Any] = {
        "report_to": "none",
        "use_cpu": True,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 0.05,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "max_grad_norm": 0.0,
        "train_sampling_strategy": "sequential",
        "lr_scheduler_type": "constant",
        "seed": 0,
    }
    defaults.update(kwargs)
    return JDTrainingArguments(output_dir=str(tmp_path), **defaults)


class GradCapture(TrainerCallback):
    """Records the flattened gradient of every trainable parameter before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.grads.append(flat_grad(model))


def count_per_row_passes(monkeypatch: Any) -> list[int]:
    """A list that gets an entry each time the autogram engine takes its per-row pass (one backward per loss row)."""
    from hf_jd.autogram import engine as engine_module

    passes: list[int] = []
    original = engine_module.grads_per_row

    def counted(*args: Any) -> Any:
        passes.append(1)
        return original(*args)

    monkeypatch.setattr(engine_module, "grads_per_row", counted)
    return passes


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).clone() for p in trainable(model)]
    )


def explicit_jacobian(losses: Tensor, params: list[nn.Parameter]) -> Tensor:
    """The Jacobian of ``losses.flatten()`` w.r.t. ``params``, one autograd.grad per row."""
    rows = []
    flat = losses.reshape(-1)
    for index in range(flat.shape[0]):
        grads = torch.autograd.grad(flat[index], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    return torch.stack(rows)


def collate(dataset: Dataset, start: int, stop: int) -> dict[str, Tensor]:
    """The batch that the default collator builds from examples ``start:stop`` (sequential sampling)."""
    rows = dataset[start:stop]
    batch = {}
    for key, values in rows.items():
        batch[key] = torch.tensor(values)
    return batch


def multi_head_model() -> torch.nn.Module:
    """A MultiHeadModel with tasks ``a`` (3 classes) and ``b`` (regression) on a tiny BERT without dropout."""
    from transformers import BertConfig

    from hf_jd import MultiHeadModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    heads = {"a": {"kind": "classification", "num_labels": 3, "dropout": 0.0}, "b": {"kind": "regression"}}
    return MultiHeadModel.from_backbone(config, heads)


def missing_labels_dataset() -> Any:
    """16 examples; in the first global batch of 8, rank 0's half (0-3) has 4 labels of ``b`` and 2 of ``a``, rank
    1's half (4-7) no label of ``b`` and 4 of ``a``."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 50, (16, 6), generator=generator)
    labels_a = input_ids[:, 1] % 3
    labels_a[[0, 1]] = -100
    labels_b = input_ids[:, 2].float() / 50
    labels_b[4:8] = float("nan")
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "labels_a": labels_a.tolist(),
                              "labels_b": labels_b.tolist()})  # fmt: skip
