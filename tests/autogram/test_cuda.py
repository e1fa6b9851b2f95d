"""The engine on CUDA: the exactness checks of the CPU tests, on the GPU (run where one is present).

TF32 is switched off so that the explicit reference Jacobian and the engine's products are both
computed in full float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    BertConfig,
    ConvNextConfig,
    DPTConfig,
    DPTForDepthEstimation,
    SiglipVisionConfig,
    SiglipVisionModel,
    VideoMAEConfig,
    VideoMAEForVideoClassification,
    ConvNextForImageClassification,
    Swinv2Config,
    Swinv2ForImageClassification,
    Wav2Vec2Config,
    Wav2Vec2ForSequenceClassification,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_jd.aggregation import UPGradWeighting
from hf_jd.autogram import Engine, _matmul_uses

from ._reference import assert_gramian_matches, jacobian, trainable
from .test_documented_layouts import _Attention, _Tagger

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, T, V = 4, 8, 60
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
DEVICE = "cuda"
Case = tuple[nn.Module, Callable[[nn.Module], Tensor]]


@pytest.fixture(autouse=True)
def _products_path_for_few_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mixture-of-experts cases have few rows: the products' path is tried anyway, so that it runs on the GPU."""
    monkeypatch.setattr(_matmul_uses, "FEW_ROWS", 0)


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _ids() -> Tensor:
    ids = torch.randint(1, V, (B, T), device=DEVICE)
    ids[0, -3:] = 0
    return ids


def _sequence_losses(logits: Tensor, labels: Tensor) -> Tensor:
    token = nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )
    return token.sum(1) / (labels[:, 1:] != -100).sum(1)


def _bert() -> Case:
    config = BertConfig(vocab_size=V, max_position_embeddings=16, hidden_dropout_prob=0.2,
                        attention_probs_dropout_prob=0.2, num_labels=3, **SMALL)
    ids, labels = _ids(), torch.tensor([0, 2, 1, 1], device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits  # default position ids
        return nn.functional.cross_entropy(logits, labels, reduction="none")

    return BertForSequenceClassification(config).train(), losses


def _gpt2() -> Case:
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    ids = _ids()
    labels = ids.masked_fill(ids == 0, -100)
    return GPT2LMHeadModel(config).train(), lambda model: _sequence_losses(model(input_ids=ids).logits, labels)


def _llama() -> Case:
    config = LlamaConfig(vocab_size=V, max_position_embeddings=16, num_key_value_heads=1,
                         tie_word_embeddings=True, **SMALL)
    ids = _ids()
    return LlamaForCausalLM(config), lambda model: _sequence_losses(model(input_ids=ids).logits, ids)


def _vit() -> Case:
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=3, **SMALL)
    pixels, labels = torch.randn(B, 3, 8, 8, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels, reduction="none")

    return ViTForImageClassification(config).train(), losses


def _beit() -> Case:
    """Relative-position bias ``[1, H, T, T]`` given to SDPA as its mask: CUDA's memory-efficient kernel pads it."""
    config = BeitConfig(image_size=8, patch_size=4, num_labels=3, use_relative_position_bias=True,
                        layer_scale_init_value=0.5, attn_implementation="sdpa", **SMALL)
    pixels, labels = torch.randn(B, 3, 8, 8, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels, reduction="none")

    return BeitForImageClassification(config).train(), losses


def _wav2vec2() -> Case:
    """Weight-normalised positional convolution, and SpecAugment's mask embedding (a parameter of the whole model)."""
    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, num_labels=2, mask_time_prob=0.3, mask_time_length=2,
    )
    audio, labels = torch.randn(B, 400, device=DEVICE), torch.tensor([0, 1, 1, 0], device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(input_values=audio).logits, labels, reduction="none")

    return Wav2Vec2ForSequenceClassification(config).train(), losses


def _swinv2() -> Case:
    """Continuous position bias (an MLP's output indexed and squashed into a table shared by the windows)."""
    config = Swinv2Config(image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
                          num_labels=3)
    pixels, labels = torch.randn(B, 3, 16, 16, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels, reduction="none")

    return Swinv2ForImageClassification(config).train(), losses


