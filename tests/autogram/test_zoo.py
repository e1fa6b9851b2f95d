"""The engine on a zoo of tiny randomly initialised Hugging Face architectures (GitHub issue 4).

Each model is built from a config (no hub access) and checked against ``J Jᵀ`` from the explicit
per-row gradients on the same forward graph (same dropout masks). The zoo covers parameters shared
across layers (ALBERT), relative-position tables that are not split by example (T5, MPNet,
DeBERTa-v2, Swin), regrouped ``[B * T, d]`` / ``[B * windows, ...]`` tensors (OPT, Swin), encoder-
decoders with shared embeddings (T5, BART, Marian, Whisper), alibi (Bloom, Falcon), rotary and
parallel residuals (GPT-J, GPT-NeoX, Phi), convolutional feature extractors with GroupNorm and
weight normalisation (Wav2Vec2), LayerNorm2d / depthwise convolutions / layer scale (ConvNeXt),
NoNorm (MobileBERT), pooling between blocks (Funnel), experts fed tokens of several examples (Mixtral), state-space
mixers passing their convolution's weight to a function (Mamba, Mamba2) and
hierarchical vision encoders (SegFormer, DINOv2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.autogram._dispatch import Kind

from ._reference import (
    assert_exact_step,
    assert_exact_step_with_freed_graph,
    assert_gramian_matches,
    count_per_row,
    count_started_at_uses,
    grads_of,
    jacobian,
    trainable,
)

V = 40
ENC = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
SEQ2SEQ = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16)

Inputs = Callable[[int, int, bool], dict[str, Tensor]]


def _text(pad_id: int = 0) -> Inputs:
    def make(batch: int, length: int, pad: bool) -> dict[str, Tensor]:
        ids = torch.randint(3, V, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad and batch > 1 and length > 2:
            ids[0, -2:] = pad_id
            mask[0, -2:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return make


def _seq2seq(batch: int, length: int, pad: bool) -> dict[str, Tensor]:
    inputs = _text()(batch, length, pad)
    inputs["decoder_input_ids"] = torch.randint(3, V, (batch, max(1, length - 1)))
    return inputs


def _pixels(batch: int, length: int, pad: bool) -> dict[str, Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 8, 8)}


def _video(batch: int, length: int, pad: bool) -> dict[str, Tensor]:
    return {"pixel_values": torch.randn(batch, 4, 3, 8, 8)}  # [B, frames, C, H, W]


def _audio(batch: int, length: int, pad: bool) -> dict[str, Tensor]:
    return {"input_values": torch.randn(batch, 64)}


def _mel(batch: int, length: int, pad: bool) -> dict[str, Tensor]:
    return {"input_features": torch.randn(batch, 4, 8), "decoder_input_ids": torch.randint(3, V, (batch, length))}


ZOO: dict[str, tuple[Callable[[], nn.Module], Inputs]] = {
    "albert": (lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(
        vocab_size=V, embedding_size=8, max_position_embeddings=16, **ENC)), _text()),
    "albert_inner_group": (lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(
        vocab_size=V, embedding_size=8, max_position_embeddings=16, inner_group_num=2, num_labels=3, **ENC)), _text()),
    "electra": (lambda: tf.ElectraForPreTraining(tf.ElectraConfig(
        vocab_size=V, embedding_size=8, max_position_embeddings=16, **ENC)), _text()),
    "deberta_v2": (lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        vocab_size=V, max_position_embeddings=16, relative_attention=True, position_buckets=4,
        max_relative_positions=8, pos_att_type=["p2c", "c2p"], num_labels=2, norm_rel_ebd="layer_norm",
        **ENC)), _text()),  # as the released DeBERTa-v2/v3 checkpoints
    "xlm_roberta": (lambda: tf.XLMRobertaForMaskedLM(tf.XLMRobertaConfig(
        vocab_size=V, max_position_embeddings=20, pad_token_id=1, **ENC)), _text(1)),
    "mpnet": (lambda: tf.MPNetForMaskedLM(tf.MPNetConfig(
        vocab_size=V, max_position_embeddings=20, pad_token_id=1, **ENC)), _text(1)),
    "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        decoder_start_token_id=0)), _seq2seq),
    "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=V, **SEQ2SEQ)), _seq2seq),
    "marian": (lambda: tf.MarianMTModel(tf.MarianConfig(
        vocab_size=V, pad_token_id=0, decoder_start_token_id=0, **SEQ2SEQ)), _seq2seq),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, **ENC)), _text()),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, **ENC)), _text()),
    "phi": (lambda: tf.PhiForCausalLM(tf.PhiConfig(
        vocab_size=V, max_position_embeddings=16, partial_rotary_factor=0.5, **ENC)), _text()),
    "gpt_neo": (lambda: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
        vocab_size=V, max_position_embeddings=16, hidden_size=16, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=1, eos_token_id=2)), _text()),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16)), _text(1)),
    "falcon_alibi": (lambda: tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, alibi=True)), _text()),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=16, n_layer=2, n_head=2)), _text()),
    "gptj": (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(
        vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, rotary_dim=4)), _text()),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=V, max_position_embeddings=16, rotary_pct=0.5, use_parallel_residual=True, **ENC)), _text()),
    "clip_text": (lambda: tf.CLIPTextModel(tf.CLIPTextConfig(
        vocab_size=V, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, **ENC)), _text()),
    "mobilebert": (lambda: tf.MobileBertForSequenceClassification(tf.MobileBertConfig(
        vocab_size=V, embedding_size=8, max_position_embeddings=16, intra_bottleneck_size=8, true_hidden_size=8,
        num_feedforward_networks=2, num_labels=2, **ENC)), _text()),
    "funnel": (lambda: tf.FunnelForSequenceClassification(tf.FunnelConfig(
        vocab_size=V, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32, num_decoder_layers=1,
        num_labels=2)), _text()),
    "whisper": (lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=V, num_mel_bins=4, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=4,
        max_target_positions=16, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)), _mel),
    "wav2vec2": (lambda: tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(
        vocab_size=V, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 3), feat_extract_norm="group",
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, mask_time_prob=0.0, num_labels=2,
        classifier_proj_size=8, **ENC)), _audio),
    "swin": (lambda: tf.SwinForImageClassification(tf.SwinConfig(
        image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2,
        num_labels=3)), _pixels),
    "gemma3": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, head_dim=8, sliding_window=4, **ENC)),
        _text()),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(
        vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, head_dim=8, **ENC)), _text()),
    "modernbert": (lambda: tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
        vocab_size=V, max_position_embeddings=16, pad_token_id=0, num_labels=2, global_attn_every_n_layers=2,
        local_attention=4, **ENC)), _text()),
    # Mixture of experts: each expert's Linear layers see tokens of several examples, gathered by the router.
    "mixtral_moe": (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
        **ENC)), _text()),
    "dinov2": (lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(
        image_size=8, patch_size=4, num_labels=3, **ENC)), _pixels),
    "segformer": (lambda: tf.SegformerForImageClassification(tf.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2],
        num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=3)), _pixels),
    # tubelet embedding: a Conv3d whose kernel is its stride (separate patches)
    "videomae": (lambda: tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(
        image_size=8, patch_size=4, num_frames=4, tubelet_size=2, num_labels=3, **ENC)), _video),
    # padding="valid" patch embedding
    "siglip_vision": (lambda: tf.SiglipForImageClassification(tf.SiglipConfig(vision_config=dict(
        image_size=8, patch_size=4, **ENC), text_config=dict(vocab_size=V, **ENC), num_labels=3)), _pixels),
    "convnext": (lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2, image_size=8,
        num_labels=3)), _pixels),
}


def _main_output(out: Any) -> Tensor:
    """The logits, else the last hidden state, else the first tensor of a model output."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    return out[0]


