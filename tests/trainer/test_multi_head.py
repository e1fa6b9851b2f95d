"""Tests of hf_jd.trainer.multi_head: heads, masked losses, save/load, Trainer compatibility."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    BloomConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    T5Config,
    T5EncoderModel,
    Trainer,
    TrainingArguments,
    Wav2Vec2Config,
)

from hf_jd.trainer.multi_head import MultiHeadConfig, MultiHeadModel, default_pooling, normalize_head_spec

NAN = float("nan")


def bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        **kwargs,
    )


HEADS = {
    "topic": {"kind": "classification", "num_labels": 3},
    "score": {"kind": "regression", "num_outputs": 2},
    "ner": {"kind": "token_classification", "num_labels": 4},
    "tags": {"kind": "multilabel", "num_labels": 2},
}


@pytest.fixture
def model() -> MultiHeadModel:
    return MultiHeadModel.from_backbone(bert_config(), HEADS).eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(1, 100, (4, 6))
    attention_mask = torch.ones(4, 6, dtype=torch.long)
    attention_mask[1, 4:] = 0
    ner = torch.randint(0, 4, (4, 6))
    ner[1, 4:] = -100
    ner[2] = -100  # example 2 has no NER label
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels_topic": torch.tensor([0, 2, -100, 1]),
        "labels_score": torch.tensor([[0.5, -1.0], [NAN, NAN], [2.0, NAN], [1.0, 1.0]]),
        "labels_ner": ner,
        "labels_tags": torch.tensor([[1.0, 0.0], [NAN, NAN], [0.0, 0.0], [NAN, NAN]]),
    }


def manual_losses(logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, list[float | None]]:
    """Per-example losses with explicit loops (None: the example does not carry the label)."""
    out: dict[str, list[float | None]] = {task: [] for task in HEADS}
    for i in range(4):
        y = int(batch["labels_topic"][i])
        ce = None if y == -100 else float(F.cross_entropy(logits["topic"][i : i + 1], torch.tensor([y])))
        out["topic"].append(ce)
        errs = [
            float((logits["score"][i, j] - batch["labels_score"][i, j]) ** 2)
            for j in range(2)
            if not math.isnan(batch["labels_score"][i, j])
        ]
        out["score"].append(sum(errs) / len(errs) if errs else None)
        toks = [
            float(F.cross_entropy(logits["ner"][i, t : t + 1], batch["labels_ner"][i, t : t + 1]))
            for t in range(6)
            if batch["labels_ner"][i, t] != -100
        ]
        out["ner"].append(sum(toks) / len(toks) if toks else None)
        bce = [
            float(F.binary_cross_entropy_with_logits(logits["tags"][i, j], batch["labels_tags"][i, j]))
            for j in range(2)
            if not math.isnan(batch["labels_tags"][i, j])
        ]
        out["tags"].append(sum(bce) / len(bce) if bce else None)
    return out


def test_logits_come_from_pooler_and_tokens(model, batch):
    out = model(**batch)
    hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out.logits["topic"], model.heads["topic"][1](hidden.pooler_output))
    torch.testing.assert_close(out.logits["ner"], model.heads["ner"][1](hidden.last_hidden_state))
    assert out.logits["score"].shape == (4, 2)
    assert out.logits["tags"].shape == (4, 2)


def test_mean_losses_match_manual_computation(model, batch):
    out = model(**batch)
    expected = manual_losses({k: v.detach() for k, v in out.logits.items()}, batch)
    assert list(out.losses) == list(HEADS)
    for task, rows in expected.items():
        carried = [r for r in rows if r is not None]
        assert out.losses[task].item() == pytest.approx(sum(carried) / len(carried), rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.losses.values()) / 4, rel=1e-6)


def test_none_reduction_masks_missing_labels(model, batch):
    out = model(**batch, loss_reduction="none")
    expected = manual_losses({k: v.detach() for k, v in out.logits.items()}, batch)
    for task, rows in expected.items():
        assert out.losses[task].shape == (4,)
        want = torch.tensor([0.0 if r is None else r for r in rows])
        torch.testing.assert_close(out.losses[task].detach(), want, rtol=1e-5, atol=1e-6)
    mean_out = model(**batch)
    for task in HEADS:
        count = sum(r is not None for r in expected[task])
        torch.testing.assert_close(out.losses[task].sum() / count, mean_out.losses[task])


def test_jacobian_row_of_missing_label_is_zero(model, batch):
    model.train()  # dropout must not matter for a missing label
    out = model(**batch, loss_reduction="none")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.losses["topic"][2], params, allow_unused=True, retain_graph=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    grads = torch.autograd.grad(out.losses["topic"][0], params, allow_unused=True)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_task_without_any_label_in_batch_has_zero_loss(model, batch):
    batch["labels_topic"] = torch.full((4,), -100)
    out = model(**batch)
    assert out.losses["topic"].item() == 0.0
    assert not torch.isnan(out.loss)
    # the loss averages over the tasks carried by some example only
    others = [out.losses[t].item() for t in ("score", "ner", "tags")]
    assert out.loss.item() == pytest.approx(sum(others) / 3, rel=1e-6)
    out.losses["topic"].backward()
    assert torch.count_nonzero(model.heads["topic"][1].weight.grad) == 0


def test_only_given_labels_produce_losses(model, batch):
    out = model(input_ids=batch["input_ids"], labels_score=batch["labels_score"])
    assert list(out.losses) == ["score"]
    torch.testing.assert_close(out.loss, out.losses["score"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.loss is None and out.losses is None
    assert set(out.logits) == set(HEADS)


def test_task_id_is_accepted_and_ignored(model, batch):
    a = model(**batch)
    b = model(**batch, task_id=torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(a.loss, b.loss)


def test_single_classification_head_equals_bert_for_sequence_classification():
    reference = BertForSequenceClassification(bert_config(num_labels=3)).eval()
    model = MultiHeadModel.from_backbone(reference.bert, {"a": {"kind": "classification", "num_labels": 3}}).eval()
    model.heads["a"][1].load_state_dict(reference.classifier.state_dict())
    input_ids = torch.randint(1, 100, (5, 7))
    labels = torch.tensor([0, 1, 2, 1, 0])
    expected = reference(input_ids=input_ids, labels=labels)
    out = model(input_ids=input_ids, labels_a=labels)
    torch.testing.assert_close(out.logits["a"], expected.logits)
    torch.testing.assert_close(out.losses["a"], expected.loss)


def test_token_head_equals_bert_for_token_classification_with_equal_token_counts():
    reference = BertForTokenClassification(bert_config(num_labels=4)).eval()
    model = MultiHeadModel.from_backbone(reference.bert, {"t": {"kind": "token_classification", "num_labels": 4}})
    model.eval()
    model.heads["t"][1].load_state_dict(reference.classifier.state_dict())
    input_ids = torch.randint(1, 100, (3, 6))
    labels = torch.randint(0, 4, (3, 6))
    labels[:, 0] = -100  # same number of labelled tokens in every example
    labels[torch.arange(3), torch.tensor([2, 3, 5])] = -100
    expected = reference(input_ids=input_ids, labels=labels)
    out = model(input_ids=input_ids, labels_t=labels)
    torch.testing.assert_close(out.losses["t"], expected.loss)


def test_pooling_modes():
    heads = {
        "first": {"kind": "regression", "pooling": "first"},
        "last": {"kind": "regression", "pooling": "last"},
        "mean": {"kind": "regression", "pooling": "mean"},
    }
    gpt2 = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32, bos_token_id=1, eos_token_id=1)
    model = MultiHeadModel.from_backbone(gpt2, heads).eval()
    input_ids = torch.randint(1, 100, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right and left padding
    out = model(input_ids=input_ids, attention_mask=mask)
    hidden = model.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
    lin = {name: model.heads[name][1] for name in heads}
    torch.testing.assert_close(out.logits["first"], lin["first"](hidden[:, 0]))
    torch.testing.assert_close(out.logits["last"], lin["last"](torch.stack([hidden[0, 2], hidden[1, 4]])))
    means = torch.stack([hidden[0, :3].mean(0), hidden[1, 1:].mean(0)])
    torch.testing.assert_close(out.logits["mean"], lin["mean"](means))
    # GPT-2 has no pooler and causal attention: "auto" takes the last kept position, "pooler" is an error
    auto = MultiHeadModel.from_backbone(gpt2, {"a": {"kind": "regression"}}).eval()
    hidden = auto.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
    expected = auto.heads["a"][1](torch.stack([hidden[0, 2], hidden[1, 4]]))
    torch.testing.assert_close(auto(input_ids=input_ids, attention_mask=mask).logits["a"], expected)
    pooler = MultiHeadModel.from_backbone(gpt2, {"a": {"kind": "regression", "pooling": "pooler"}})
    with pytest.raises(ValueError, match="pooler_output"):
        pooler(input_ids=input_ids)


def test_backbone_inputs_it_does_not_accept_are_dropped():
    distil = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=100, max_position_embeddings=32)
    model = MultiHeadModel.from_backbone(distil, {"a": {"kind": "classification", "num_labels": 2}}).eval()
    input_ids = torch.randint(1, 100, (2, 5))
    a = model(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
    b = model(input_ids=input_ids)
    torch.testing.assert_close(a.logits["a"], b.logits["a"])


def test_token_type_ids_reach_a_backbone_that_accepts_them(model):
    input_ids = torch.randint(1, 100, (2, 5))
    a = model(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids)).logits["ner"]
    b = model(input_ids=input_ids, token_type_ids=torch.ones_like(input_ids)).logits["ner"]
    assert not torch.allclose(a, b)


def test_hidden_states_pass_through(model, batch):
    out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3


def test_save_and_load_round_trip(tmp_path, model, batch):
    model.save_pretrained(tmp_path)
    loaded = MultiHeadModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, MultiHeadConfig)
    assert loaded.config.heads == model.config.heads
    assert loaded.task_names == list(HEADS)
    a, b = model(**batch), loaded(**batch)
    for task in HEADS:
        torch.testing.assert_close(a.logits[task], b.logits[task])
        torch.testing.assert_close(a.losses[task], b.losses[task])
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(auto, MultiHeadModel)
    torch.testing.assert_close(auto(**batch).loss, a.loss)


def test_from_backbone_keeps_given_weights_and_accepts_config_forms():
    backbone = AutoModel.from_config(bert_config())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = MultiHeadModel.from_backbone(backbone, {"a": {"kind": "regression"}})
    assert model.backbone is backbone
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert model.config.backbone_config is backbone.config
    spec = {"model_type": "bert", **bert_config().to_diff_dict()}
    from_dict = MultiHeadModel.from_backbone(spec, {"a": {"kind": "regression"}})
    assert from_dict.backbone.config.hidden_size == 32
    direct = MultiHeadModel(bert_config(), {"a": {"kind": "regression"}})
    assert direct.config.task_names == ["a"] and direct.task_names == ["a"]
    positional = MultiHeadModel(backbone, {"a": {"kind": "regression"}})
    assert positional.backbone is backbone


def test_heads_are_normalised_with_defaults():
    spec = normalize_head_spec("x", {"kind": "regression"})
    assert spec == {"kind": "regression", "num_outputs": 1, "pooling": "auto", "dropout": None}
    model = MultiHeadModel.from_backbone(bert_config(), {"x": {"kind": "classification", "num_labels": 2}})
    assert model.label_names == ["labels_x"]
    assert model.heads["x"][0].p == pytest.approx(0.1)  # the backbone's hidden dropout


def test_regression_head_takes_one_dimensional_labels():
    model = MultiHeadModel.from_backbone(bert_config(), {"r": {"kind": "regression"}}).eval()
    input_ids = torch.randint(1, 100, (3, 4))
    target = torch.tensor([1.0, NAN, -2.0], dtype=torch.float64)
    out = model(input_ids=input_ids, labels_r=target, loss_reduction="none")
    pred = out.logits["r"].detach()[:, 0]
    want = torch.tensor([(pred[0] - 1.0) ** 2, 0.0, (pred[2] + 2.0) ** 2])
    torch.testing.assert_close(out.losses["r"].detach(), want)


def test_works_in_the_hugging_face_trainer(tmp_path):
    import datasets

    model = MultiHeadModel.from_backbone(
        bert_config(), {"a": {"kind": "classification", "num_labels": 2}, "b": {"kind": "regression"}}
    )
    n = 8
    data = datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(1, 100, (n, 5)).tolist(),
            "labels_a": [0, 1, -100, -100, 1, 0, -100, -100],
            "labels_b": [NAN, NAN, 0.5, 1.5, NAN, NAN, -1.0, 2.0],
            "task_id": [0, 0, 1, 1, 0, 0, 1, 1],
            "unused": ["x"] * n,
        }
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        report_to="none",
        use_cpu=True,
        label_names=model.label_names,
        save_strategy="no",
        logging_steps=1,
    )
    seen = {}

    def compute_metrics(prediction) -> dict[str, float]:
        seen["predictions"] = prediction.predictions
        seen["labels"] = prediction.label_ids
        return {}

    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=compute_metrics)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    # the predictions are the logits of every head (the task losses are not predictions)
    assert set(seen["predictions"]) == {"a", "b"}
    assert seen["predictions"]["a"].shape == (n, 2) and seen["predictions"]["b"].shape == (n, 1)
    assert [labels.shape for labels in seen["labels"]] == [(n,), (n,)]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("heads", "match"),
    [
        ({"a": {"kind": "ranking"}}, "kind"),
        ({"a": {"kind": "classification"}}, "num_labels"),
        ({"a": {"kind": "classification", "num_labels": 1}}, "num_labels >= 2"),
        ({"a": {"kind": "regression", "num_outputs": 0}}, "num_outputs"),
        ({"a": {"kind": "regression", "num_labels": 2}}, "num_outputs"),
        ({"a": {"kind": "classification", "num_labels": 2, "size": 3}}, "unknown keys"),
        ({"a": {"kind": "classification", "num_labels": 2, "pooling": "max"}}, "pooling"),
        ({"a": {"kind": "token_classification", "num_labels": 2, "pooling": "mean"}}, "does not pool"),
        ({"a": {"kind": "regression", "dropout": 1.5}}, "dropout"),
        ({"a.b": {"kind": "regression"}}, "identifier"),
        ({"train": {"kind": "regression"}}, "clashes"),
        ({"a": "classification"}, "must be a dict"),
        ({}, "at least one task head"),
    ],
)
def test_bad_heads_raise(heads, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MultiHeadModel.from_backbone(bert_config(), heads)


def test_bad_forward_inputs_raise(model, batch):
    with pytest.raises(ValueError, match="labels_<task>|labels_topic"):
        model(input_ids=batch["input_ids"], labels=batch["labels_topic"])
    with pytest.raises(ValueError, match="no task 'sentiment'"):
        model(input_ids=batch["input_ids"], labels_sentiment=batch["labels_topic"])
    with pytest.raises(ValueError, match="loss_reduction"):
        model(**batch, loss_reduction="sum")
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        model(input_ids=batch["input_ids"], labels_topic=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model(input_ids=batch["input_ids"], labels_topic=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="batch size"):
        model(input_ids=batch["input_ids"], labels_topic=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(input_ids=batch["input_ids"], labels_tags=torch.full((4, 2), 2.0))


def test_bad_constructor_arguments_raise():
    with pytest.raises(TypeError, match="from_backbone"):
        MultiHeadModel("bert-base-uncased", {"a": {"kind": "regression"}})
    with pytest.raises(ValueError, match="needs `heads`"):
        MultiHeadModel(bert_config())
    config = MultiHeadConfig(backbone_config=bert_config(), heads={"a": {"kind": "regression"}})
    with pytest.raises(ValueError, match="already part"):
        MultiHeadModel(config, {"a": {"kind": "regression"}})
    with pytest.raises(ValueError, match="backbone_config is None"):
        MultiHeadModel(MultiHeadConfig(heads={"a": {"kind": "regression"}}))
    with pytest.raises(TypeError, match="MultiHeadConfig"):
        MultiHeadModel(42)
    with pytest.raises(ValueError, match="model_type"):
        MultiHeadModel.from_backbone({"hidden_size": 32}, {"a": {"kind": "regression"}})
    with pytest.raises(TypeError, match="only used when the backbone is a name"):
        MultiHeadModel.from_backbone(bert_config(), {"a": {"kind": "regression"}}, revision="main")


def test_backbones_the_heads_cannot_read_are_rejected():
    """A task model's first output is its logits (the heads failed on a shape error), and AutoModel builds an
    encoder-decoder's decoder, which wants decoder inputs (it failed on every forward)."""
    heads = {"a": {"kind": "regression"}}
    with pytest.raises(ValueError, match=r"task model with a head of its own.*model.base_model.*BertModel"):
        MultiHeadModel.from_backbone(BertForSequenceClassification(bert_config()), heads)
    t5 = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=r"encoder-decoder.*T5EncoderModel\(config\)"):
        MultiHeadModel.from_backbone(t5, heads)
    model = MultiHeadModel.from_backbone(T5EncoderModel(t5), heads)  # (its encoder works)
    assert model(input_ids=torch.randint(0, 50, (2, 5)), labels_a=torch.randn(2)).losses["a"].isfinite()