def _mixtral(implementation: str | None) -> Callable[[], Case]:
    """Mixture of experts: the default implementation of the experts, and their loop over ``W[e]`` products."""

    def case() -> Case:
        config = MixtralConfig(vocab_size=V, max_position_embeddings=16, num_key_value_heads=1, num_local_experts=4,
                               num_experts_per_tok=2, **SMALL)
        if implementation is not None:
            config._experts_implementation = implementation
        ids = _ids()
        return MixtralForCausalLM(config), lambda model: _sequence_losses(model(input_ids=ids).logits, ids)

    return case


def _convnext() -> Case:
    """Depthwise convolutions (per-row kernels from a cuDNN convolution, in full float32 precision), channels-first
    layer norms, layer scales."""
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2,
                            image_size=8, num_labels=3)
    pixels, labels = torch.randn(B, 3, 8, 8, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels, reduction="none")

    return ConvNextForImageClassification(config).train(), losses


def _tagger(kind: str, batch_first: bool) -> Callable[[], Case]:
    """cuDNN's fused recurrent kernels in the documented layouts (two bidirectional layers)."""

    def case() -> Case:
        model = _Tagger(kind, batch_first, num_layers=2, bidirectional=True)
        ids = torch.randint(0, 30, (B, T), device=DEVICE)
        return model, lambda model: model(ids)

    return case


def _time_major_attention() -> Case:
    """``nn.MultiheadAttention`` in its default layout, returning per-head weights (an ``addmm`` output projection)."""
    ids = torch.randint(0, 30, (B, T), device=DEVICE)
    return _Attention(average=False), lambda model: model(ids)


class _TorchEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(V, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(ids)).mean(1))


def _torch_encoder() -> Case:
    ids, labels = _ids(), torch.tensor([0, 2, 1, 1], device=DEVICE)
    model = _TorchEncoder().train()
    return model, lambda model: nn.functional.cross_entropy(model(ids), labels, reduction="none")


def _videomae() -> Case:
    """A ``Conv3d`` tubelet embedding whose kernel is its stride."""
    config = VideoMAEConfig(image_size=8, patch_size=4, num_frames=4, tubelet_size=2, num_labels=3, **SMALL)
    video, labels = torch.randn(B, 4, 3, 8, 8, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(pixel_values=video).logits, labels, reduction="none")

    return VideoMAEForVideoClassification(config).train(), losses


def _dpt() -> Case:
    """A depth estimator whose reassemble stage upsamples with ``ConvTranspose2d`` of kernel = stride."""
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=16,
                       patch_size=4, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[4, 8, 8, 8],
                       fusion_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1)
    pixels, target = torch.randn(B, 3, 16, 16, device=DEVICE), torch.rand(B, 64, 64, device=DEVICE)

    def losses(model: nn.Module) -> Tensor:
        return (model(pixel_values=pixels).predicted_depth - target).pow(2).flatten(1).mean(1)

    return DPTForDepthEstimation(config).train(), losses


class _PooledSiglip(nn.Module):
    """SigLIP's vision tower (``padding="valid"`` patch embedding) pooled by its attention head, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        config = SiglipVisionConfig(image_size=8, patch_size=4, vision_use_head=True, **SMALL)
        self.vision = SiglipVisionModel(config)
        self.head = nn.Linear(32, 3)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.vision(pixel_values=pixels).pooler_output)


def _siglip() -> Case:
    pixels, labels = torch.randn(B, 3, 8, 8, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)
    model = _PooledSiglip().train()
    return model, lambda model: nn.functional.cross_entropy(model(pixels), labels, reduction="none")


CASES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit, "beit": _beit, "wav2vec2": _wav2vec2,
         "swinv2": _swinv2, "mixtral": _mixtral(None), "mixtral_eager": _mixtral("eager"), "convnext": _convnext,
         "lstm": _tagger("LSTM", True), "gru_time_major": _tagger("GRU", False),
         "mha_time_major": _time_major_attention, "torch_encoder": _torch_encoder, "videomae": _videomae, "dpt": _dpt,
         "siglip_pooled": _siglip}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("single_backward", [False, True])
def test_gramian_and_update_on_cuda(name: str, single_backward: bool) -> None:
    torch.manual_seed(0)
    model, compute_losses = CASES[name]()
    model.to(DEVICE)
    engine = Engine(model, single_backward=single_backward)
    losses = compute_losses(model)
    params = trainable(model)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses, retain_graph=True)
    assert gramian.device.type == DEVICE and gramian.dtype == torch.float32
    assert_gramian_matches(gramian, jac)
    weights = UPGradWeighting()(gramian)
    assert weights.device.type == DEVICE and weights.shape == (B,)
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights)
    _assert_update(params, weights @ jac)


def _assert_update(params: list[nn.Parameter], expected: Tensor) -> None:
    """``.grad`` equals ``wᵀ J``, each parameter to ``1e-4`` relative plus ``1e-5`` of its largest entry: a shared
    parameter's gradient (BEiT's class token, entries of ~600 in a tiny model) is a sum of large per-example terms,
    which autograd's weighted backward and ``wᵀ J`` add in different orders (2e-4 apart on the CPU, more on a GPU)."""
    offset = 0
    for param in params:
        size = param.numel()
        want = expected[offset:offset + size].view_as(param)
        got = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 + 1e-5 * float(want.abs().max()))
        offset += size
    assert offset == expected.numel()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("single_backward", [False, True])
