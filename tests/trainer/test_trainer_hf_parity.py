"""JDTrainer keeps what transformers' Trainer does around its training step, and says what it changes.

- ``torch_empty_cache_steps`` clears the device cache as ``Trainer.training_step`` does;
- a ``compute_loss`` override (used for evaluation only) and a per-example mode with one row per
  micro-batch (packed sequences, ``per_device_train_batch_size=1``) are warned about;
- ``iwrm`` evaluation with label columns the model's forward does not declare gives the mean of the
  per-example losses of training;
- the ``Seq2SeqTrainer`` mixin trains by JD and predicts with ``generate``;
- ``iwmtl`` passes ``loss_reduction="none"`` only to a forward that declares it;
- gradient checkpointing errors name the configuration that works (autojac, non-reentrant);
- the ``task_id`` sampler's override of ``train_sampling_strategy`` and iterable datasets are warned about;
- ``label_smoothing_factor`` smooths the per-example losses of ``iwrm`` as the Trainer's ``LabelSmoother`` does.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DataCollatorWithFlattening,
    AutoModelForSequenceClassification,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)

import hf_jd.trainer.trainer as trainer_module
from hf_jd import JDTrainer, JDTrainingArguments

from jd_trainer_helpers import TASKS, TwoTaskNet, collate, make_args, tiny_bert, token_dataset, two_task_dataset
from test_zoo_trainer import text_dataset, tiny_config


def _messages(record: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


# ---------------------------------------------------------------------------- compute_loss override
class _WeightedTrainer(JDTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        labels = inputs.pop("labels")
        out = model(**inputs)
        loss = F.cross_entropy(out.logits, labels, weight=torch.tensor([100.0, 1.0, 1.0]))
        return (loss, out) if return_outputs else loss


def test_compute_loss_override_warns_that_training_ignores_it(tmp_path):
    args = make_args(tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match="overrides compute_loss, which JDTrainer uses for evaluation only.*"
                                         "compute_losses="):  # fmt: skip
        _WeightedTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    assert not _messages(record, "overrides compute_loss")


# ---------------------------------------------------------------------------- torch_empty_cache_steps
@pytest.mark.parametrize(("every", "expected"), [(None, 0), (1, 3), (2, 2)])
def test_torch_empty_cache_steps_clears_the_cache_like_the_trainer(tmp_path, monkeypatch, every, expected):
    calls: list[int] = []
    monkeypatch.setattr(trainer_module, "clear_device_cache", lambda *a, **k: calls.append(1), raising=False)
    args = make_args(tmp_path, max_steps=3, torch_empty_cache_steps=every, per_device_train_batch_size=2)
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(n=6))
    trainer.train()
    # Trainer.training_step clears at the global steps that are multiples of `every`: 0, 1, 2 or 0, 2.
    assert len(calls) == expected


# ---------------------------------------------------------------------------- one row per micro-batch
def _tiny_gpt2() -> nn.Module:
    return AutoModelForCausalLM.from_config(tiny_config("gpt2"))


def _causal_dataset(n: int = 8) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 100, (3 + i % 3,), generator=generator).tolist() for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def test_packed_sequences_warn_once_that_iwrm_has_one_row(tmp_path):
    args = make_args(tmp_path, max_steps=2, remove_unused_columns=False)
    trainer = JDTrainer(model=_tiny_gpt2(), args=args, train_dataset=_causal_dataset(),
                        data_collator=DataCollatorWithFlattening())  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    found = _messages(record, "one example per micro-batch")
    assert len(found) == 1  # once, not at every step
    assert "DataCollatorWithFlattening" in found[0] and "without Jacobian descent" in found[0]


def test_batch_size_one_warns_and_a_smaller_last_batch_does_not(tmp_path):
    args = make_args(tmp_path / "one", max_steps=2, per_device_train_batch_size=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(n=4)).train()
    found = _messages(record, "one example per micro-batch")
    assert len(found) == 1 and "per_device_train_batch_size=1" in found[0]

    # 5 examples in batches of 4: the last batch has one example, which is no reason to warn.
    args = make_args(tmp_path / "last", max_steps=2, per_device_train_batch_size=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(n=5)).train()
    assert not _messages(record, "one example per micro-batch")


def test_batch_size_one_with_accumulation_says_micro_batches_are_not_merged(tmp_path):
    """per_device_train_batch_size=1 with gradient accumulation (a common memory recipe) does not give a
    Jacobian over the accumulated examples: the warning says so and how to get one."""
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(n=4)).train()
    (found,) = _messages(record, "one example per micro-batch")
    assert "gradient_accumulation_steps=4" in found and "per_device_train_batch_size=4" in found
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(n=4)).train()
    (found,) = _messages(record, "one example per micro-batch")
    assert "gradient_accumulation_steps" not in found


def test_iwmtl_batch_size_one_warns_that_only_tasks_remain(tmp_path):
    args = make_args(tmp_path, jd_mode="iwmtl", jd_task_names=TASKS, max_steps=1, per_device_train_batch_size=1)
    with pytest.warns(UserWarning, match="one example per micro-batch.*only the tasks"):
        JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset(n=4)).train()


# ---------------------------------------------------------------------------- iwrm evaluation, other label names
def test_iwrm_evaluation_with_undeclared_label_names_uses_per_example_losses(tmp_path):
    dataset = token_dataset(n=8).rename_column("labels", "my_labels")
    model = tiny_bert()
    args = make_args(tmp_path, max_steps=1, label_names=["my_labels"], per_device_eval_batch_size=4)
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    metrics = trainer.evaluate()

    batch = collate(dataset, 0, 8)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits, batch["my_labels"], reduction="none").mean()
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)

    prediction = trainer.predict(dataset)
    torch.testing.assert_close(torch.as_tensor(prediction.predictions), logits)
    assert prediction.label_ids.tolist() == batch["my_labels"].tolist()


def test_iwrm_evaluation_with_declared_labels_keeps_the_models_own_loss(tmp_path):
    dataset = text_dataset("masked", n=8)  # MLM: the model's loss is a token mean, not a mean of examples
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_config(tiny_config("bert"))
    args = make_args(tmp_path, max_steps=1, per_device_eval_batch_size=8)
    trainer = JDTrainer(model=model, args=args, eval_dataset=dataset)
    metrics = trainer.evaluate()
    batch = collate(dataset, 0, 8)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
    # torch_compile=True wraps the model: its forward's signature is read through the wrapper.
    assert trainer._model_takes_labels(torch.compile(model), batch)


# ---------------------------------------------------------------------------- Seq2Seq mixin
@dataclass
class _Seq2SeqJDArguments(JDTrainingArguments, Seq2SeqTrainingArguments):
    pass


class _Seq2SeqJDTrainer(JDTrainer, Seq2SeqTrainer):
    pass


def test_seq2seq_mixin_trains_by_jd_and_predicts_with_generate(tmp_path):
    model = AutoModelForSeq2SeqLM.from_config(tiny_config("t5"))
    dataset = text_dataset("seq2seq", n=8)
    args = _Seq2SeqJDArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, predict_with_generate=True, generation_max_length=6, save_strategy="no",
        logging_steps=1, disable_tqdm=True, learning_rate=1e-2,
    )  # fmt: skip
    generated: list[int] = []
    original_generate = model.generate

    def counting_generate(*a: Any, **k: Any) -> Any:
        generated.append(1)
        return original_generate(*a, **k)

    model.generate = counting_generate
    trainer = _Seq2SeqJDTrainer(model=model, args=args, train_dataset=dataset)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("jd/weight_mean" in log for log in logs)  # the JD step ran
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    prediction = trainer.predict(dataset)
    assert generated  # Seq2SeqTrainer.prediction_step generated the predictions
    tokens = torch.as_tensor(prediction.predictions)
    assert tokens.dim() == 2 and tokens.shape[0] == 8 and not tokens.is_floating_point()
    assert prediction.metrics["test_loss"] > 0


# ---------------------------------------------------------------------------- iwmtl and **kwargs
class _StrictKwargsNet(TwoTaskNet):
    """Takes ``**kwargs`` but rejects every keyword it does not know (e.g. it forwards them to a backbone)."""

    def forward(self, x, labels_a=None, labels_b=None, **kwargs):  # noqa: ANN001, ANN201
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        return super().forward(x, labels_a, labels_b, loss_reduction="none")


def test_iwmtl_passes_loss_reduction_only_to_a_forward_that_declares_it(tmp_path):
    args = make_args(tmp_path, jd_mode="iwmtl", jd_task_names=TASKS, max_steps=1)
    trainer = JDTrainer(model=_StrictKwargsNet(), args=args, train_dataset=two_task_dataset(n=4))
    trainer.train()
    assert trainer.state.global_step == 1

    seen: list[Any] = []

    class Declares(TwoTaskNet):
        def forward(self, x, labels_a=None, labels_b=None, loss_reduction="mean"):  # noqa: ANN001, ANN201
            seen.append(loss_reduction)
            return super().forward(x, labels_a, labels_b, loss_reduction)

    args = make_args(tmp_path / "declares", jd_mode="iwmtl", jd_task_names=TASKS, max_steps=1)
    JDTrainer(model=Declares(), args=args, train_dataset=two_task_dataset(n=4)).train()
    assert seen == ["none"]


# ---------------------------------------------------------------------------- gradient checkpointing by hand
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_manual_reentrant_checkpointing_with_autogram_suggests_non_reentrant(tmp_path):
    model = tiny_bert()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = JDTrainer(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=token_dataset(n=4))
    with pytest.raises(RuntimeError, match="use_reentrant=True(.|\n)*Make the checkpointing non-reentrant"):
        trainer.train()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_manual_reentrant_checkpointing_with_autojac_suggests_non_reentrant(tmp_path):
    model = tiny_bert()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    args = make_args(tmp_path, max_steps=1, jd_engine="autojac")
    trainer = JDTrainer(model=model, args=args, train_dataset=token_dataset(n=4))
    suggestion = r"activation_checkpointing_enable\(activation_checkpointing_kwargs=\{'use_reentrant': False\}\)"
    with pytest.raises(RuntimeError, match=r"reentrant checkpointing rejects(.|\n)*" + suggestion):
        trainer.train()


# ---------------------------------------------------------------------------- task_id sampling
def _task_dataset() -> Dataset:
    return token_dataset(n=8).add_column("task_id", [0, 1] * 4)


def test_task_id_column_overrides_train_sampling_strategy_with_a_warning(tmp_path):
    args = make_args(tmp_path, train_sampling_strategy="sequential")
    with pytest.warns(UserWarning, match="train_sampling_strategy='sequential' is ignored.*task_id"):
        JDTrainer(model=tiny_bert(), args=args, train_dataset=_task_dataset())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        JDTrainer(model=tiny_bert(), args=make_args(tmp_path, train_sampling_strategy="random"),
                  train_dataset=_task_dataset())  # fmt: skip
    assert not _messages(record, "is ignored")


def test_iterable_dataset_with_task_id_warns_that_it_is_not_balanced(tmp_path):
    dataset = _task_dataset().to_iterable_dataset()
    args = make_args(tmp_path, max_steps=1, train_sampling_strategy="random")
    with pytest.warns(UserWarning, match="IterableDataset, so it is not sampled task by task"):
        trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 1


def test_loss_reduction_is_passed_through_compile_and_peft_wrappers() -> None:
    """torch_compile=True wraps the model in an OptimizedModule: a MultiHeadModel inside still gets
    loss_reduction="none" in iwmtl (it used to return mean task losses, shape [], and fail)."""
    from hf_jd import MultiHeadModel
    from hf_jd.trainer._collect import takes_loss_reduction

    model = MultiHeadModel.from_backbone(tiny_config("bert"), {"a": {"kind": "classification", "num_labels": 2}})
    assert takes_loss_reduction(model)
    assert takes_loss_reduction(torch.compile(model))  # compiled lazily: nothing runs here
    assert not takes_loss_reduction(torch.compile(nn.Linear(2, 2)))


def _sgd_options() -> dict[str, Any]:
    return {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1.0, "optim": "sgd",
            "max_grad_norm": 0.0, "lr_scheduler_type": "constant", "report_to": "none", "use_cpu": True,
            "save_strategy": "no", "disable_tqdm": True, "train_sampling_strategy": "sequential"}  # fmt: skip


def _jd_update(tmp_path, model: nn.Module, dataset: Dataset, smoothing: float) -> torch.Tensor:
    """The first update of JDTrainer with the mean (SGD, learning rate 1)."""
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    args = JDTrainingArguments(
        str(tmp_path / f"jd-{smoothing}"), label_smoothing_factor=smoothing, jd_aggregator="mean", **_sgd_options()
    )
    JDTrainer(model=model, args=args, train_dataset=dataset).train()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start


def test_label_smoothing_gives_the_plain_trainers_update_with_the_mean(tmp_path):
    """Sequence classification: with jd_aggregator='mean', one SGD step of JDTrainer equals the plain Trainer's with
    the same smoothing (its LabelSmoother), and differs from the unsmoothed step."""
    torch.manual_seed(0)
    initial = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=3))
    dataset = text_dataset("single", n=4)
    smoothed = _jd_update(tmp_path, copy.deepcopy(initial), dataset, 0.2)
    model = copy.deepcopy(initial)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    args = TrainingArguments(str(tmp_path / "plain"), label_smoothing_factor=0.2, **_sgd_options())
    Trainer(model=model, args=args, train_dataset=dataset).train()
    plain = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
    torch.testing.assert_close(smoothed, plain, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(smoothed, _jd_update(tmp_path, copy.deepcopy(initial), dataset, 0.0), atol=1e-4)


def test_label_smoothing_is_disabled_for_a_multi_label_classifier_as_the_trainer_does(tmp_path):
    """The Trainer warns that it disables label smoothing for a multi-label classifier and trains without it: so does
    JDTrainer (it failed at the first step), with the plain Trainer's update under the mean."""
    torch.manual_seed(0)
    config = tiny_config("bert", num_labels=3, problem_type="multi_label_classification")
    initial = AutoModelForSequenceClassification.from_config(config)
    dataset = text_dataset("multi", n=4)
    with pytest.warns(UserWarning, match="Disabling label smoothing"):
        jd = _jd_update(tmp_path, copy.deepcopy(initial), dataset, 0.2)
    model = copy.deepcopy(initial)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    args = TrainingArguments(str(tmp_path / "plain"), label_smoothing_factor=0.2, **_sgd_options())
    with pytest.warns(UserWarning, match="Disabling label smoothing"):
        Trainer(model=model, args=args, train_dataset=dataset).train()
    plain = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
    torch.testing.assert_close(jd, plain, rtol=1e-4, atol=1e-6)


