"""JDTrainer as a new user tries it: default arguments (IWRM, UPGrad, autogram) on the standard task heads.

Tiny randomly initialised models built from configurations (no hub access), two or three optimizer steps each.
Every run must log finite losses and the ``jd/*`` keys and change the parameters; a few runs are compared with
the step computed by hand from explicit Jacobians, or with an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import transformers
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    TrainerCallback,
)

from hf_jd import JDTrainer, MultiHeadModel
from hf_jd.aggregation import get_aggregator

from jd_trainer_helpers import GradCapture, collate, count_per_row_passes, explicit_jacobian, make_args, trainable

VOCAB = 100
LENGTH = 8
NUM_LABELS = 3
_LAYERS = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


def tiny_config(model_type: str, **overrides: Any):
    """A two-layer configuration of width 32 for ``model_type``, without dropout."""
    if model_type == "gpt2":
        sizes = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "pad_token_id": 0,
                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}  # fmt: skip
    elif model_type in ("llama", "mistral", "qwen2"):
        sizes = {"hidden_size": 32, **_LAYERS, "num_key_value_heads": 2, "pad_token_id": 0}
    elif model_type == "opt":
        sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
                 "max_position_embeddings": 64, "word_embed_proj_dim": 32, "pad_token_id": 0,
                 "dropout": 0.0}  # fmt: skip
    elif model_type == "distilbert":
        sizes = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 64,
                 "dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0}  # fmt: skip
    elif model_type == "t5":
        sizes = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2, "dropout_rate": 0.0,
                 "decoder_start_token_id": 0, "pad_token_id": 0}  # fmt: skip
    elif model_type == "bart":
        sizes = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
                 "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                 "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0}  # fmt: skip
    elif model_type == "vit":
        sizes = {"hidden_size": 32, **_LAYERS, "image_size": 8, "patch_size": 4, "num_channels": 3,
                 "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip
        return AutoConfig.for_model("vit", **{**sizes, **overrides})
    else:  # BERT-like encoders
        sizes = {"hidden_size": 32, **_LAYERS, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        if model_type == "albert":
            sizes["embedding_size"] = 16
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, **{**sizes, **overrides})


def text_dataset(labels: str, n: int = 10, seed: int = 0) -> Dataset:
    """Random token ids with labels of the kind ``labels`` (learnable from the ids)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=generator)
    columns: dict[str, Any] = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    if labels == "single":
        columns["labels"] = (ids[:, 1] % NUM_LABELS).tolist()
    elif labels == "multi":
        columns["labels"] = (ids[:, 1:1 + NUM_LABELS] % 2).float().tolist()
    elif labels == "regression":
        columns["labels"] = (ids[:, 1].float() / VOCAB).tolist()
    elif labels == "token":
        columns["labels"] = (ids % NUM_LABELS).tolist()
    elif labels == "causal":
        columns["labels"] = ids.tolist()
    elif labels == "masked":
        masked = torch.full_like(ids, -100)
        masked[:, [2, 5]] = ids[:, [2, 5]]
        columns["labels"] = masked.tolist()
    elif labels == "seq2seq":
        columns["labels"] = torch.randint(3, VOCAB, (n, 5), generator=generator).tolist()
    else:
        raise AssertionError(labels)
    return Dataset.from_dict(columns)


def image_dataset(n: int = 10) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, 8, 8, generator=generator)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": [i % NUM_LABELS for i in range(n)]})


