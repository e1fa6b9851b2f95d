"""The engine on tiny randomly initialised Hugging Face models, against the explicit Jacobian
computed on the same forward graph (same dropout masks)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_jd.autogram import Engine

from ._reference import assert_gramian_matches, grads_of, jacobian, trainable

B, T, V = 3, 6, 50
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _ids(pad_last: bool = True) -> Tensor:
    ids = torch.randint(1, V, (B, T))
    if pad_last:
        ids[0, -2:] = 0
    return ids


def _sequence_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sequence mean next-token loss, ignoring labels -100."""
    shifted = logits[:, :-1].transpose(1, 2)
    targets = labels[:, 1:]
    token_losses = nn.functional.cross_entropy(shifted, targets, reduction="none", ignore_index=-100)
    return token_losses.sum(1) / (targets != -100).sum(1)


def test_bert_classifier_default_position_ids_with_dropout() -> None:
    config = BertConfig(vocab_size=V, max_position_embeddings=16, hidden_dropout_prob=0.2,
                        attention_probs_dropout_prob=0.2, num_labels=3, **SMALL)
    model = BertForSequenceClassification(config).train()
    engine = Engine(model)
    ids = _ids()
    mask = (ids != 0).long()
    logits = model(input_ids=ids, attention_mask=mask).logits
    losses = nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1]), reduction="none")
    params = trainable(model)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jac)
    weights = torch.tensor([0.2, 0.5, 0.3])
    losses.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def test_bert_input_ids_only() -> None:
    config = BertConfig(vocab_size=V, max_position_embeddings=16, num_labels=2, **SMALL)
    model = BertForSequenceClassification(config)
    engine = Engine(model)
    logits = model(_ids(pad_last=False)).logits
    losses = logits.logsumexp(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_gpt2_tied_embeddings_padding_labels() -> None:
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).train()
    assert model.lm_head.weight is model.transformer.wte.weight
    engine = Engine(model)
    ids = _ids()
    labels = ids.clone()
    labels[0, -2:] = -100
    losses = _sequence_losses(model(input_ids=ids).logits, labels)
    params = trainable(model)
    assert len(engine.parameters()) == len(params)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, params))


@pytest.mark.parametrize("tie", [False, True])
def test_llama_rmsnorm_rotary(tie: bool) -> None:
    config = LlamaConfig(vocab_size=V, max_position_embeddings=16, num_key_value_heads=1,
                         tie_word_embeddings=tie, **SMALL)
    model = LlamaForCausalLM(config)
    engine = Engine(model)
    ids = _ids(pad_last=False)
    losses = _sequence_losses(model(input_ids=ids).logits, ids)
    records = list(engine._capture.records)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    # LlamaRMSNorm went through the verified closed form.
    norms = [r for r in records if type(r.module).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(r.closed_form for r in norms)


def test_distilbert_classifier() -> None:
    config = DistilBertConfig(vocab_size=V, max_position_embeddings=16, dim=16, n_layers=2, n_heads=2,
                              hidden_dim=32, num_labels=2)
    model = DistilBertForSequenceClassification(config).train()
    engine = Engine(model)
    logits = model(input_ids=_ids()).logits
    losses = nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1]), reduction="none")
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_roberta_classifier() -> None:
    config = RobertaConfig(vocab_size=V, max_position_embeddings=20, num_labels=2, pad_token_id=1, **SMALL)
    model = RobertaForSequenceClassification(config)
    engine = Engine(model)
    ids = _ids(pad_last=False)
    ids[1, -2:] = 1
    logits = model(input_ids=ids, attention_mask=(ids != 1).long()).logits
    losses = logits.pow(2).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_vit_patch_embedding_and_cls_token() -> None:
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=3, **SMALL)
    model = ViTForImageClassification(config).train()
    engine = Engine(model)
    logits = model(pixel_values=torch.randn(B, 3, 8, 8)).logits
    losses = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]), reduction="none")
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(vocab_size=V, max_position_embeddings=16, **SMALL)
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head_a = nn.Linear(16, 2)
        self.head_b = nn.Linear(16, 1)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(input_ids=ids).last_hidden_state[:, 0]
        return self.head_a(hidden), self.head_b(hidden).squeeze(1)


def test_multi_task_losses_without_batch_dim() -> None:
    model = _TwoHeads()
    engine = Engine(model, batch_dim=None)
    logits, scores = model(_ids(pad_last=False))
    losses = torch.stack([
        nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1])),
        nn.functional.mse_loss(scores, torch.tensor([0.5, -1.0, 2.0])),
    ])
    params = trainable(model)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jac)
    weights = torch.tensor([0.7, 0.3])
    losses.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def test_multi_task_per_example_losses() -> None:
    model = _TwoHeads()
    engine = Engine(model)
    logits, scores = model(_ids(pad_last=False))
    losses = torch.stack([
        nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1]), reduction="none"),
        (scores - 1).pow(2),
    ], dim=1)  # [B, 2]
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_bf16_autocast_close_to_fp32() -> None:
    config = BertConfig(vocab_size=V, max_position_embeddings=16, num_labels=2, **SMALL)
    model = BertForSequenceClassification(config).eval()
    ids = _ids()
    engine = Engine(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(ids).logits.float().pow(2).sum(1)
    gramian = engine.compute_gramian(losses)
    assert gramian.dtype == torch.float32
    losses32 = model(ids).logits.pow(2).sum(1)
    reference = jacobian(losses32, trainable(model))
    expected = reference @ reference.T
    torch.testing.assert_close(gramian, expected, rtol=0.1, atol=0.05 * expected.abs().max().item())
    # And exactly the Gramian of the bf16 Jacobian, up to bf16 rounding of the products.
    exact = jacobian(losses, trainable(model))
    torch.testing.assert_close(gramian, exact @ exact.T, rtol=0.03, atol=0.01 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_enabled_engine_keeps_the_model_outputs(name: str) -> None:
    if name == "bert":
        model: nn.Module = BertForSequenceClassification(
            BertConfig(vocab_size=V, max_position_embeddings=16, num_labels=2, **SMALL)
        ).eval()
        inputs = {"input_ids": _ids()}
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, max_position_embeddings=16, **SMALL))
        inputs = {"input_ids": _ids(pad_last=False)}
    else:
        model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_labels=3, **SMALL)).eval()
        inputs = {"pixel_values": torch.randn(B, 3, 8, 8)}
    expected = model(**inputs).logits
    engine = Engine(model)
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    assert engine._capture.records