def per_example_losses(out: Any, batch: int) -> Tensor:
    """A nonlinear per-example loss of any model output: mean log-sum-exp over the last axis."""
    scores = _main_output(out).float()
    return scores.logsumexp(-1).reshape(batch, -1).mean(1)


def _check(model: nn.Module, inputs: dict[str, Tensor], batch: int, single_backward: bool = False) -> Engine:
    """One exact step of a fresh engine on ``model`` (returned, still hooked)."""
    engine = Engine(model, single_backward=single_backward)
    losses = per_example_losses(model(**inputs), batch)
    params = trainable(model)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jac)
    weights = torch.linspace(0.5, 1.5, batch)
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)
    return engine


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_train_mode_with_padding(name: str) -> None:
    build, make_inputs = ZOO[name]
    model = build().train()
    _check(model, make_inputs(3, 6, True), 3)


@pytest.mark.parametrize("name", ["albert", "t5", "opt", "swin", "funnel"])
def test_zoo_single_backward_eval_mode(name: str) -> None:
    build, make_inputs = ZOO[name]
    model = build().eval()
    _check(model, make_inputs(2, 5, True), 2, single_backward=True)


@pytest.mark.parametrize("name", ["t5", "mpnet", "swin"])
def test_zoo_single_example(name: str) -> None:
    build, make_inputs = ZOO[name]
    _check(build().train(), make_inputs(1, 5, False), 1)