class LogRecorder(TrainerCallback):
    """Keeps every training log (the dicts passed to ``on_log``)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def train(tmp_path, model: nn.Module, dataset: Dataset, **kwargs: Any) -> tuple[JDTrainer, list[dict[str, float]]]:
    """Train ``model`` with the default JD options and return the trainer and its training logs."""
    recorder = LogRecorder()
    callbacks = [recorder, *kwargs.pop("callbacks", [])]
    eval_dataset = kwargs.pop("eval_dataset", None)
    compute_losses = kwargs.pop("compute_losses", None)
    args = make_args(tmp_path, **{"max_steps": 2, "learning_rate": 1e-2, "optim": "sgd", **kwargs})
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                        callbacks=callbacks, compute_losses=compute_losses)  # fmt: skip
    trainer.train()
    return trainer, recorder.logs


def assert_trained(
    before: list[torch.Tensor], model: nn.Module, logs: list[dict[str, float]], steps: int, weights_every: int = 1
) -> None:
    """Finite logged losses with the JD statistics, one log per step, and parameters that moved.

    The weights are logged on the steps that compute them (every ``weights_every`` steps, from step 0).
    """
    assert len(logs) == steps
    for step, log in enumerate(logs):
        assert math.isfinite(log["loss"]) and log["loss"] > 0
        assert log["jd/skipped_steps"] == 0
        has_weights = any(key.startswith("jd/weight_") for key in log)
        assert has_weights == (step % weights_every == 0), (step, log)
    changed = [not torch.equal(old, new.detach()) for old, new in zip(before, trainable(model))]
    assert any(changed)


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainable(model)]


# ---------------------------------------------------------------------------------- task heads, default options
SEQUENCE_MODELS = ["bert", "roberta", "distilbert", "albert", "deberta-v2", "electra", "gpt2", "llama", "qwen2"]
PROBLEMS = {
    "single": {"num_labels": NUM_LABELS},
    "multi": {"num_labels": NUM_LABELS, "problem_type": "multi_label_classification"},
    "regression": {"num_labels": 1},
}

# Every sequence classifier with single labels; multi-label and regression on one encoder, one decoder and
# one rotary model. The other combinations (every problem type on all nine, token classification and masked
# LM on the other encoders) also train; they are left out only to keep this file fast. The LLaMA causal LM is
# checked against the hand computation below.
CASES = (
    [(AutoModelForSequenceClassification, mt, "single") for mt in SEQUENCE_MODELS]
    + [(AutoModelForSequenceClassification, mt, p) for mt in ["bert", "gpt2", "llama"] for p in ["multi", "regression"]]
    + [(AutoModelForTokenClassification, mt, "token") for mt in ["deberta-v2", "llama"]]
    + [(AutoModelForMaskedLM, mt, "masked") for mt in ["bert", "albert"]]
    + [(AutoModelForCausalLM, mt, "causal") for mt in ["gpt2", "mistral", "qwen2", "opt"]]
    + [(AutoModelForSeq2SeqLM, mt, "seq2seq") for mt in ["t5", "bart"]]
)


@pytest.mark.parametrize(
    ("auto_class", "model_type", "labels"), CASES, ids=[f"{c.__name__[12:]}-{m}-{p}" for c, m, p in CASES]
)
def test_task_head_trains_with_defaults(tmp_path, auto_class, model_type, labels):
    overrides = PROBLEMS.get(labels, {"num_labels": NUM_LABELS} if labels == "token" else {})
    model = auto_class.from_config(tiny_config(model_type, **overrides))
    before = snapshot(model)
    trainer, logs = train(tmp_path, model, text_dataset(labels))
    assert trainer.jd_step.engine_kind == "autogram"
    assert_trained(before, model, logs, steps=2)
    assert all({"jd/weight_min", "jd/weight_max", "jd/weight_mean"} <= set(log) for log in logs)


def test_image_classification_trains_with_defaults(tmp_path):
    model = AutoModelForImageClassification.from_config(tiny_config("vit", num_labels=NUM_LABELS))
    before = snapshot(model)
    _, logs = train(tmp_path, model, image_dataset())
    assert_trained(before, model, logs, steps=2)


def _mixtral() -> nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0))


def _modernbert() -> nn.Module:
    return transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, num_labels=NUM_LABELS))


def _mamba() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference PyTorch kernels are used (mamba_ssm is not installed)
        return transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
            pad_token_id=0))


@pytest.mark.parametrize(
    ("build", "labels", "single_backward"),
    [(_mixtral, "causal", False), (_mixtral, "causal", True), (_modernbert, "single", False),
     (_mamba, "causal", True)],
    ids=["mixtral-moe", "mixtral-moe-single-backward", "modernbert", "mamba-single-backward"],
)
def test_newer_architectures_train(tmp_path, build, labels, single_backward):
    """A mixture of experts (tokens of several examples routed to the same expert), ModernBERT and Mamba (whose mixers
    use their convolution's weight without calling it)."""
    model = build()
    before = snapshot(model)
    trainer, logs = train(tmp_path, model, text_dataset(labels), jd_single_backward=single_backward)
    assert trainer.jd_step.engine_kind == "autogram"
    assert_trained(before, model, logs, steps=2)


# ---------------------------------------------------------------------------------- first step by hand
def _causal_losses(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none").mean(dim=1)


def _seq2seq_losses(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"]
    decoder_input_ids = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)  # T5: start token 0
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids
    ).logits
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)


