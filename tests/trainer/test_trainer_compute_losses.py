"""JDTrainer with ``compute_losses`` on a plain module whose forward does not take the label columns."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import default_data_collator

from hf_jd import JDTrainer, JDTrainingArguments


class TwoOutputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 1)
        self.b = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.a(x).squeeze(-1), "b": self.b(x).squeeze(-1)}


def compute_losses(model: nn.Module, inputs: dict[str, torch.Tensor]):
    outputs = model(inputs["x"])
    losses = torch.stack([((outputs[k] - inputs[f"y_{k}"]) ** 2).mean() for k in ("a", "b")])
    return losses, outputs


def _trainer(tmp_path, **kwargs) -> JDTrainer:
    data = Dataset.from_dict(
        {"x": [[1.0, 2.0], [0.5, -1.0]] * 4, "y_a": [1.0, 0.0] * 4, "y_b": [0.0, 2.0] * 4}
    )
    args = JDTrainingArguments(
        output_dir=str(tmp_path), jd_mode="mtl", jd_task_names=["a", "b"], max_steps=2,
        remove_unused_columns=False, report_to="none", use_cpu=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, **kwargs,
    )
    return JDTrainer(
        model=TwoOutputNet(), args=args, train_dataset=data, eval_dataset=data,
        data_collator=default_data_collator, compute_losses=compute_losses,
    )


def _expected_task_losses(trainer: JDTrainer) -> torch.Tensor:
    data = trainer.eval_dataset
    inputs = {key: torch.tensor(data[key]) for key in data.column_names}
    with torch.no_grad():
        losses, _ = compute_losses(trainer.model, inputs)
    return losses


def test_evaluate_goes_through_compute_losses(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    trainer.train()
    metrics = trainer.evaluate()
    expected = _expected_task_losses(trainer)
    assert metrics["eval_loss"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert metrics["eval_loss_a"] == pytest.approx(float(expected[0]), rel=1e-5)
    assert metrics["eval_loss_b"] == pytest.approx(float(expected[1]), rel=1e-5)


def test_predict_returns_outputs_and_labels(tmp_path) -> None:
    trainer = _trainer(tmp_path, label_names=["y_a", "y_b"])
    prediction = trainer.predict(trainer.eval_dataset)
    predictions_a, predictions_b = prediction.predictions
    assert predictions_a.shape == (8,) and predictions_b.shape == (8,)
    assert prediction.label_ids[0].tolist() == [1.0, 0.0] * 4
    expected = _expected_task_losses(trainer)
    assert prediction.metrics["test_loss"] == pytest.approx(float(expected.mean()), rel=1e-5)


class BatchNormNet(nn.Module):
    """A model whose BatchNorm mixes the examples of a batch (unsupported for per-example losses)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.linear(x))).squeeze(-1)


def test_module_that_mixes_examples_is_rejected_with_its_name(tmp_path) -> None:
    data = Dataset.from_dict({"x": [[1.0, 2.0], [0.5, -1.0]] * 4, "y": [1.0, 0.0] * 4})
    args = JDTrainingArguments(
        output_dir=str(tmp_path), jd_mode="iwrm", jd_aggregator="upgrad", max_steps=1,
        remove_unused_columns=False, report_to="none", use_cpu=True, per_device_train_batch_size=4,
    )

    def per_example_losses(model, inputs):
        outputs = model(inputs["x"])
        return (outputs - inputs["y"]) ** 2, outputs

    trainer = JDTrainer(
        model=BatchNormNet(), args=args, train_dataset=data,
        data_collator=default_data_collator, compute_losses=per_example_losses,
    )
    with pytest.raises(RuntimeError, match=r"(?s)BatchNorm1d.*jd_engine='autojac'"):
        trainer.train()