@pytest.mark.parametrize("name", ["opt", "t5", "gpt_neox"])
def test_zoo_single_token(name: str) -> None:
    build, make_inputs = ZOO[name]
    _check(build().train(), make_inputs(3, 1, False), 3)


@pytest.mark.parametrize("name", ["t5", "swin"])
def test_zoo_task_losses_without_batch_dim(name: str) -> None:
    build, make_inputs = ZOO[name]
    model = build().train()
    engine = Engine(model, batch_dim=None)
    scores = _main_output(model(**make_inputs(3, 5, True))).float()
    losses = torch.stack([scores.logsumexp(-1).mean(), scores.pow(2).mean(), scores[0].tanh().sum()])
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses), jac)


@pytest.mark.parametrize("name", ["t5", "opt"])
def test_zoo_per_example_task_losses(name: str) -> None:
    build, make_inputs = ZOO[name]
    model = build().train()
    engine = Engine(model)
    scores = _main_output(model(**make_inputs(3, 5, True))).float()
    losses = torch.stack([scores.logsumexp(-1).mean(1), scores.pow(2).mean((1, 2))], dim=1)  # [B, 2]
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_zoo_frozen_layers(name: str) -> None:
    build, make_inputs = ZOO[name]
    model = build().train()
    frozen = 0
    for param_name, param in model.named_parameters():
        if "embed" in param_name or ".0." in param_name:
            param.requires_grad_(False)
            frozen += 1
    assert frozen > 0
    _check(model, make_inputs(3, 6, True), 3)


class _Siamese(nn.Module):
    """The same ALBERT encoder (itself reusing its layer) called twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        config = tf.AlbertConfig(vocab_size=V, embedding_size=8, max_position_embeddings=16, **ENC)
        self.encoder = tf.AlbertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(32, 1)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        first = self.encoder(input_ids=left).last_hidden_state[:, 0]
        second = self.encoder(input_ids=right).last_hidden_state[:, 0]
        return self.head(torch.cat([first, second], dim=1)).squeeze(1)


def test_zoo_encoder_called_twice() -> None:
    model = _Siamese().train()
    engine = Engine(model)
    left, right = torch.randint(3, V, (3, 5)), torch.randint(3, V, (3, 4))
    losses = model(left, right).pow(2)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _PerWindow(nn.Module):
    """A Linear applied to ``[B * T, d]`` rows, a bias table with no batch dimension: the engine
    must not treat the flattened rows as examples."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.table = nn.Embedding(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        flat = self.inner(x.reshape(batch * length, dim)).reshape(batch, length, dim)
        bias = self.table(torch.arange(length))  # [T, d], shared by all examples
        return (flat.tanh() + bias).sum(1)