@pytest.mark.parametrize(
    ("auto_class", "model_type", "labels", "losses_fn"),
    [
        (AutoModelForCausalLM, "llama", "causal", _causal_losses),
        (AutoModelForSeq2SeqLM, "t5", "seq2seq", _seq2seq_losses),
    ],
    ids=["llama-causal-lm", "t5-seq2seq"],
)
def test_first_step_equals_hand_computation(tmp_path, auto_class, model_type, labels, losses_fn):
    """The first update is UPGrad of the explicit Jacobian of the per-example losses (independent code)."""
    model = auto_class.from_config(tiny_config(model_type))
    reference = copy.deepcopy(model)
    dataset = text_dataset(labels)
    capture = GradCapture()
    train(tmp_path, model, dataset, max_steps=1, callbacks=[capture])

    reference.train()
    jacobian = explicit_jacobian(losses_fn(reference, collate(dataset, 0, 4)), trainable(reference))
    expected = get_aggregator("upgrad")(jacobian)
    assert not torch.allclose(expected, jacobian.mean(dim=0), rtol=1e-3, atol=1e-6)  # JD differs from the mean
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("single_backward", [False, True])
def test_mixture_of_experts_router_loss_first_step_equals_hand_computation(tmp_path, single_backward, monkeypatch):
    """With output_router_logits=True, every example's loss includes the batch's load-balancing term, which mixes the
    examples. The engine is given the examples' own losses and per-example pieces of the term instead (the term
    depends on the parameters through the router logits only), so that it takes no per-row pass (it did: Mixtral
    cost 19x a plain step at B=16)."""
    model = _mixtral()
    model.config.output_router_logits = True
    model.router_aux_loss_coef = model.config.router_aux_loss_coef = 0.5
    reference = copy.deepcopy(model)
    dataset = text_dataset("causal")
    capture = GradCapture()
    per_row = count_per_row_passes(monkeypatch)
    trainer, _ = train(tmp_path, model, dataset, max_steps=1, callbacks=[capture], jd_single_backward=single_backward)
    assert per_row == []
    assert trainer._loss_collector.shared_term is None  # (the split, holding the step's graph, is not kept)

    reference.train()
    batch = collate(dataset, 0, 4)
    outputs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = batch["labels"][:, 1:]
    lm_losses = F.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), targets, reduction="none").mean(dim=1)
    jacobian = explicit_jacobian(lm_losses + 0.5 * outputs.aux_loss, trainable(reference))
    torch.testing.assert_close(capture.grads[0], get_aggregator("upgrad")(jacobian), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_encoder_decoder_sequence_classifier_first_step_equals_hand_computation(tmp_path, model_type):
    """BART's and T5's classification heads build their decoder inputs from input_ids: the class labels must not be
    turned into decoder inputs (that failed, as for seq2seq LMs whose labels are decoder tokens)."""
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=NUM_LABELS))
    reference = copy.deepcopy(model)
    eos = model.config.eos_token_id
    dataset = text_dataset("single").map(lambda row: {"input_ids": [*row["input_ids"][:-1], eos]})
    capture = GradCapture()
    train(tmp_path, model, dataset, max_steps=1, callbacks=[capture])

    reference.train()
    batch = collate(dataset, 0, 4)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    jacobian = explicit_jacobian(F.cross_entropy(logits, batch["labels"], reduction="none"), trainable(reference))
    torch.testing.assert_close(capture.grads[0], get_aggregator("upgrad")(jacobian), rtol=1e-4, atol=1e-6)


