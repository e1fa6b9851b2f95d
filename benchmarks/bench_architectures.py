"""Speed and memory of the autogram IWRM step across architectures (tiny random configurations).

For each model: a plain mean-loss step, hf_jd's two-pass step and its single-backward step (and torchjd's
autogram step for text models, when ``torchjd`` is importable), timed interleaved in one process as in
``bench_autogram.py`` (whose ``run`` this script calls), then a summary table of the ratios to the plain
step. Every model is built from a configuration (hidden size 64, 2 layers, vocabulary 1000; nothing is
downloaded) and trained on random data with per-example losses (B=16, T=32, 32-pixel images, or 330 samples of
audio, 32 frames). Not run unless named in ``--models``: ``convnext-mid`` and ``convnextv2-mid`` (64-pixel images,
stages of 48 and 96 channels), ``beit`` and ``dinov2`` (layer scales), and the others listed in ``EXTRA`` (state-space
models, padded Longformer and LED, torch's encoder, BiT, a HiFi-GAN vocoder, ...).

Run: ``python benchmarks/bench_architectures.py [--models llama t5 vit ...] [--repeats 7] [--clock cpu]
[--device cuda]``.
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers as tf
from torch import Tensor, nn

from _cli import non_negative_int, positive_int
from bench_autogram import Case, _to_device, _weighting, run, torchjd_unavailable

B, T, V, H = 16, 32, 1000, 64
_CE = nn.functional.cross_entropy


def _next_token_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=inputs["input_ids"]).logits
    return _CE(logits[:, :-1].transpose(1, 2), inputs["labels"][:, 1:], reduction="none").mean(1)


def _class_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    logits = model(**{key: value for key, value in inputs.items() if key != "labels"}).logits
    return _CE(logits, inputs["labels"], reduction="none")


def _seq2seq_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    logits = model(**inputs).logits
    return _CE(logits.transpose(1, 2), inputs["labels"], reduction="none").mean(1)


def _causal(model_type: str, **config: Any) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    settings = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0, max_position_embeddings=128)
    settings.update(config)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(model_type, **settings))
    ids = torch.randint(1, V, (B, T))
    # torchjd's engine is given per-example position ids, which it needs (OPT's it rejects whatever the ids).
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters and model_type != "opt"
    return model, {"input_ids": ids, "labels": ids}, _next_token_losses, takes_positions


def _encoder(model_type: str, **config: Any) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    settings = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * H,
                    max_position_embeddings=128, num_labels=2, pad_token_id=0)
    settings.update(config)
    settings = {key: value for key, value in settings.items() if value is not None}  # None: not a setting of the model
    model = tf.AutoModelForSequenceClassification.from_config(tf.AutoConfig.for_model(model_type, **settings))
    ids = torch.randint(1, V, (B, T))
    return model, {"input_ids": ids, "labels": torch.randint(0, 2, (B,))}, _class_losses, False


def _seq2seq(model_type: str, **config: Any) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    settings = dict(vocab_size=V, d_model=H, decoder_start_token_id=0, pad_token_id=0)
    settings.update(config)
    model = tf.AutoModelForSeq2SeqLM.from_config(tf.AutoConfig.for_model(model_type, **settings))
    inputs = {"input_ids": torch.randint(1, V, (B, T)), "labels": torch.randint(1, V, (B, T // 4))}
    return model, inputs, _seq2seq_losses, False


def _xmod(languages: int) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    """X-MOD with one adapter per language, the examples of ``languages`` of them in each batch."""
    model, inputs, losses, position_ids = _encoder(
        "xmod", languages=["en_XX", "de_DE", "fr_XX"], default_language="en_XX", adapter_reduction_factor=4,
        max_position_embeddings=130, pad_token_id=1,
    )
    inputs["lang_ids"] = torch.arange(B) % languages
    return model, inputs, losses, position_ids


def _vision(
    model_type: str, pixels: int = 32, **config: Any
) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    model = tf.AutoModelForImageClassification.from_config(tf.AutoConfig.for_model(model_type, num_labels=2, **config))
    inputs = {"pixel_values": torch.randn(B, 3, pixels, pixels), "labels": torch.randint(0, 2, (B,))}
    return model, inputs, _class_losses, False


def _audio(model_type: str, **config: Any) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    """An audio classifier on 330 samples of random audio (about T frames after the tiny feature extractor)."""
    settings = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * H,
                    conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=2)  # SpecAugment on
    settings.update(config)
    model = tf.AutoModelForAudioClassification.from_config(tf.AutoConfig.for_model(model_type, **settings))
    inputs = {"input_values": torch.randn(B, 330), "labels": torch.randint(0, 2, (B,))}
    return model, inputs, _class_losses, False


class _EncoderTagger(nn.Module):
    """A tiny BERT encoder under a bidirectional ``nn.LSTM`` and a token classifier (a sequence tagger)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        config = tf.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=4 * H, max_position_embeddings=128)
        self.encoder = tf.BertModel(config, add_pooling_layer=False)
        self.lstm = nn.LSTM(H, H // 2, batch_first=batch_first, bidirectional=True)
        self.tagger = nn.Linear(H, 5)

    def forward(self, input_ids: Tensor) -> Tensor:
        states = self.encoder(input_ids=input_ids).last_hidden_state
        if self.batch_first:
            return self.tagger(self.lstm(states)[0])
        return self.tagger(self.lstm(states.transpose(0, 1))[0].transpose(0, 1))


def _tagger_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return _CE(model(inputs["input_ids"]).transpose(1, 2), inputs["labels"], reduction="none").mean(1)


def _tagger(batch_first: bool) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    inputs = {"input_ids": torch.randint(1, V, (B, T)), "labels": torch.randint(0, 5, (B, T))}
    return _EncoderTagger(batch_first), inputs, _tagger_losses, False


class _TorchEncoder(nn.Module):
    """A classifier built from torch's own ``nn.TransformerEncoder`` (its ``nn.MultiheadAttention`` applies the
    projections' weights functionally)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(V, H)
        layer = nn.TransformerEncoderLayer(H, 2, 4 * H, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(H, 2)

    def forward(self, input_ids: Tensor) -> tf.modeling_outputs.SequenceClassifierOutput:
        return tf.modeling_outputs.SequenceClassifierOutput(
            logits=self.head(self.encoder(self.embedding(input_ids)).mean(1))
        )


def _torch_encoder() -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    inputs = {"input_ids": torch.randint(1, V, (B, T)), "labels": torch.randint(0, 2, (B,))}
    return _TorchEncoder(), inputs, _class_losses, False


class _PooledSiglip(nn.Module):
    """SigLIP's vision tower with its attention-pooling head (a learned probe and ``nn.MultiheadAttention``) and a
    linear classifier on the pooled output; its patch embedding is a ``Conv2d`` with ``padding="valid"``."""

    def __init__(self) -> None:
        super().__init__()
        config = tf.SiglipVisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=4, vision_use_head=True)
        self.vision = tf.SiglipVisionModel(config)
        self.head = nn.Linear(H, 2)

    def forward(self, pixel_values: Tensor) -> tf.modeling_outputs.SequenceClassifierOutput:
        return tf.modeling_outputs.SequenceClassifierOutput(
            logits=self.head(self.vision(pixel_values=pixel_values).pooler_output)
        )


def _depth_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    depth = model(pixel_values=inputs["pixel_values"]).predicted_depth
    return (depth - inputs["labels"]).pow(2).flatten(1).mean(1)


def _dpt() -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    """A DPT depth estimator, whose reassemble stage upsamples with ``ConvTranspose2d`` of kernel = stride."""
    config = tf.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=4, backbone_out_indices=[0, 1, 2, 3],
                          neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
                          head_in_index=-1)
    model = tf.DPTForDepthEstimation(config)
    pixels = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        target = torch.rand_like(model(pixel_values=pixels).predicted_depth)
    return model, {"pixel_values": pixels, "labels": target}, _depth_losses, False


def _waveform_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return (model(inputs["spectrogram"]) - inputs["labels"]).pow(2).mean(1)


def _hifigan() -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]:
    """SpeechT5's HiFi-GAN vocoder with its weight normalisation applied (as for training it): weight-normalised
    ``ConvTranspose1d`` upsampling and dilated ``Conv1d`` residual blocks, a waveform regressed per example."""
    config = tf.SpeechT5HifiGanConfig(model_in_dim=16, upsample_initial_channel=32, upsample_rates=[4, 4],
                                      upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3],
                                      resblock_dilation_sizes=[[1, 3]])
    model = tf.SpeechT5HifiGan(config)
    model.apply_weight_norm()
    return model, {"spectrogram": torch.randn(B, 20, 16), "labels": torch.randn(B, 20 * 16)}, _waveform_losses, False


ENCODER_LAYERS = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                      encoder_ffn_dim=4 * H, decoder_ffn_dim=4 * H, max_position_embeddings=128)
MODELS: dict[str, Callable[[], tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]]] = {
    "llama": lambda: _causal("llama", intermediate_size=4 * H),
    "qwen2": lambda: _causal("qwen2", intermediate_size=4 * H, num_key_value_heads=1),
    "gemma": lambda: _causal("gemma", intermediate_size=4 * H, num_key_value_heads=1, head_dim=32),
    "phi3": lambda: _causal("phi3", intermediate_size=4 * H, original_max_position_embeddings=128),
    "gpt_neox": lambda: _causal("gpt_neox", intermediate_size=4 * H),
    "bloom": lambda: _causal("bloom"),
    "falcon": lambda: _causal("falcon"),
    "opt": lambda: _causal("opt", ffn_dim=4 * H, word_embed_proj_dim=H),
    "gpt2": lambda: _causal("gpt2"),
    # transformers' fused mixture-of-experts layer (3D expert weights, token routing): the generic path per example
    "mixtral": lambda: _causal("mixtral", intermediate_size=2 * H, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2),
    "roberta": lambda: _encoder("roberta", max_position_embeddings=130, pad_token_id=1),
    "distilbert": lambda: _encoder("distilbert", dim=H, n_layers=2, n_heads=2, hidden_dim=4 * H),
    "albert": lambda: _encoder("albert", embedding_size=32),
    "electra": lambda: _encoder("electra", embedding_size=32),
    "deberta_v2": lambda: _encoder(
        "deberta-v2",
        relative_attention=True,
        position_buckets=32,
        norm_rel_ebd="layer_norm",
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        position_biased_input=False,
    ),
    "xlnet": lambda: _encoder("xlnet", d_inner=4 * H, d_head=H // 2, max_position_embeddings=None),  # time-major
    "t5": lambda: _seq2seq("t5", d_kv=32, d_ff=4 * H, num_layers=2, num_heads=2),
    "bart": lambda: _seq2seq("bart", **ENCODER_LAYERS),
    "vit": lambda: _vision("vit", image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=4 * H),
    # weight-normalised positional convolution (a parametrised Conv1d), feature-extractor convolutions
    "wav2vec2": lambda: _audio("wav2vec2"),
    "hubert": lambda: _audio("hubert"),
    # windows: [B * windows, ...] attention with a relative-position table (Swin) or an MLP's continuous one (Swinv2)
    "swin": lambda: _vision("swin", image_size=32, patch_size=2, embed_dim=24, depths=[1, 1], num_heads=[2, 2],
                            window_size=8),
    "swinv2": lambda: _vision("swinv2", image_size=32, patch_size=2, embed_dim=24, depths=[1, 1], num_heads=[2, 2],
                              window_size=8),
    "convnext": lambda: _vision("convnext", num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
}

# Not run by default: larger vision models (64-pixel images, stages of 48 and 96 channels) and other vision models with
# layer scales.
EXTRA: dict[str, Callable[[], tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor], bool]]] = {
    "convnext-mid": lambda: _vision("convnext", pixels=64, num_channels=3, hidden_sizes=[48, 96], depths=[2, 2],
                                    num_stages=2, image_size=64),
    "convnextv2-mid": lambda: _vision("convnextv2", pixels=64, num_channels=3, hidden_sizes=[48, 96], depths=[2, 2],
                                      num_stages=2, image_size=64),
    "beit": lambda: _vision("beit", image_size=32, patch_size=4, hidden_size=H, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=2 * H, layer_scale_init_value=0.5,
                            use_relative_position_bias=True),
    "dinov2": lambda: _vision("dinov2", image_size=32, patch_size=4, hidden_size=H, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=2 * H, layerscale_value=0.5),
    # ids padded inside the model to a multiple of the attention window (T = 32 -> 36)
    "longformer-padded": lambda: _encoder("longformer", attention_window=12, max_position_embeddings=64,
                                          pad_token_id=1),
    # Longformer encoder-decoder: [T, d] position tables beside time-major attention
    "led": lambda: _seq2seq("led", attention_window=8, max_encoder_position_embeddings=64,
                            max_decoder_position_embeddings=64, **{k: v for k, v in ENCODER_LAYERS.items()
                                                                    if k != "max_position_embeddings"}),
    # torch's nn.TransformerEncoder (projections applied functionally inside nn.MultiheadAttention)
    "torch-encoder": _torch_encoder,
    # SigLIP's vision tower pooled by its attention head (padding="valid" patch embedding)
    "siglip-pooled": lambda: (_PooledSiglip(), {"pixel_values": torch.randn(B, 3, 32, 32),
                                                "labels": torch.randint(0, 2, (B,))}, _class_losses, False),
    # a video classifier: a Conv3d tubelet embedding (kernel = stride)
    "videomae": lambda: (tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=H, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * H, num_labels=2)),
        {"pixel_values": torch.randn(B, 4, 3, 32, 32), "labels": torch.randint(0, 2, (B,))}, _class_losses, False),
    # a video classifier whose patch embedding runs on the frames folded into the batch ([B * frames, 3, H, W])
    "timesformer": lambda: (tf.TimesformerForVideoClassification(tf.TimesformerConfig(
        image_size=32, patch_size=8, num_frames=4, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * H, num_labels=2)),
        {"pixel_values": torch.randn(B, 4, 3, 32, 32), "labels": torch.randint(0, 2, (B,))}, _class_losses, False),
    # a depth estimator upsampling with ConvTranspose2d (kernel = stride)
    "dpt": _dpt,
    # a BERT encoder under a bidirectional LSTM (torch's fused recurrent kernel: one product per example)
    "bert-bilstm": lambda: _tagger(batch_first=True),
    "bert-bilstm-time-major": lambda: _tagger(batch_first=False),
    # state-space mixers (reference PyTorch kernels: mamba_ssm is not installed) with their own A_log, D and time-step
    # weights, and hybrids of them with attention (and, for Jamba, experts)
    "mamba": lambda: _causal("mamba", state_size=8, expand=2, conv_kernel=4, time_step_rank=8),
    "mamba2": lambda: _causal("mamba2", state_size=8, expand=2, conv_kernel=4, num_heads=4, head_dim=32, n_groups=1,
                              chunk_size=8),
    "jamba": lambda: _causal("jamba", intermediate_size=2 * H, num_key_value_heads=1, num_experts=4,
                             num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                             attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "zamba2": lambda: _causal("zamba2", intermediate_size=2 * H, num_hidden_layers=3, num_key_value_heads=2,
                              mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=2, mamba_headdim=64,
                              hybrid_layer_ids=[1], layer_types=["mamba", "hybrid", "mamba"],
                              use_shared_attention_adapter=True, adapter_rank=4),
    "bamba": lambda: _causal("bamba", intermediate_size=2 * H, num_key_value_heads=1, mamba_n_heads=4,
                             mamba_d_head=32, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                             attn_layer_indices=[1], mamba_chunk_size=8),
    # a hybrid of chunked linear attention (gated delta rule, whose gates' gradients come with heavy cancellation) and
    # softmax attention, with routed experts
    # (hidden size 32 and heads of 8: sizes at which those gradients hold the grouping check to 1e-2 relative only)
    "qwen3-next": lambda: _causal("qwen3_next", hidden_size=32, intermediate_size=64, num_key_value_heads=1,
                                  head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
                                  linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=32,
                                  layer_types=["linear_attention", "full_attention"]),
    "qwen3.5": lambda: _causal("qwen3_5_text", hidden_size=32, intermediate_size=64, num_key_value_heads=1,
                               head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                               linear_num_key_heads=2, linear_num_value_heads=4,
                               layer_types=["linear_attention", "full_attention"]),
    # short convolutions whose weight the parent passes to F.conv1d (causal_conv1d_fn's reference implementation)
    "lfm2": lambda: _causal("lfm2", hidden_size=32, intermediate_size=64, num_key_value_heads=1,
                            layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
    "kimi-linear": lambda: _causal("kimi_linear", hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                   n_shared_experts=1, moe_intermediate_size=32, num_local_experts=4, n_group=1,
                                   topk_group=1, layer_types=["linear_attention", "full_attention"],
                                   mlp_layer_types=["dense", "sparse"], linear_head_dim=16, linear_num_heads=2,
                                   linear_conv_kernel_dim=4, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16,
                                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16),
    # experts that process every token, scaled by its router score, laid out expert-major ([E * B * T, d] rows) and
    # multiplied by 3-D weights with bmm (Llama-4), or sorted by expert (JetMoE's parallel experts, attention and MLP)
    "llama4": lambda: _causal("llama4_text", intermediate_size=2 * H, intermediate_size_mlp=2 * H,
                              num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=1,
                              interleave_moe_layer_step=1, attention_chunk_size=16, no_rope_layers=[1, 1]),
    "jetmoe": lambda: _causal("jetmoe", num_key_value_heads=2, kv_channels=16, intermediate_size=2 * H,
                              num_local_experts=4, num_experts_per_tok=2),
    # modules called on the rows the data picks from the examples: adapters per language, experts on their tokens
    "xmod-1-language": lambda: _xmod(1),
    "xmod-3-languages": lambda: _xmod(3),
    "switch": lambda: _seq2seq("switch_transformers", d_kv=32, d_ff=4 * H, expert_capacity=64, num_layers=2,
                               num_sparse_encoder_layers=1, num_decoder_layers=2, num_sparse_decoder_layers=1,
                               num_heads=2, num_experts=4),
    "nllb-moe": lambda: _seq2seq("nllb-moe", num_experts=4, expert_capacity=64, encoder_sparse_step=2,
                                 decoder_sparse_step=2, **ENCODER_LAYERS),
    # DeBERTa (v1): its relative-position table read without calling its embedding, projected and broadcast
    "deberta-v1": lambda: _encoder("deberta", relative_attention=True, max_relative_positions=32,
                                   pos_att_type=["c2p", "p2c"]),
    # fine-tuned with its batch norms' statistics frozen (evaluation mode; in training mode they mix the examples)
    "resnet-frozen-bn": lambda: _vision("resnet", pixels=64, embedding_size=16, hidden_sizes=[16, 32, 64],
                                        depths=[1, 1, 1]),
    # weight-standardised convolutions and group norms followed by their activation (modules with forwards of their own)
    "bit": lambda: _vision("bit", pixels=64, embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                           num_groups=8),
    "hifigan": _hifigan,
}
# Models trained with their batch norms in evaluation mode (statistics frozen; in training mode they mix the examples).
FROZEN_BATCH_NORMS = {"resnet-frozen-bn"}


def summary_table(summary: list[tuple[str, dict[str, float]]]) -> list[str]:
    """The lines of the summary table, its first column as wide as the longest model name.

    Parameters
    ----------
    summary : list[tuple[str, dict[str, float]]]
        Per model, its name and the ratio of each variant's median time to the plain step's (``hf_jd`` and
        ``hf_jd-1bw`` always, ``torchjd`` when it ran).

    Returns
    -------
    list[str]
        The header line, then one line per model.
    """
    width = max([len("model"), *(len(name) for name, _ in summary)]) + 2
    lines = [f"{'model':<{width}}{'hf_jd':>8}{'1bw':>8}{'torchjd':>9}"]
    for name, ratios in summary:
        torchjd = f"{ratios['torchjd']:.2f}" if "torchjd" in ratios else "-"
        lines.append(f"{name:<{width}}{ratios['hf_jd']:>8.2f}{ratios['hf_jd-1bw']:>8.2f}{torchjd:>9}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of this benchmark.

    Returns
    -------
    argparse.ArgumentParser
        The parser; its numeric options reject out-of-range values.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS) + list(EXTRA),
                        help="default: all but " + ", ".join(EXTRA))
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per variant first")
    parser.add_argument("--clock", default="cpu", choices=["wall", "cpu"])
    parser.add_argument("--device", default="cpu", help="e.g. cuda (then time with --clock wall)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on a bad value."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the summary table (``argv``: the command line, ``sys.argv[1:]`` when None)."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    _, weighting = _weighting()
    skipped = torchjd_unavailable()
    if skipped is not None:
        print(skipped)
    summary: list[tuple[str, dict[str, float]]] = []
    for name in args.models:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, inputs, losses, position_ids = {**MODELS, **EXTRA}[name]()
        model.train()
        if name in FROZEN_BATCH_NORMS:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        case = _to_device(Case(name, model, inputs, losses, torchjd=position_ids), torch.device(args.device))
        try:
            result = run(case, weighting, args.repeats, args.warmup, clock=clock)
        except Exception as error:  # noqa: BLE001 - a benchmark reports and goes on
            print(f"{name}: failed ({type(error).__name__}: {str(error)[:200]})")
            continue
        plain = result["times"]["plain"]
        summary.append((name, {variant: value / plain for variant, value in result["times"].items()}))
    print("\nratios to the plain step (median time)")
    print("\n".join(summary_table(summary)))


if __name__ == "__main__":
    main()
