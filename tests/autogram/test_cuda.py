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
    BertConfig,
    ConvNextConfig,
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

from ._reference import assert_gramian_matches, grads_of, jacobian, trainable

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


CASES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit, "wav2vec2": _wav2vec2, "swinv2": _swinv2,
         "mixtral": _mixtral(None), "mixtral_eager": _mixtral("eager"), "convnext": _convnext}


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
    assert gramian.is_cuda and gramian.dtype == torch.float32
    assert_gramian_matches(gramian, jac)
    weights = UPGradWeighting()(gramian)
    assert weights.is_cuda and weights.shape == (B,)
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


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
        torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


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