def _choice_dataset(n: int = 8, choices: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, choices, LENGTH), generator=generator)
    return Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
        "labels": (ids[:, 0, 1] % choices).tolist(),
    })  # fmt: skip


@pytest.mark.parametrize("engine", ["autogram", "autojac", "single_backward"])
def test_multiple_choice_first_step_equals_hand_computation(tmp_path, engine):
    """BertForMultipleChoice runs on [B * C, T] rows (the autogram engine must not expand its [1, T, d]
    position embeddings to B rows): the first update is UPGrad of the explicit Jacobian of the
    per-example cross-entropies over the choices."""
    model = transformers.BertForMultipleChoice(tiny_config("bert"))
    reference = copy.deepcopy(model)
    dataset = _choice_dataset()
    capture = GradCapture()
    options = {"jd_single_backward": True} if engine == "single_backward" else {"jd_engine": engine}
    train(tmp_path, model, dataset, max_steps=1, callbacks=[capture], **options)

    reference.train()
    batch = collate(dataset, 0, 4)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    jacobian = explicit_jacobian(losses, trainable(reference))
    torch.testing.assert_close(capture.grads[0], get_aggregator("upgrad")(jacobian), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["autogram", "autojac"])
def test_fixed_size_weights_and_a_smaller_last_batch(tmp_path, engine):
    """Constant weights for 4 examples would fail on the last batch of 2: the error comes before training (it came at
    the end of the first epoch), says why and names dataloader_drop_last, with which the epoch then trains."""
    options = {"jd_aggregator": "constant", "jd_aggregator_kwargs": {"weights": [0.25] * 4}, "jd_engine": engine,
               "max_steps": -1, "num_train_epochs": 1}  # fmt: skip
    dataset = text_dataset("single", n=10)  # batches of 4, 4 and 2
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=NUM_LABELS))
    before = snapshot(model)
    message = r"(?s)10 examples.*last batch of each epoch has 2 examples.*4 weights.*dataloader_drop_last=True"
    with pytest.raises(ValueError, match=message):
        train(tmp_path / "kept", model, dataset, **options)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))  # (no step was taken)
    # Training stopped before the last batch: nothing to reject.
    train(tmp_path / "short", model, dataset, **{**options, "max_steps": 2})
    before = snapshot(model)
    _, logs = train(tmp_path / "dropped", model, dataset, dataloader_drop_last=True, **options)
    assert_trained(before, model, logs, steps=2)


@pytest.mark.parametrize(("aggregator", "kwargs"), [("gradvac", {}), ("upgrad", {"pref_vector": [1.0, 2.0, 1.0, 1.0]})])
def test_aggregators_sized_by_the_batch_rejected_before_training(tmp_path, aggregator, kwargs):
    """GradVac's state is sized on the first batch; a preference vector has the batch's length: both reject the last
    batch of 2, which the trainer finds before training."""
    dataset = text_dataset("single", n=10)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=NUM_LABELS))
    options = {"jd_aggregator": aggregator, "jd_aggregator_kwargs": kwargs, "max_steps": -1, "num_train_epochs": 1}
    with pytest.raises(ValueError, match=rf"(?s)last batch of each epoch has 2 examples.*'{aggregator}' rejects"):
        train(tmp_path, model, dataset, **options)


def _whisper() -> PreTrainedModel:
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=4, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=4,
        max_target_positions=16, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2,
        dropout=0.0)  # fmt: skip
    return transformers.WhisperForConditionalGeneration(config)