@pytest.mark.parametrize("task", ["training", "_modules", "_parameters"])
def test_task_names_clashing_with_module_instance_attributes_are_rejected(task):
    # (they passed the check, which looked at the class only, then failed with "attribute 'training' already exists")
    with pytest.raises(ValueError, match=f"Task name '{task}' clashes"):
        normalize_head_spec(task, {"kind": "regression"})


def test_task_order_survives_save_and_load(tmp_path):
    heads = {"zeta": {"kind": "regression"}, "alpha": {"kind": "classification", "num_labels": 2}}
    model = MultiHeadModel.from_backbone(bert_config(), heads)
    model.save_pretrained(tmp_path)
    loaded = MultiHeadModel.from_pretrained(tmp_path)
    assert loaded.task_names == ["zeta", "alpha"]
    out = loaded(input_ids=torch.randint(1, 100, (2, 4)), labels_alpha=torch.tensor([0, 1]), labels_zeta=torch.zeros(2))
    assert list(out.losses) == ["zeta", "alpha"]
    with pytest.raises(ValueError, match="exactly once"):
        MultiHeadConfig(backbone_config=bert_config(), heads=heads, task_names=["zeta"])


def test_from_backbone_loads_a_saved_backbone_by_path(tmp_path):
    backbone = AutoModel.from_config(bert_config())
    backbone.save_pretrained(tmp_path)
    model = MultiHeadModel.from_backbone(str(tmp_path), {"a": {"kind": "regression"}})
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_bf16_autocast_gives_float32_losses(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, loss_reduction="none")
    assert out.loss.dtype == torch.float32
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss).all() for loss in out.losses.values())