def test_label_smoothing_of_a_causal_lm_equals_the_hand_computation(tmp_path):
    """Causal LM: the smoothed cross-entropy of the shifted labels, (1 - ε) NLL + ε mean over the vocabulary of
    -log p per token (the plain Trainer divides its sum by the unshifted token count instead, 0.875 of it here)."""
    torch.manual_seed(0)
    initial = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    dataset = text_dataset("causal", n=4)
    update = _jd_update(tmp_path, copy.deepcopy(initial), dataset, 0.2)
    reference = copy.deepcopy(initial).train()
    batch = collate(dataset, 0, 4)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = batch["labels"][:, 1:]
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = (0.8 * nll - 0.2 * log_probs.mean(dim=-1)).mean()
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    torch.testing.assert_close(update, -torch.cat([g.reshape(-1) for g in grads]), rtol=1e-4, atol=1e-6)


def test_ctc_speech_recognition_gives_the_plain_trainers_update_with_the_mean(tmp_path):
    """Wav2Vec2ForCTC on padded audio (its default summed CTC loss): with jd_aggregator='mean', one SGD step of
    JDTrainer in iwrm equals the plain Trainer's, and with UPGrad it is UPGrad of the explicit per-example Jacobian."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0,
        pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    initial = Wav2Vec2ForCTC(config)
    audio = torch.randn(4, 160)
    mask = torch.ones(4, 160, dtype=torch.long)
    mask[2, 96:] = 0
    audio[2, 96:] = 0.0
    labels = torch.tensor([[3, 4, 5, 4], [6, 7, -100, -100], [8, 8, 9, -100], [2, 5, 11, 1]])
    dataset = Dataset.from_dict(
        {"input_values": audio.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    ).with_format("torch")
    jd = _jd_update(tmp_path, copy.deepcopy(initial), dataset, 0.0)
    model = copy.deepcopy(initial)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    args = TrainingArguments(str(tmp_path / "plain"), **_sgd_options())
    Trainer(model=model, args=args, train_dataset=dataset).train()
    plain = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
    torch.testing.assert_close(jd, plain, rtol=1e-4, atol=1e-6)
    # UPGrad: the update is UPGrad of the explicit Jacobian of the per-example CTC losses.
    from hf_jd.aggregation import UPGrad
    from hf_jd.trainer.losses import ctc_logit_lengths, per_example_losses

    reference = copy.deepcopy(initial)
    inputs = {"input_values": audio, "attention_mask": mask}
    losses = per_example_losses(reference, reference(**inputs), labels,
                                logit_lengths=ctc_logit_lengths(reference, inputs))
    params = [p for p in reference.parameters() if p.requires_grad]
    jacobian = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses
    ])
    model = copy.deepcopy(initial)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    args = JDTrainingArguments(str(tmp_path / "upgrad"), jd_aggregator="upgrad", **_sgd_options())
    JDTrainer(model=model, args=args, train_dataset=dataset).train()
    update = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
    torch.testing.assert_close(update, -UPGrad()(jacobian), rtol=1e-3, atol=1e-6)
