"""Generic calls whose parameters meet the data in elementwise scales and sums (layer scales, channels-first norms
written by hand): per-example gradients ``Σ g ⊙ x`` (or ``Σ ± g``) within each entry of the output's leading dimensions,
from the products' path of :mod:`hf_jd.autogram._matmul_uses`, against the explicit Jacobian."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine, _generic

from ._reference import assert_exact_step, assert_exact_step_with_freed_graph, trainable


class ChannelsFirstNorm(nn.Module):
    """A norm over the channels of ``[N, C, H, W]``, its affine parameters broadcast as ``[C, 1, 1]``; the bias is
    subtracted (``x - (-b)``) to exercise subtraction."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.3, channels))

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(1, keepdim=True)
        normalised = centred / (centred.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
        return self.weight[:, None, None] * normalised - (-self.bias)[:, None, None]


class LayerScale(nn.Module):
    """A residual block's output scaled per channel (channels last), then added to its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.7))
        self.shift = nn.Parameter(torch.zeros(1, 1, channels))

    def forward(self, x: Tensor) -> Tensor:  # [N, H, W, C]
        return x + self.gamma * torch.tanh(self.inner(x)) + self.shift


class Temperatures(nn.Module):
    """Divisions by a learned temperature per channel, and of a learned numerator by the data."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.linspace(0.8, 1.6, channels))
        self.numerator = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: Tensor) -> Tensor:  # [N, C]
        return x / self.temperature + self.numerator / (2 + x.tanh())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = ChannelsFirstNorm(4)
        self.scale = LayerScale(4)
        self.temperatures = Temperatures(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # [N, 2, H, W] -> [N, 3]
        hidden = self.norm(self.conv(x)).permute(0, 2, 3, 1)
        return self.head(self.temperatures(self.scale(hidden).mean((1, 2))))


@pytest.mark.parametrize(("single_backward", "keep_rows"), [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("tasks", [False, True])
def test_scales_and_sums_take_the_path(
    single_backward: bool, keep_rows: bool, tasks: bool, taken: list[tuple[str, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact Gramian and update; with the single backward, the small parameters' per-row gradients are kept for the
    weighted gradient, or (``keep_rows=False``) the weighted gradient comes from the factors."""
    if not keep_rows:
        monkeypatch.setattr(_generic, "MAX_KEPT_ENTRIES", 0)
    torch.manual_seed(0)
    model = Net()
    engine = Engine(model, single_backward=single_backward)
    for batch in (5, 3):
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(batch, 2, 4, 4))
        losses = torch.stack([out.logsumexp(1), out.pow(2).mean(1)], 1) if tasks else out.logsumexp(1)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert {name for name, took in taken if took} == {"ChannelsFirstNorm", "LayerScale", "Temperatures"}
    assert all(took for _, took in taken)


def test_task_losses_without_batch_dim(taken: list[tuple[str, bool]]) -> None:
    """``[m]`` task losses (the whole batch one "example"): every block belongs to it."""
    torch.manual_seed(1)
    model = Net()
    engine = Engine(model, batch_dim=None)
    out = model(torch.randn(4, 2, 4, 4))
    assert_exact_step(engine, torch.stack([out[:2].logsumexp(1).mean(), out.pow(2).mean()]), trainable(model), False)
    assert taken and all(took for _, took in taken)


class TimeMajorScale(nn.Module):
    """A parameter scaling a time-major ``[T, N, C]`` tensor: its blocks are the ``(t, n)`` positions, each in one
    example."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 1.3))

    def forward(self, x: Tensor) -> Tensor:  # [N, T, C]
        return (self.gamma * x.transpose(0, 1).tanh()).transpose(0, 1)


class SharedScale(nn.Module):
    """A parameter scaling a statistic of the batch that every example then uses: each block is reached by all the
    examples, so the path does not apply and the usual one gives the Gramian."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 1.3))

    def forward(self, x: Tensor) -> Tensor:  # [N, T, C]
        return x + self.gamma * x.mean(0, keepdim=True).tanh()


@pytest.mark.parametrize(("scale", "applies"), [(TimeMajorScale, True), (SharedScale, False)])
def test_blocks_are_positions_of_one_example(scale: type[nn.Module], applies: bool,
                                             taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), scale(4), nn.Linear(4, 2))
    engine = Engine(model)
    for batch in (3, 4):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, 5, 3)).pow(2).mean((1, 2))
        assert_exact_step_with_freed_graph(engine, model, losses, False)
    assert {took for name, took in taken if name == scale.__name__} == {applies}


def test_convnext_layer_scales(taken: list[tuple[str, bool]]) -> None:
    """transformers' ConvNeXt: layer scales on channels-last tensors take the path; exact over steps and batch
    sizes."""
    torch.manual_seed(3)
    config = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[2, 1], num_stages=2, patch_size=2,
                               image_size=8, num_labels=3)
    model = tf.ConvNextForImageClassification(config)
    engine = Engine(model)
    for batch in (4, 4, 3):
        model.zero_grad(set_to_none=True)
        losses = model(pixel_values=torch.randn(batch, 3, 8, 8)).logits.logsumexp(-1)
        assert_exact_step_with_freed_graph(engine, model, losses, False)
    assert any(took for name, took in taken if name == "ConvNextLayer")


@pytest.mark.parametrize("single_backward", [False, True])
def test_swinv2_logit_scale_from_its_use(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """Swinv2's attention scales its [B * windows, heads, N, N] scores by ``exp(clamp(logit_scale))``: the products
    start at that multiplication (the call's outputs are windows), whose blocks are the windows, each found to belong
    to one example; exact over steps and batch sizes."""
    torch.manual_seed(4)
    config = tf.Swinv2Config(image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
                             num_labels=3)
    model = tf.Swinv2ForImageClassification(config)
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 3, 2):
        model.zero_grad(set_to_none=True)
        losses = model(pixel_values=torch.randn(batch, 3, 16, 16)).logits.logsumexp(-1)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    took = [took for name, took in taken if name == "Swinv2SelfAttention"]
    assert took and all(took)


class _MixAfterUse(nn.Module):
    """``y = h @ W`` or ``h * w``, then the examples mixed (flipped in, or pooled over the batch)."""

    def __init__(self, product: bool, mix: str) -> None:
        super().__init__()
        self.product, self.mix = product, mix
        self.weight = nn.Parameter(torch.randn(4, 4) / 2 if product else torch.linspace(0.5, 1.5, 4))

    def forward(self, h: Tensor) -> Tensor:
        y = h @ self.weight if self.product else h * self.weight
        return y + y.flip(0) if self.mix == "flip" else y.sum(0, keepdim=True).expand_as(y).clone()


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("mix", ["flip", "pool"])
def test_rows_of_several_examples_under_linear_losses(product: bool, mix: str, taken: list[tuple[str, bool]]) -> None:
    """Losses linear in a call's output, the examples mixed inside the call after the use: each row's gradients under
    the check's weights average those of the examples that reach it, which must match no single example's (with evenly
    spaced weights, the average of all of them is the middle example's, and a flip of three examples maps the middle
    one to itself: the rows were all given to one example)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _MixAfterUse(product, mix), nn.Linear(4, 3))
    engine = Engine(model)
    with pytest.warns(RuntimeWarning, match="mix the examples"):
        for batch in (3, 3, 7, 7):
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 3)), False)