class PlainClassifier(nn.Module):
    """A plain module whose forward takes only ``x`` (no ``labels`` argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(x)}


def test_labels_column_is_kept_for_compute_losses_with_default_column_removal(tmp_path) -> None:
    """The Trainer drops the dataset columns the forward does not take (remove_unused_columns=True by
    default); `labels` must still reach compute_losses (it used to get a bare KeyError)."""
    data = Dataset.from_dict({"x": torch.randn(8, 6).tolist(), "labels": [i % 3 for i in range(8)]})
    args = JDTrainingArguments(
        output_dir=str(tmp_path), jd_mode="iwrm", max_steps=2, report_to="none", use_cpu=True,
        per_device_train_batch_size=4,
    )  # fmt: skip
    seen: list[torch.Tensor] = []

    def compute_losses(model, inputs):
        seen.append(inputs["labels"])
        outputs = model(inputs["x"])
        return nn.functional.cross_entropy(outputs["logits"], inputs["labels"], reduction="none"), outputs

    model = PlainClassifier()
    before = model.linear.weight.detach().clone()
    JDTrainer(model=model, args=args, train_dataset=data, compute_losses=compute_losses).train()
    assert sorted(torch.cat(seen).tolist()) == sorted(i % 3 for i in range(8))  # every example's label, once
    assert not torch.equal(before, model.linear.weight)


def test_compute_losses_that_pops_the_labels_keeps_them_for_prediction(tmp_path) -> None:
    """The usual Trainer recipe ``labels = inputs.pop("labels")`` (class weights) must not lose the
    labels: predict() still returns them with the class-weighted loss."""
    data = Dataset.from_dict({"x": torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).tolist(),
                              "labels": [0, 1, 2, 1, 0, 2, 2, 1]})  # fmt: skip
    class_weights = torch.tensor([1.0, 5.0, 0.5])

    def weighted_losses(model, inputs):
        labels = inputs.pop("labels")
        outputs = model(inputs["x"])
        return nn.functional.cross_entropy(outputs["logits"], labels, weight=class_weights, reduction="none"), outputs

    args = JDTrainingArguments(
        output_dir=str(tmp_path), jd_mode="iwrm", max_steps=1, report_to="none", use_cpu=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, label_names=["labels"],
    )  # fmt: skip
    model = PlainClassifier()
    trainer = JDTrainer(model=model, args=args, train_dataset=data, compute_losses=weighted_losses)
    trainer.train()
    prediction = trainer.predict(data)
    assert prediction.label_ids is not None and prediction.label_ids.tolist() == data["labels"]
    with torch.no_grad():
        logits = model(torch.tensor(data["x"]))["logits"]
    expected = nn.functional.cross_entropy(logits, torch.tensor(data["labels"]), weight=class_weights, reduction="none")
    assert prediction.metrics["test_loss"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert prediction.predictions.shape == (8, 3)


def test_compute_losses_that_pops_task_labels_keeps_eval_task_counts(tmp_path) -> None:
    """iwmtl: a task label popped by compute_losses is still used to count the labelled examples."""
    nan = float("nan")
    data = Dataset.from_dict({"x": [[1.0, 2.0], [0.5, -1.0]] * 2, "labels_a": [1.0, nan, 0.0, nan],
                              "labels_b": [0.0, 2.0, 1.0, 3.0]})  # fmt: skip

    def losses_popping(model, inputs):
        labels = {name: inputs.pop(f"labels_{name}") for name in ("a", "b")}
        outputs = model(inputs["x"])
        columns = []
        for name in ("a", "b"):
            valid = ~torch.isnan(labels[name])
            error = (outputs[name] - torch.nan_to_num(labels[name])) ** 2
            columns.append(torch.where(valid, error, torch.zeros_like(error)))
        return torch.stack(columns, dim=1), outputs

    args = JDTrainingArguments(
        output_dir=str(tmp_path), jd_mode="iwmtl", jd_task_names=["a", "b"], max_steps=1,
        remove_unused_columns=False, report_to="none", use_cpu=True, per_device_eval_batch_size=4,
    )  # fmt: skip
    model = TwoOutputNet()
    trainer = JDTrainer(model=model, args=args, eval_dataset=data, data_collator=default_data_collator,
                        compute_losses=losses_popping)  # fmt: skip
    metrics = trainer.evaluate()
    with torch.no_grad():
        predicted_a = model(torch.tensor(data["x"]))["a"]
    labelled = torch.tensor([0, 2])
    expected_a = ((predicted_a[labelled] - torch.tensor([1.0, 0.0])) ** 2).mean()
    assert metrics["eval_loss_a"] == pytest.approx(float(expected_a), rel=1e-5)


def test_compute_losses_gets_a_copy_of_the_same_mapping_type() -> None:
    """A collator's BatchEncoding stays a BatchEncoding (attribute access works), and popping from it
    leaves the caller's batch whole."""
    from transformers import BatchEncoding

    from hf_jd.trainer._collect import LossCollector

    model = PlainClassifier()
    seen = []

    def compute_losses(model, inputs):
        seen.append(type(inputs))
        labels = inputs.pop("labels")
        outputs = model(inputs.x)
        return nn.functional.cross_entropy(outputs["logits"], labels, reduction="none"), outputs

    batch = BatchEncoding({"x": torch.randn(4, 6), "labels": torch.tensor([0, 1, 2, 1])})
    losses, _ = LossCollector("iwrm", None, ["labels"], compute_losses)(model, model, batch)
    assert seen == [BatchEncoding] and losses.shape == (4,)
    assert set(batch.keys()) == {"x", "labels"}


class _Classifier(nn.Module):
    """Takes the labels and returns its batch loss with the logits, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.linear(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _classifier_trainer(tmp_path, compute) -> JDTrainer:
    data = Dataset.from_dict({"x": [[1.0, 2.0], [0.5, -1.0], [0.0, 1.0]] * 4, "labels": [0, 1, 2] * 4})
    args = JDTrainingArguments(
        output_dir=str(tmp_path), jd_mode="iwrm", max_steps=1, report_to="none", use_cpu=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4,
    )
    return JDTrainer(model=_Classifier(), args=args, train_dataset=data, compute_losses=compute)


def _losses_with_labels_kept(model, inputs):
    outputs = model(**inputs)  # (the labels stay in the inputs: the model also returns its batch loss)
    return nn.functional.cross_entropy(outputs["logits"], inputs["labels"], reduction="none"), outputs


def _losses_with_labels_popped(model, inputs):
    labels = inputs.pop("labels")
    outputs = model(**inputs)
    return nn.functional.cross_entropy(outputs["logits"], labels, reduction="none"), outputs


def test_the_batch_loss_of_the_outputs_is_not_a_prediction(tmp_path) -> None:
    trainer = _classifier_trainer(tmp_path, _losses_with_labels_kept)
    trainer.train()
    prediction = trainer.predict(trainer.train_dataset)
    assert prediction.predictions.shape == (12, 3)  # the logits alone, as the Trainer gives
    assert prediction.label_ids.tolist() == [0, 1, 2] * 4


def test_predict_on_a_test_set_without_labels_runs_the_model(tmp_path) -> None:
    trainer = _classifier_trainer(tmp_path, _losses_with_labels_popped)
    trainer.train()
    test_set = trainer.train_dataset.remove_columns("labels")
    prediction = trainer.predict(test_set)
    x = torch.tensor(test_set["x"])
    with torch.no_grad():
        expected = trainer.model(x)["logits"]
    torch.testing.assert_close(torch.as_tensor(prediction.predictions), expected)
    assert prediction.label_ids is None and "test_loss" not in prediction.metrics
