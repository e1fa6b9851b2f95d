"""The logged JD statistics of one step against an explicit Jacobian, and evaluation / prediction against
the plain transformers Trainer on the same model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import BertConfig, BertForTokenClassification, Trainer, TrainingArguments

from hf_jd import JDTrainer, JDTrainingArguments, MultiHeadModel
from hf_jd.aggregation import UPGradWeighting

from jd_trainer_helpers import collate, explicit_jacobian, make_args, tiny_bert, token_dataset, trainable


def _conflict_statistics(gramian: torch.Tensor) -> tuple[int, float]:
    """Conflicting pairs and smallest cosine, by brute force over the pairs of rows."""
    pairs, smallest = 0, 1.0
    for i in range(gramian.shape[0]):
        for j in range(i + 1, gramian.shape[0]):
            pairs += int(gramian[i, j] < 0)
            smallest = min(smallest, float(gramian[i, j] / (gramian[i, i] * gramian[j, j]).sqrt()))
    return pairs, smallest


@pytest.mark.parametrize("engine", ["autogram", "autojac"])
def test_iwrm_logged_statistics_are_those_of_the_explicit_jacobian(tmp_path, engine):
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    dataset = token_dataset()
    args = make_args(tmp_path, jd_engine=engine, max_steps=1, logging_steps=1)
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)

    batch = collate(dataset, 0, 4)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    jacobian = explicit_jacobian(losses, trainable(reference)).double()
    gramian = jacobian @ jacobian.T
    pairs, smallest = _conflict_statistics(gramian)
    weights = UPGradWeighting()(gramian.float())
    assert pairs > 0  # the rows conflict: the statistics are not trivial
    assert log["jd/conflicting_pairs"] == pairs
    assert log["jd/min_cosine"] == pytest.approx(smallest, abs=1e-4)
    assert log["jd/weight_min"] == pytest.approx(float(weights.min()), rel=1e-3)
    assert log["jd/weight_max"] == pytest.approx(float(weights.max()), rel=1e-3)
    assert log["jd/weight_mean"] == pytest.approx(float(weights.mean()), rel=1e-3)
    assert log["loss"] == pytest.approx(float(losses.detach().mean()), rel=1e-4)


def _token_model_and_data():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50, max_position_embeddings=32, num_labels=3)  # fmt: skip
    input_ids = torch.randint(1, 50, (10, 6), generator=torch.Generator().manual_seed(0))
    labels = input_ids % 3
    labels[:, 0] = -100
    labels[2, 3:] = -100
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist(),
                              "labels": labels.tolist()})  # fmt: skip
    return BertForTokenClassification(config), data


def _multi_head_model_and_data():
    torch.manual_seed(0)
    backbone = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          vocab_size=50, max_position_embeddings=32)  # fmt: skip
    model = MultiHeadModel.from_backbone(backbone, {"a": {"kind": "classification", "num_labels": 3},
                                                    "b": {"kind": "regression"}})  # fmt: skip
    input_ids = torch.randint(1, 50, (10, 6), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist(),
                              "labels_a": (input_ids[:, 2] % 3).tolist(),
                              "labels_b": (input_ids[:, 3].float() / 10).tolist()})  # fmt: skip
    return model, data


def _accuracy(prediction) -> dict[str, float]:
    predicted = np.asarray(prediction.predictions).argmax(-1)
    labelled = prediction.label_ids != -100
    return {"accuracy": float((predicted[labelled] == prediction.label_ids[labelled]).mean())}


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return np.array_equal(a, b, equal_nan=np.asarray(a).dtype.kind == "f")


@pytest.mark.parametrize("kind", ["token_classification", "multi_head"])
def test_evaluate_and_predict_equal_the_plain_trainer(tmp_path, kind):
    if kind == "token_classification":
        model, data = _token_model_and_data()
        jd_options, options, metrics = {}, {}, _accuracy
    else:
        model, data = _multi_head_model_and_data()
        jd_options = {"jd_mode": "mtl", "jd_task_names": ["a", "b"]}
        options, metrics = {"label_names": ["labels_a", "labels_b"]}, None
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=3,
                  disable_tqdm=True, **options)  # fmt: skip
    jd_trainer = JDTrainer(model=model, args=JDTrainingArguments(**common, **jd_options), eval_dataset=data,
                           compute_metrics=metrics)  # fmt: skip
    plain = Trainer(model=model, args=TrainingArguments(**common), eval_dataset=data, compute_metrics=metrics)
    jd_metrics, plain_metrics = jd_trainer.evaluate(), plain.evaluate()
    for key, value in plain_metrics.items():
        if not key.endswith(("_runtime", "_per_second", "_preparation_time")):
            assert jd_metrics[key] == value, key
    jd_prediction, plain_prediction = jd_trainer.predict(data), plain.predict(data)
    assert _same(jd_prediction.predictions, plain_prediction.predictions)
    assert _same(jd_prediction.label_ids, plain_prediction.label_ids)