@pytest.mark.parametrize("single_backward", [False, True])
def test_speech_to_text_first_step_equals_hand_computation(tmp_path, single_backward):
    """Whisper has no prepare_decoder_input_ids_from_labels: the decoder inputs come from its module's
    shift_tokens_right, as in its forward with labels; the per-example loss is the mean token
    cross-entropy (labels -100 ignored)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(3, VOCAB, (8, 5), generator=generator)
    labels[0, -2:] = -100
    dataset = Dataset.from_dict({"input_features": torch.randn(8, 4, 8, generator=generator).tolist(),
                                 "labels": labels.tolist()})  # fmt: skip
    model = _whisper()
    reference = copy.deepcopy(model)
    capture = GradCapture()
    train(tmp_path, model, dataset, max_steps=1, callbacks=[capture], jd_single_backward=single_backward)

    reference.train()
    batch = collate(dataset, 0, 4)
    logits = reference(input_features=batch["input_features"], labels=batch["labels"]).logits  # shifts inside
    token = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    losses = token.sum(1) / (batch["labels"] != -100).sum(1)
    jacobian = explicit_jacobian(losses, trainable(reference))
    torch.testing.assert_close(capture.grads[0], get_aggregator("upgrad")(jacobian), rtol=1e-4, atol=1e-6)


def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    """SGD on a fixed batch of 4 examples: JD's non-conflicting steps lower the mean loss."""
    model = AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=NUM_LABELS))
    _, logs = train(tmp_path, model, text_dataset("single", n=4), max_steps=8, optim="sgd", learning_rate=0.2)
    losses = [log["loss"] for log in logs]
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------------- multi-task heads
HEADS = {"topic": {"kind": "classification", "num_labels": 2}, "score": {"kind": "regression"}}


def multitask_dataset(n: int = 10) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels_topic": (ids[:, 1] % 2).tolist(),
                              "labels_score": (ids[:, 2].float() / VOCAB).tolist()})  # fmt: skip


@pytest.mark.parametrize(
    ("model_type", "mode"), [("gpt2", "mtl"), ("distilbert", "mtl"), ("llama", "mtl"), ("llama", "iwmtl")]
)
def test_multi_head_model_trains(tmp_path, model_type, mode):
    model = MultiHeadModel.from_backbone(tiny_config(model_type), HEADS)
    before = snapshot(model)
    dataset = multitask_dataset()
    _, logs = train(tmp_path, model, dataset, jd_mode=mode, jd_task_names=list(HEADS), eval_dataset=dataset,
                    eval_strategy="steps", eval_steps=2)  # fmt: skip
    assert_trained(before, model, logs, steps=2)
    if mode == "iwmtl":
        assert all({"jd/weight_min", "jd/weight_max", "jd/weight_mean"} <= set(log) for log in logs)
    assert all({"jd/weight_topic", "jd/weight_score"} <= set(log) for log in logs)


# ---------------------------------------------------------------------------------- training options
def _bert():
    return AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=NUM_LABELS))


@pytest.mark.parametrize(
    ("options", "steps"),
    [
        ({"jd_engine": "autojac"}, 2),
        ({"per_device_train_batch_size": 1}, 2),
        ({"per_device_train_batch_size": 3}, 2),
        ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3}, 2),
        ({"max_steps": -1, "num_train_epochs": 1}, 3),  # 10 examples: batches of 4, 4 and 2
        ({"max_steps": -1, "num_train_epochs": 2, "jd_update_weights_every": 2}, 6),  # reused weights, batch of 2
        ({"max_steps": 4, "jd_update_weights_every": 2}, 4),
        ({"jd_modules": ["classifier*"]}, 2),
        ({"eval_strategy": "steps", "eval_steps": 1}, 2),
    ],
    ids=["autojac", "batch1", "batch3", "ga3", "last-small-batch", "last-small-batch-reuse", "reuse2",
         "modules-classifier", "eval-steps"],
)  # fmt: skip
def test_training_options(tmp_path, options, steps):
    model = _bert()
    before = snapshot(model)
    dataset = text_dataset("single")
    trainer, logs = train(tmp_path, model, dataset, eval_dataset=dataset, **options)
    assert_trained(before, model, logs, steps=steps, weights_every=options.get("jd_update_weights_every", 1))
    if "eval_strategy" in options:
        evaluations = [log for log in trainer.state.log_history if "eval_loss" in log]
        assert len(evaluations) == 2 and all(math.isfinite(log["eval_loss"]) for log in evaluations)