def test_resized_embeddings_survive_save_and_load(tmp_path, model, batch):
    model.resize_token_embeddings(120)
    assert model.config.backbone_config.vocab_size == 120
    model.save_pretrained(tmp_path)
    loaded = MultiHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.get_input_embeddings().weight.shape == (120, 32)
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    model = MultiHeadModel.from_backbone(bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), HEADS)
    model.train()
    model(**batch).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    calls = []
    assert model.backbone.encoder.layer[0].gradient_checkpointing
    model.backbone.encoder.layer[0].intermediate.register_forward_hook(lambda *args: calls.append(1))
    model(**batch).loss.backward()
    assert len(calls) == 2  # the layer is recomputed in the backward pass
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name])


def test_minus_100_is_a_valid_regression_target_but_missing_for_multilabel():
    model = MultiHeadModel.from_backbone(
        bert_config(), {"r": {"kind": "regression"}, "m": {"kind": "multilabel", "num_labels": 2}}
    ).eval()
    input_ids = torch.randint(1, 100, (2, 4))
    out = model(
        input_ids=input_ids,
        labels_r=torch.tensor([-100.0, 1.0]),
        labels_m=torch.tensor([[-100.0, 1.0], [-100.0, -100.0]]),
        loss_reduction="none",
    )
    pred = out.logits["r"].detach()[:, 0]
    torch.testing.assert_close(out.losses["r"].detach(), torch.stack([(pred[0] + 100) ** 2, (pred[1] - 1) ** 2]))
    m = out.logits["m"].detach()
    want = F.binary_cross_entropy_with_logits(m[0, 1], torch.tensor(1.0))
    torch.testing.assert_close(out.losses["m"][0].detach(), want)
    assert out.losses["m"][1].item() == 0.0


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_audio_backbone_pools_over_its_frames(pooling):
    """Wav2Vec2 takes a mask over the input samples and outputs fewer frames: the heads pool with the frames' mask
    (the samples' mask failed with a size mismatch)."""
    from transformers import Wav2Vec2Config

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 3), num_conv_pos_embeddings=4,
                            num_conv_pos_embedding_groups=2, feat_extract_norm="layer")  # fmt: skip
    model = MultiHeadModel.from_backbone(config, {"a": {"kind": "regression", "pooling": pooling}}).eval()
    values = torch.randn(2, 96)
    mask = torch.ones(2, 96, dtype=torch.long)
    mask[1, 60:] = 0
    logits = model(input_values=values, attention_mask=mask).logits["a"]
    hidden = model.backbone(input_values=values, attention_mask=mask).last_hidden_state
    frames = model.backbone._get_feature_vector_attention_mask(hidden.shape[1], mask).float()
    assert frames[1].sum() < frames[0].sum()  # (the padded example has fewer frames)
    if pooling == "mean":
        pooled = (hidden * frames.unsqueeze(-1)).sum(1) / frames.sum(1, keepdim=True)
    else:
        pooled = hidden[torch.arange(2), frames.sum(1).long() - 1]
    torch.testing.assert_close(logits, model.heads["a"](pooled))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32), "last"),
        (LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=100), "last"),
        (BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=100), "last"),  # no is_causal attribute
        (bert_config(is_decoder=True), "last"),
        (DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=100), "first"),
        (Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=2), "mean"),
    ],
    ids=["gpt2", "llama", "bloom", "bert-decoder", "distilbert", "wav2vec2"],
)
def test_auto_pooling_suits_the_backbone(config, expected):
    model = MultiHeadModel.from_backbone(config, {"a": {"kind": "regression"}})
    assert default_pooling(model.backbone) == expected