def test_regrouped_and_unbatched_tensors_are_exact() -> None:
    model = _PerWindow()
    engine = Engine(model)
    losses = model(torch.randn(3, 5, 4)).pow(2).sum(1)
    records = list(engine._capture.records)
    assert [record.batched for record in records] == [False, False]
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.scale, (x * self.scale).sum(-1)


class _InPlaceAfterCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.two = _TwoOutputs()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        first, second = self.two(x)
        first += self.lin(x)  # in place on an output of a multi-output module with parameters
        return first.tanh().sum(-1) + second


def test_in_place_change_of_multi_output_module_is_rejected_with_its_name() -> None:
    model = _InPlaceAfterCall()
    engine = Engine(model)
    losses = model(torch.randn(3, 4)).pow(2)
    with pytest.raises(RuntimeError, match=r"two \(_TwoOutputs\) was modified in place"):
        engine.compute_gramian(losses)


def test_in_place_change_of_single_output_module_is_exact() -> None:
    """Falcon adds the attention output in place to its MLP's output (``mlp_output += attn``)."""
    build, make_inputs = ZOO["falcon_alibi"]
    model = build().train()
    assert model.config.parallel_attn  # the branch with the in-place addition
    _check(model, make_inputs(3, 6, True), 3)


def test_time_major_model_stays_exact_when_length_equals_batch() -> None:
    """XLNet runs [T, B, d] internally; once a step with T != B showed that, a later step with
    T == B (shapes alone would then look batch-major) still takes the exact path."""
    config = tf.XLNetConfig(vocab_size=V, d_model=16, n_layer=2, n_head=2, d_inner=32, num_labels=2)
    model = tf.XLNetForSequenceClassification(config).train()
    engine = Engine(model)
    params = trainable(model)
    for length in (5, 3):
        losses = per_example_losses(model(input_ids=torch.randint(3, V, (3, length))), 3)
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses), jac)


@pytest.mark.parametrize("name", ["opt", "swin"])
def test_batch_major_regrouping_is_verified_and_uses_closed_forms(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """OPT's [B * T, d] MLP rows and Swin's [B * windows, ...] projections pass the grouping check,
    so no call needs the per-row backward pass (whose cost grows with the batch)."""
    import hf_jd.autogram.engine as engine_module

    original = engine_module.grads_per_row

    def spy(losses: Tensor, layout: Any, records: list[Any], accumulator: Any) -> None:
        assert not any(record.groups for record in records), "a regrouped call fell back to the per-row path"
        original(losses, layout, records, accumulator)

    monkeypatch.setattr(engine_module, "grads_per_row", spy)
    build, make_inputs = ZOO[name]
    _check(build().train(), make_inputs(3, 6, True), 3)


class _TimeMajorRows(nn.Module):
    """A Linear on time-major rows ``[T * B, d]``: row ``t * B + i`` belongs to example ``i``, so
    the batch-major grouping that the shapes allow (T = k B) is wrong and must be rejected."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        rows = x.transpose(0, 1).reshape(length * batch, dim)
        rows = self.norm(self.inner(rows)).tanh()
        return rows.reshape(length, batch, dim).pow(2).sum((0, 2))


@pytest.mark.parametrize("length", [2, 3, 5])
def test_time_major_rows_fail_the_grouping_check_and_stay_exact(length: int) -> None:
    model = _TimeMajorRows()
    engine = Engine(model)
    losses = model(torch.randn(3, length, 4))
    records = list(engine._capture.records)
    assert [record.groups for record in records] == [length, length]  # candidates, to be rejected
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _ExampleMixer(nn.Module):
    """``mix`` is applied across the batch (its input is ``[features, B]``), so every loss depends
    on every example, also through ``proj``, whose tensors are nevertheless shaped ``[B, ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.mix = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(self.proj(x).T).T.sum(dim=-1)


def test_layer_applied_across_the_batch_gives_the_exact_gramian() -> None:
    """Reported by the trainer zoo: the Gramian used to be silently wrong here. Calls that are
    not split by example trigger the grouping check of all calls, which ``proj`` fails."""
    model = _ExampleMixer()
    engine = Engine(model)
    losses = model(torch.randn(4, 3)) ** 2
    assert [record.batched for record in engine._capture.records] == [True, False]
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_single_token_first_step_keeps_closed_forms_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """With T = 1 the position embedding output [1, 1, d] is ambiguous (a [T, B, d] tensor with T = 1?);
    whatever path it takes must not stick to later steps with T > 1, where the shared [1, T, d] table gets
    its per-example gradients from the addition that broadcasts it, not from the (slow) per-row pass."""
    import hf_jd.autogram.engine as engine_module

    per_row: list[str] = []
    original = engine_module.grads_per_row

    def recorded(losses: Tensor, layout: Any, records: list[Any], accumulator: Any) -> None:
        per_row.extend(record.describe() for record in records)
        original(losses, layout, records, accumulator)

    monkeypatch.setattr(engine_module, "grads_per_row", recorded)
    config = tf.BertConfig(vocab_size=V, max_position_embeddings=16, **ENC)
    model = tf.BertModel(config, add_pooling_layer=False).train()
    engine = Engine(model)
    params = trainable(model)
    for length in (1, 5, 5):
        per_row.clear()
        out = model(input_ids=torch.randint(3, V, (3, length)))
        losses = per_example_losses(out, 3)
        assert not all(record.batched for record in engine._capture.records)  # the table is shared, unexpanded
        assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, params))
        if length > 1:
            assert per_row == []