def test_last_smaller_batch_gets_its_own_weights(tmp_path):
    """The last batch of the epoch (2 of 10 examples) has 2 weights, the full batches 4."""
    capture = GradCapture()
    model = _bert()
    trainer, _ = train(tmp_path, model, text_dataset("single"), max_steps=-1, num_train_epochs=1, callbacks=[capture])
    assert trainer.jd_step.cached_weights.shape == (2,)
    assert len(capture.grads) == 3


def test_jd_modules_leave_other_parameters_a_weighted_gradient(tmp_path):
    """With jd_modules=['classifier*'] the backbone still trains (weighted gradient of the same weights)."""
    model = _bert()
    backbone_before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    classifier_before = model.classifier.weight.detach().clone()
    trainer, _ = train(tmp_path, model, text_dataset("single"), jd_modules=["classifier*"])
    assert trainer.jd_step.engine is not None
    assert {id(p) for p in trainer.jd_step.engine.parameters()} == {id(p) for p in model.classifier.parameters()}
    assert not torch.equal(model.classifier.weight, classifier_before)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, backbone_before)


def test_save_and_resume_match_an_uninterrupted_run(tmp_path):
    """GPT-2 classifier, jd_update_weights_every=2, checkpoints every 2 steps: resuming at step 2 gives the
    parameters of the uninterrupted 4-step run (the cached weights travel in the checkpoint)."""
    dataset = text_dataset("single", n=16)
    options = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "jd_update_weights_every": 2}
    torch.manual_seed(0)
    full = AutoModelForSequenceClassification.from_config(tiny_config("gpt2", num_labels=NUM_LABELS))
    initial = copy.deepcopy(full.state_dict())
    train(tmp_path / "full", full, dataset, **options)

    resumed = AutoModelForSequenceClassification.from_config(tiny_config("gpt2", num_labels=NUM_LABELS))
    resumed.load_state_dict(initial)
    args = make_args(tmp_path / "resumed", learning_rate=1e-2, optim="sgd", **options)
    trainer = JDTrainer(model=resumed, args=args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- torch.compile, seq2seq inputs
@pytest.mark.slow  # compiling the forward and backward graphs takes 10-20 s on CPU
def test_torch_compile_gives_the_uncompiled_updates(tmp_path):
    """torch_compile=True: the JD step differentiates the compiled graph twice (Gramian, then the weighted
    backward), which AOTAutograd's donated buffers forbid; the trainer keeps them, and the updates match."""
    config = tiny_config("bert", num_labels=NUM_LABELS, num_hidden_layers=1)
    model = AutoModelForSequenceClassification.from_config(config)
    reference = copy.deepcopy(model)
    dataset = text_dataset("single")
    captures = [GradCapture(), GradCapture()]
    train(tmp_path / "eager", reference, dataset, callbacks=[captures[0]])
    train(tmp_path / "compiled", model, dataset, torch_compile=True, callbacks=[captures[1]])
    assert len(captures[1].grads) == 2
    for eager, compiled in zip(*(capture.grads for capture in captures)):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_seq2seq_keeps_given_decoder_inputs(tmp_path):
    """A batch that already holds decoder_input_ids (e.g. from DataCollatorForSeq2Seq) is used as is."""
    model = AutoModelForSeq2SeqLM.from_config(tiny_config("t5"))
    dataset = text_dataset("seq2seq", n=4)
    seen = []
    model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    given = torch.full((4, 3), 7)
    dataset = dataset.add_column("decoder_input_ids", given.tolist())
    with pytest.raises(ValueError, match="Token-level losses need"):
        # The labels (length 5) do not fit the given decoder inputs (length 3): proof that they were not rebuilt.
        train(tmp_path, model, dataset, max_steps=1)
    torch.testing.assert_close(seen[0], given)


def test_encoder_decoder_without_label_shift_is_rejected():
    from types import SimpleNamespace

    from hf_jd.trainer._collect import LossCollector

    class EncoderDecoderForCausalLM(nn.Module):  # (a sequence-to-sequence LM by its name and configuration)
        config = SimpleNamespace(is_encoder_decoder=True)

        def forward(self, input_ids, decoder_input_ids=None):  # noqa: ANN001, ANN201
            raise AssertionError("not reached")

    model = EncoderDecoderForCausalLM()
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="decoder_input_ids"):
        LossCollector("iwrm", None, ["labels"])(model, model, inputs)


