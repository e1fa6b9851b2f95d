"""JDTrainer with an aggregator of the user's own, registered by name (``register_aggregator``)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForSequenceClassification

from hf_jd import JDTrainingArguments
from hf_jd.aggregation import Aggregator, Weighting, get_aggregator, register_aggregator, unregister_aggregator

from jd_trainer_helpers import GradCapture, collate, explicit_jacobian, trainable
from test_zoo_trainer import NUM_LABELS, text_dataset, tiny_config, train


class InverseNorm(Weighting):
    """Weights each row by the inverse of its norm, divided by the number of rows."""

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps

    def compute(self, gramian: Tensor) -> Tensor:
        return 1 / (gramian.diagonal().sqrt() + self.eps) / gramian.shape[0]


class LargestRow(Aggregator):
    """The row of largest norm, times ``scale`` (not Gramian-based)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def aggregate(self, matrix: Tensor) -> Tensor:
        return self.scale * matrix[matrix.norm(dim=1).argmax()]


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    register_aggregator("inverse_norm", weighting=InverseNorm)
    register_aggregator("largest_row", LargestRow)
    yield
    unregister_aggregator("inverse_norm")
    unregister_aggregator("largest_row")


@pytest.mark.parametrize(
    ("name", "kwargs", "engine"),
    [("inverse_norm", {"eps": 1e-6}, "autogram"), ("largest_row", {"scale": 0.5}, "autojac")],
)
def test_first_step_equals_hand_computation(tmp_path, name, kwargs, engine):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=NUM_LABELS))
    reference = copy.deepcopy(model)
    dataset = text_dataset("single")
    capture = GradCapture()
    trainer, _ = train(tmp_path, model, dataset, max_steps=1, callbacks=[capture], jd_aggregator=name.upper(),
                       jd_aggregator_kwargs=kwargs)  # fmt: skip
    assert trainer.args.jd_aggregator == name and trainer.jd_step.engine_kind == engine

    batch = collate(dataset, 0, 4)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    jacobian = explicit_jacobian(F.cross_entropy(logits, batch["labels"], reduction="none"), trainable(reference))
    expected = get_aggregator(name, **kwargs)(jacobian)
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)


def test_unregistered_names_and_bad_options_are_clear(tmp_path):
    with pytest.raises(ValueError, match="jd_aggregator_kwargs=.*not valid for aggregator 'inverse_norm'.*'bogus'"):
        JDTrainingArguments(output_dir=str(tmp_path), jd_aggregator="inverse_norm", jd_aggregator_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="jd_engine='autogram' needs a Gramian-based aggregator, but 'largest_row'"):
        JDTrainingArguments(output_dir=str(tmp_path), jd_aggregator="largest_row", jd_engine="autogram")
    unregister_aggregator("largest_row")
    try:
        with pytest.raises(ValueError, match="Unknown jd_aggregator 'largest_row'.*register_aggregator"):
            JDTrainingArguments(output_dir=str(tmp_path), jd_aggregator="largest_row")
    finally:
        register_aggregator("largest_row", LargestRow)


def test_an_aggregator_object_is_refused_with_the_way_to_use_it(tmp_path):
    with pytest.raises(ValueError, match=r"must be a string name, got InverseNorm.*register_aggregator"):
        JDTrainingArguments(output_dir=str(tmp_path), jd_aggregator=InverseNorm())  # type: ignore[arg-type]