def test_auto_pooling_of_a_backbone_with_a_pooler_is_its_pooler_output(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    torch.testing.assert_close(out.logits["topic"], model.heads["topic"][1](pooled))


def _t5_encoder() -> T5EncoderModel:
    return T5EncoderModel(T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, vocab_size=100))


@pytest.mark.parametrize(
    "make_backbone",
    [lambda: AutoModel.from_config(bert_config(), add_pooling_layer=False), _t5_encoder],
    ids=["bert-without-pooler", "t5-encoder"],
)
def test_a_given_backbone_is_rebuilt_alike_when_loaded(tmp_path, make_backbone):
    model = MultiHeadModel.from_backbone(make_backbone(), {"a": {"kind": "classification", "num_labels": 3}})
    model.eval().save_pretrained(tmp_path)
    loaded = MultiHeadModel.from_pretrained(tmp_path).eval()
    assert type(loaded.backbone) is type(model.backbone)
    assert {name for name, _ in loaded.named_parameters()} == {name for name, _ in model.named_parameters()}
    input_ids = torch.randint(1, 100, (2, 5))
    torch.testing.assert_close(loaded(input_ids=input_ids).logits["a"], model(input_ids=input_ids).logits["a"])


class _CustomBackbone(BertModel):
    pass


def test_a_backbone_class_outside_transformers_is_saved_by_module_path(tmp_path):
    model = MultiHeadModel.from_backbone(_CustomBackbone(bert_config()), {"a": {"kind": "regression"}})
    assert model.config.backbone_class == f"{__name__}:_CustomBackbone"
    model.save_pretrained(tmp_path)
    assert type(MultiHeadModel.from_pretrained(tmp_path).backbone) is _CustomBackbone


def test_a_saved_backbone_class_that_cannot_be_imported_is_a_clear_error(tmp_path, model):
    model.config.backbone_class = "no_such_module_xyz:Backbone"
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot be imported.*backbone="):
        MultiHeadModel.from_pretrained(tmp_path)
    # the documented way out: build the backbone and pass it
    loaded = MultiHeadModel.from_pretrained(tmp_path, backbone=AutoModel.from_config(bert_config()))
    assert type(loaded.backbone).__name__ == "BertModel"


def test_the_docstring_example_runs() -> None:
    import doctest

    import hf_jd.trainer.multi_head as multi_head

    result = doctest.testmod(multi_head, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