class WeightReusedOutside(nn.Module):
    """``inner.weight`` is also used by the parent's forward (``F.linear``), where no module hook sees it, and
    before the inner module's call (as by a user's lookup of ``inputs_embeds`` from a tied embedding), which the
    engine cannot tell from a use in an earlier forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        shifted = F.linear(x, self.inner.weight)
        return {"logits": torch.tanh(self.inner(x) + shifted).sum(dim=-1)}


def test_engine_limit_names_the_trainer_option(tmp_path):
    """When the autogram engine cannot follow a model, the error names the trainer option that works."""
    data = Dataset.from_dict({"x": torch.randn(8, 3).tolist(), "labels": [0.5, -1.0] * 4})

    def compute_losses(model, inputs):  # noqa: ANN001, ANN202
        outputs = model(inputs["x"])
        return (outputs["logits"] - inputs["labels"]) ** 2, outputs

    with pytest.raises((ValueError, RuntimeError), match="jd_engine='autojac'"):
        train(tmp_path / "autogram", WeightReusedOutside(), data, compute_losses=compute_losses)
    model = WeightReusedOutside()
    before = snapshot(model)
    _, logs = train(tmp_path / "autojac", model, data, compute_losses=compute_losses, jd_engine="autojac")
    assert_trained(before, model, logs, steps=2)


def _resnet() -> nn.Module:
    config = AutoConfig.for_model("resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                  num_labels=NUM_LABELS)
    return AutoModelForImageClassification.from_config(config)


def test_batch_norm_model_is_rejected_without_frozen_statistics(tmp_path):
    """The Trainer puts the model in training mode at every step, so putting the batch norms in evaluation mode
    beforehand does not last: the error names the option that does."""
    model = _resnet()
    model.eval()
    with pytest.raises(RuntimeError, match="BatchNorm2d.*jd_freeze_batch_norm=True"):
        train(tmp_path, model, image_dataset())


@pytest.mark.parametrize("single_backward", [False, True])
def test_frozen_batch_norm_statistics_train_and_equal_the_autojac_step(tmp_path, single_backward):
    """jd_freeze_batch_norm keeps every batch norm in evaluation mode while training: the running statistics stay
    as they were, and the first update equals the autojac engine's (which differentiates the same frozen norms)."""
    torch.manual_seed(0)
    model = _resnet()
    twin = copy.deepcopy(model)
    running = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = snapshot(model)
    grads, reference = GradCapture(), GradCapture()
    _, logs = train(tmp_path / "gram", model, image_dataset(), jd_freeze_batch_norm=True,
                    jd_single_backward=single_backward, callbacks=[grads])  # fmt: skip
    assert_trained(before, model, logs, steps=2)
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(old, new) for old, new in zip(running, after))
    train(tmp_path / "jac", twin, image_dataset(), jd_freeze_batch_norm=True, jd_engine="autojac",
          callbacks=[reference])  # fmt: skip
    torch.testing.assert_close(grads.grads[0], reference.grads[0], rtol=1e-4, atol=1e-6)