class _TupleWithBroadcast(nn.Module):
    """A module with parameters of its own returning a batch-broadcast tensor inside a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 4))

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.table[positions]  # [1, T, d]
        return rows, rows.sum(-1)


class _UsesTupleBroadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.positions = _TupleWithBroadcast()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        rows, sums = self.positions(torch.arange(x.shape[1]).unsqueeze(0))
        return (self.lin(x + rows).tanh().sum(-1) * sums).sum(-1)


def test_broadcast_tensor_in_a_tuple_output_is_exact() -> None:
    model = _UsesTupleBroadcast()
    engine = Engine(model)
    losses = model(torch.randn(3, 5, 4)).pow(2)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_zoo_batch_norm_model_is_rejected() -> None:
    model = tf.ResNetForImageClassification(tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)).train()
    Engine(model)
    with pytest.raises(RuntimeError, match=r"BatchNorm2d.*statistics across the batch"):
        model(**_pixels(3, 0, False))


@pytest.mark.parametrize("single_backward", [False, True])
def test_zoo_batch_norm_model_with_frozen_statistics(single_backward: bool) -> None:
    """ResNet fine-tuned with its batch norms in evaluation mode (the usual way, and the rejection's advice): their
    affine parameters take the closed form from the running statistics (the generic path was 6x a plain step)."""
    from hf_jd.autogram._dispatch import Kind

    torch.manual_seed(0)
    model = tf.ResNetForImageClassification(tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)).train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
            module.eval()
    engine = _check(model, _pixels(3, 0, False), 3, single_backward)
    kinds = {info.kind for info in engine._capture.infos.values() if isinstance(info.module, nn.BatchNorm2d)}
    assert kinds == {Kind.BATCH_NORM}


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_zoo_mamba_mixers_borrow_their_convolution(
    name: str, single_backward: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mamba's mixers pass their ``conv1d.weight`` to a convolution function instead of calling ``conv1d`` (this
    raised): the mixer borrows it after the first step, without a warning. Exact over steps of different batch
    sizes. Their products then start at the operations using their parameters (the convolution, Mamba's product
    with ``dt_proj.weight`` on ``[B * T, r]`` rows, the elementwise ``A_log``, ``D`` and biases), not back through
    the selective scan."""
    started = count_started_at_uses(monkeypatch)
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(name, vocab_size=V, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
                                     conv_kernel=3, time_step_rank=4, num_heads=4, head_dim=8, n_groups=1,
                                     chunk_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference PyTorch kernels are used (mamba_ssm is not installed)
        model = tf.AutoModelForCausalLM.from_config(config)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (no warning about parameters used outside their calls)
        for batch in (2, 3, 3):
            model.zero_grad(set_to_none=True)
            losses = per_example_losses(model(**_text()(batch, 5, False)), batch)
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert started[-1] == ["backbone.layers.0.mixer"]


def _time_major_or_batch_major_lm(name: str) -> nn.Module:
    """XLNet (time-major [T, B, d] inside) or BERT (batch-major), as tiny LMs in training mode."""
    if name == "xlnet":
        model = tf.XLNetLMHeadModel(tf.XLNetConfig(vocab_size=V, d_model=16, n_layer=2, n_head=2, d_inner=32))
    else:
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=V, max_position_embeddings=16, **ENC))
    return model.train()


