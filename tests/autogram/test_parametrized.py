"""Modules whose weight a parametrisation computes (``torch.nn.utils.parametrize``: weight and spectral
normalisation, custom parametrisations): their closed form covers the originals (the per-row gradients of
the weight pulled back through the parametrisation), exact against the explicit Jacobian and without the
per-row pass, over several steps and batch sizes, with both backward modes."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from hf_jd.autogram import Engine

from ._reference import assert_exact_step_with_freed_graph, count_per_row


class _Scaled(nn.Module):
    """A custom parametrisation: ``W = exp(s) * V`` with a learnt log-scale (two originals via
    ``right_inverse`` returning a tuple)."""

    def forward(self, log_scale: Tensor, direction: Tensor) -> Tensor:
        return log_scale.exp() * direction

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros(()), weight.clone()


class _Net(nn.Module):
    """Conv1d (grouped, padded, weight-normalised along the kernel as Wav2Vec2's positional convolution),
    then a weight-normalised Linear, a Conv2d with a custom parametrisation and a spectrally normalised
    Linear head."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(4, 4, 5, padding=2, groups=2, bias=bias), name="weight", dim=2)
        self.proj = weight_norm(nn.Linear(4, 6, bias=bias))
        self.image = nn.Conv2d(1, 2, 3, padding=1)
        parametrize.register_parametrization(self.image, "weight", _Scaled())
        self.head = spectral_norm(nn.Linear(6 + 2 * 4 * 3, 1))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 4, L] -> losses [B]
        h = torch.tanh(self.conv(x))  # [B, 4, L]
        t = torch.tanh(self.proj(h.transpose(1, 2)))  # [B, L, 6]
        picture = torch.tanh(self.image(h[:, None, :, :3]))  # [B, 2, 4, 3]
        features = torch.cat([t.mean(1), picture.flatten(1)], 1)
        return self.head(features).squeeze(-1).pow(2)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_parametrized_weights_are_exact_without_the_per_row_pass(single_backward: bool, bias: bool,
                                                                 monkeypatch) -> None:
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = _Net(bias)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-row warning either
        for batch, length in ((4, 7), (4, 7), (3, 9)):
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 4, length)), single_backward)
    assert per_row == []


def test_frozen_originals_are_left_out() -> None:
    torch.manual_seed(1)
    model = _Net()
    model.conv.parametrizations.weight.original0.requires_grad_(False)  # g frozen, v trained
    model.proj.parametrizations.weight.original0.requires_grad_(False)
    model.proj.parametrizations.weight.original1.requires_grad_(False)  # whole weight frozen, bias trained
    engine = Engine(model)
    for batch in (3, 5):
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 4, 6)), single_backward=False)


class _TwoCalls(nn.Module):
    """A weight-normalised Linear called twice, the second time on the first's output."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = weight_norm(nn.Linear(3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.layer(torch.tanh(self.layer(x)))).pow(2).sum(-1)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("single_backward", [False, True])
def test_weight_used_by_several_calls(cached: bool, single_backward: bool, monkeypatch) -> None:
    """Each call computes its weight, or (``parametrize.cached()``) the second reuses the first's: the
    per-example gradient of the originals is the sum over both uses."""
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(2)
    model = _TwoCalls()
    engine = Engine(model, single_backward=single_backward)
    for batch in (4, 4, 2):
        x = torch.randn(batch, 3)
        if cached:
            with parametrize.cached():
                losses = model(x)
        else:
            losses = model(x)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert per_row == []


class _WeightReadOutside(nn.Module):
    """A parent that reads its child's parametrised weight itself (a penalty-like use inside the
    losses) besides calling the child: that use is covered by the ParametrizationList's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = weight_norm(nn.Linear(3, 2))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.layer.weight.square().sum()  # computed outside the child's call
        return self.layer(x).pow(2).sum(-1) * scale


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("single_backward", [False, True])
def test_weight_also_computed_outside_the_call(cached: bool, single_backward: bool) -> None:
    """Without caching, the child's call computes its own weight (covered by its closed form) and the
    parent's use goes through the ParametrizationList's own call; with ``parametrize.cached()``, the child
    reuses the weight the parent computed, which the closed form then must not claim."""
    torch.manual_seed(3)
    model = _WeightReadOutside()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent's use takes the per-row pass (warned)
        for batch in (4, 3):
            x = torch.randn(batch, 3)
            if cached:
                with parametrize.cached():
                    losses = model(x)
            else:
                losses = model(x)
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_wav2vec2_positional_convolution_takes_the_closed_form(single_backward: bool, monkeypatch) -> None:
    """Wav2Vec2's weight-normalised positional convolution (it took the per-row pass on every step)."""
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(4)
    config = tf.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, num_labels=2, mask_time_prob=0.0,
    )
    model = tf.Wav2Vec2ForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 3, 2):
        labels = torch.randint(0, 2, (batch,))
        logits = model(input_values=torch.randn(batch, 400)).logits
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert per_row == []


class _TiedCached(nn.Module):
    """A weight-normalised Linear whose weight is read again after its call (a tied output projection, or a penalty
    on the weight added to every loss): under ``parametrize.cached()`` that is the very tensor the call computed."""

    def __init__(self, penalty: bool) -> None:
        super().__init__()
        self.layer = weight_norm(nn.Linear(5, 5))
        self.penalty = penalty

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 5] -> [B]
        h = torch.tanh(self.layer(x))
        if self.penalty:
            return h.pow(2).mean((1, 2)) + 0.01 * self.layer.weight.pow(2).sum()
        return nn.functional.linear(h, self.layer.weight).pow(2).mean((1, 2))


@pytest.mark.parametrize("penalty", [False, True])
@pytest.mark.parametrize("single_backward", [False, True])
def test_cached_weight_also_used_after_the_call(penalty: bool, single_backward: bool) -> None:
    torch.manual_seed(8)
    model = _TiedCached(penalty)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the other use takes the exact path for parameters used outside calls
        for batch in (4, 3):
            with parametrize.cached():
                losses = model(torch.randn(batch, 3, 5))
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