def test_three_steps_on_cuda(name: str, single_backward: bool) -> None:
    """Later steps take the paths learnt on the first one (shared tables planned, graph freed during the pass)."""
    torch.manual_seed(1)
    model, compute_losses = CASES[name]()
    model.to(DEVICE)
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        losses = compute_losses(model)
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses), jac)
        weights = torch.linspace(0.5, 1.5, B, device=DEVICE)
        if single_backward:
            engine.backward(weights)
        else:
            losses.backward(weights)
        _assert_update(params, weights @ jac)


def test_bf16_autocast_on_cuda() -> None:
    torch.manual_seed(0)
    model, compute_losses = _gpt2()
    model.to(DEVICE).eval()
    engine = Engine(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = compute_losses(model).float()
    gramian = engine.compute_gramian(losses)
    assert gramian.dtype == torch.float32 and torch.isfinite(gramian).all()
    exact = jacobian(losses, trainable(model)).float()
    expected = exact @ exact.T
    torch.testing.assert_close(gramian, expected, rtol=0.03, atol=0.01 * expected.abs().max().item())


def test_disabled_engine_plain_step_on_cuda() -> None:
    torch.manual_seed(0)
    model, compute_losses = _bert()
    model.to(DEVICE).eval()
    engine = Engine(model)
    reference = [p.detach().clone() for p in model.parameters()]
    with engine.disabled():
        compute_losses(model).mean().backward()
    assert engine._capture.records == []
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    compute_losses(model).mean().backward()  # the engine records here, then drops it unused
    torch.testing.assert_close(grads, [p.grad for p in model.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(reference, model.parameters()))


@pytest.mark.parametrize("name", ["dpt", "convnext", "lstm"])
def test_tf32_keeps_the_fast_paths_on_cuda(name: str, per_row_calls: list[str]) -> None:
    """cuDNN's default TF32 convolutions and recurrent layers: the grouping checks allow for their rounding (a tiny
    DPT took the per-row path for 68 of its calls, 9.6x a plain step, when they did not)."""
    conv, rnn = torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = "tf32"
    try:
        torch.manual_seed(0)
        model, compute_losses = CASES[name]()
        model.to(DEVICE)
        engine = Engine(model)
        losses = compute_losses(model)
        jac = jacobian(losses, trainable(model))
        assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac, rtol=1e-2)
        assert engine._tf32 and per_row_calls == []
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = conv, rnn


def test_beit_relative_position_bias_keeps_the_ordinary_pass_on_cuda(per_row_calls: list[str]) -> None:
    """The memory-efficient kernel pads the shared bias before expanding it over the batch; a tiny BEiT took the
    per-row path for its tables (6.6x a plain step, 7x its memory) when padding was not followed."""
    torch.manual_seed(0)
    model, compute_losses = CASES["beit"]()
    model.to(DEVICE)
    engine = Engine(model)
    losses = compute_losses(model)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jacobian(losses, trainable(model)))
    assert per_row_calls == []