@pytest.mark.parametrize(("name", "batch"), [("xlnet", 4), ("bert", 5)])
def test_zoo_length_equal_to_batch_size(name: str, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors [T, B, d] (XLNet is time-major) or [B, T, d] with T = B: the layout cannot be read off
    the shapes, so the grouping by example is verified (one extra batched pass) and, for XLNet, the
    exact per-row path is taken: exact either way. The layout is the model's: a later step with the
    same coincidence is not verified again (XLNet's time-major calls then take the exact path). BERT's
    first step, with T != B, is verified too: the first step of each loss computation is."""
    from hf_jd.autogram import engine as engine_module

    verified: list[int] = []
    original = engine_module.grads_verified
    monkeypatch.setattr(engine_module, "grads_verified", lambda *a, **k: verified.append(1) or original(*a, **k))
    model = _time_major_or_batch_major_lm(name)
    engine = Engine(model)
    params = trainable(model)
    if name == "bert":  # a first step with T != B shows the [1, T, d] position embeddings broadcast
        losses = per_example_losses(model(**_text()(batch, batch + 2, True)), batch)
        assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, params))
        assert len(verified) == 1  # the first step of a loss computation checks that no example is mixed
        model.zero_grad()
    for step in range(2):
        torch.manual_seed(step)
        losses = per_example_losses(model(**_text()(batch, batch, True)), batch)
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses), jac)
        assert len(verified) == (2 if name == "bert" else step + 1)
        model.zero_grad()


@pytest.mark.parametrize("single_backward", [False, True])
def test_bert_first_step_with_length_equal_to_batch_is_exact(single_backward: bool) -> None:
    """[1, T, d] position embeddings with T = B on the very first step look like a time-major
    [T, B, d] tensor with T = 1: the exact paths, and exact."""
    model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, max_position_embeddings=16, **ENC)).train()
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    losses = per_example_losses(model(**_text()(4, 4, True)), 4)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)


@pytest.mark.parametrize("single_backward", [False, True])
def test_time_major_model_with_one_token(single_backward: bool) -> None:
    """XLNet is time-major: with T = 1 its [1, B, d] tensors are not outputs broadcast over the batch
    (expanding them to [B, B, d], as the engine once did, broke its forward pass)."""
    config = tf.XLNetConfig(vocab_size=V, d_model=16, n_layer=2, n_head=2, d_inner=32, num_labels=2)
    model = tf.XLNetForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    for length in (1, 4):
        losses = per_example_losses(model(input_ids=torch.randint(3, V, (3, length))), 3)
        assert_exact_step(engine, losses, trainable(model), single_backward)
        model.zero_grad()


@pytest.mark.parametrize("single_backward", [False, True])
def test_multiple_choice_regroups_the_batch(single_backward: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """BertForMultipleChoice runs on [B * C, T] rows while its inputs are [B, C, T]: the [1, T, d]
    position embeddings are broadcast over B * C rows, not B (expanding them to B, as the engine once
    did, crashed the forward pass); the Gramian is exact."""
    model = tf.BertForMultipleChoice(tf.BertConfig(vocab_size=V, max_position_embeddings=16, **ENC)).train()
    engine = Engine(model, single_backward=single_backward)
    per_row = count_per_row(monkeypatch)
    for _ in range(2):  # (the grouping is verified on the first step, then trusted)
        model.zero_grad(set_to_none=True)
        ids = torch.randint(3, V, (4, 3, 6))
        logits = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        losses = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]), reduction="none")
        assert_exact_step(engine, losses, trainable(model), single_backward)
    # The word and token-type embeddings' [B * C, T] ids are regrouped by example too (they took the per-row path).
    assert per_row == []


def test_multiple_choice_with_a_context_shared_by_the_choices() -> None:
    """The usual multiple-choice layout: every choice repeats the example's context, so the pooler sees nearly equal
    inputs per example while the softmax over the choices makes its output gradients sum to zero. The Gramian of the
    float32 model must match the float64 model's Jacobian (its ghost form lost the entries to float32 rounding)."""
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=V, max_position_embeddings=32, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    model = tf.BertForMultipleChoice(config).eval()
    reference = tf.BertForMultipleChoice(config).double().eval()
    reference.load_state_dict(model.state_dict())
    context = torch.randint(5, V, (4, 1, 19)).expand(4, 3, 19)
    ids = torch.cat([context, torch.randint(5, V, (4, 3, 4))], dim=-1)
    labels = torch.tensor([0, 1, 2, 0])
    engine = Engine(model)
    gramian = engine.compute_gramian(nn.functional.cross_entropy(model(input_ids=ids).logits, labels, reduction="none"))
    losses = nn.functional.cross_entropy(reference(input_ids=ids).logits, labels, reduction="none")
    assert_gramian_matches(gramian.double(), jacobian(losses, trainable(reference)), rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("single_backward", [False, True])
def test_wav2vec2_with_padding_mask_and_spec_augment(single_backward: bool) -> None:
    """Wav2Vec2 zeroes the padded frames of a Linear projection's output in place and SpecAugment
    writes its mask embedding into it (``hidden_states[mask] = ...``): the gradients w.r.t. the
    output as the Linear returned it are still those of the autograd graph."""
    config = tf.Wav2Vec2Config(
        vocab_size=V, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 3), feat_extract_norm="layer",
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, mask_time_prob=0.5, mask_time_length=2,
        num_labels=2, classifier_proj_size=8, do_stable_layer_norm=True, **ENC)  # fmt: skip
    model = tf.Wav2Vec2ForSequenceClassification(config).train()
    mask = torch.ones(3, 96, dtype=torch.long)
    mask[0, 60:] = 0
    _check(model, {"input_values": torch.randn(3, 96), "attention_mask": mask}, 3, single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_wavlm_gated_relative_attention_takes_no_per_row_pass(
    single_backward: bool, per_row_calls: list[str]
) -> None:
    """WavLM's attention passes its q/k/v/out weights to ``F.multi_head_attention_forward`` (time-major ``[T * B,
    d]`` rows) and returns its ``[B, T, d]`` states beside the ``[B * heads, T, T]`` position bias it hands to the
    next layer: a generic call whose outputs have different rows per example. Its grouping by example is verified
    (it took the per-row pass, a batched backward over all loss rows, on every step before): exact, and after the
    steps that find its borrowed weights, no per-row pass."""
    torch.manual_seed(0)
    config = tf.WavLMConfig(
        vocab_size=V, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 3), feat_extract_norm="layer",
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, mask_time_prob=0.0, num_labels=3,
        classifier_proj_size=8, num_buckets=8, max_bucket_distance=16, **ENC)  # fmt: skip
    model = tf.WavLMForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    mask = torch.ones(10, 96, dtype=torch.long)
    mask[0, 60:] = 0
    for _ in range(4):
        per_row_calls.clear()
        model.zero_grad(set_to_none=True)
        logits = model(input_values=torch.randn(10, 96), attention_mask=mask).logits
        losses = nn.functional.cross_entropy(logits, torch.arange(10) % 3, reduction="none")
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert per_row_calls == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_deberta_v2_relative_table_used_without_its_module(single_backward: bool) -> None:
    """With norm_rel_ebd='none' DeBERTa-v2 uses rel_embeddings.weight directly (dropout, then the
    projections), which no record covers: its per-example gradients come from the ordinary pass, at the operations
    that broadcast its projections over the batch (see test_parameter_record.py), without a warning."""
    model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        vocab_size=V, max_position_embeddings=16, relative_attention=True, position_buckets=4,
        max_relative_positions=8, pos_att_type=["p2c", "c2p"], num_labels=2, norm_rel_ebd="none", **ENC)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(model, _text()(3, 6, True), 3, single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_longt5_local_attention_with_batch_size_equal_to_block_length(single_backward: bool) -> None:
    """LongT5's local attention looks up a [block_len, 3 block_len] table of relative buckets inside the
    model; with B = block_len on the first step its output [block_len, 3 block_len, heads] looked split by
    example (silently wrong). Ids that share no length with the root inputs are taken for a table."""
    config = tf.LongT5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                             num_heads=2, local_radius=2, encoder_attention_type="local", decoder_start_token_id=0,
                             dropout_rate=0.0)  # fmt: skip
    model = tf.LongT5ForConditionalGeneration(config).train()
    engine = Engine(model, single_backward=single_backward)
    ids, labels = torch.randint(3, V, (3, 10)), torch.randint(3, V, (3, 4))  # B = 3 = local_radius + 1
    logits = model(input_ids=ids, labels=labels).logits
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
    assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize(("name", "batch"), [("xlnet", 4), ("bert", 5)])
def test_per_example_task_losses_with_length_equal_to_batch_size(name: str, batch: int) -> None:
    """[B, m] losses on a first step with T = B: XLNet's time-major [T, B, d] tensors look batch-major;
    the grouping is verified (per-example weights, the same for every task) before the batched pass
    over the tasks (it used to be caught only by the first-step check of JDTrainer)."""
    model = _time_major_or_batch_major_lm(name)
    engine = Engine(model)
    logits = model(**_text()(batch, batch, True)).logits
    losses = torch.stack([logits.logsumexp(-1).mean(1), logits[..., :3].pow(2).mean((1, 2))], dim=1)
    assert_exact_step(engine, losses, trainable(model), single_backward=False)


@pytest.mark.parametrize(("name", "classes"), [
    ("t5", {"T5LayerNorm": Kind.RMS_NORM}),  # an RMS norm whose name says LayerNorm
    ("gemma3", {"Gemma3RMSNorm": Kind.RMS_NORM, "Gemma3TextScaledWordEmbedding": Kind.EMBEDDING}),  # (1 + w), W[ids]·c
    ("bart", {"BartScaledWordEmbedding": Kind.EMBEDDING}),
    ("falcon_alibi", {"FalconLinear": Kind.LINEAR}),  # an nn.Linear subclass computing x @ W.T + b
])
def test_custom_classes_take_their_verified_closed_forms(name: str, classes: dict[str, Kind]) -> None:
    """Subclasses and look-alikes of the stock layers get the closed forms once their first call verifies
    them (the Gramian stays exact either way: the zoo tests above)."""
    build, make_inputs = ZOO[name]
    torch.manual_seed(0)
    model = build().train()
    engine = Engine(model)
    model(**make_inputs(3, 6, True))
    kinds = {type(info.module).__name__: info.kind for info in engine._capture.infos.values()}
    for cls, kind in classes.items():
        assert kinds[cls] is kind, (cls, kinds[cls])
    losses = per_example_losses(model(**make_inputs(3, 6, True)), 3)
    norms = [r for r in engine._capture.records if type(r.module).__name__ in classes and hasattr(r, "closed_form")]
    engine.compute_gramian(losses)
    assert all(r.closed_form for r in norms)  # verified on the tensors, not only chosen by class
