"""Generic calls whose weights meet the data in a convolution (a kernel computed before convolving): per-example
gradients from the convolution's patches, through the operations on the weights alone."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

from hf_jd.autogram import Engine

from ._reference import assert_exact_step_with_freed_graph


class StandardisedConv2d(nn.Conv2d):
    """A weight-standardised convolution (BiT's, timm's ``StdConv2d``): the kernel is normalised per output channel
    before every call."""

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledConv1d(nn.Conv1d):
    """A kernel scaled by a learned gain, and a bias shifted by a constant."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight * self.gain, self.bias + 0.1, self.stride, self.padding, self.dilation,
                        self.groups)


class Scaled(nn.Module):
    """``F.conv_transpose{1,2}d`` with its own weight times 2 (no module of torch's)."""

    def __init__(self, spatial: int, in_channels: int, out_channels: int, kernel: int, groups: int = 1,
                 **geometry: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_channels, out_channels // groups, *(kernel,) * spatial) / 3)
        self.bias = nn.Parameter(torch.randn(out_channels) / 3)
        self.groups, self.geometry = groups, geometry
        self.function = F.conv_transpose1d if spatial == 1 else F.conv_transpose2d

    def forward(self, x: Tensor) -> Tensor:
        return self.function(x, self.weight * 2, self.bias, groups=self.groups, **self.geometry)


class Head(nn.Module):
    """A network ending in per-example losses: ``body`` on ``[B, C, *spatial]`` inputs, then a Linear classifier."""

    def __init__(self, body: nn.Module, features: int) -> None:
        super().__init__()
        self.body = body
        self.classifier = nn.LazyLinear(3)
        self.features = features

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        logits = self.classifier(torch.tanh(self.body(x)).flatten(1))
        return F.cross_entropy(logits, labels, reduction="none")


def _run(model: Head, shape: tuple[int, ...], single_backward: bool, steps: tuple[int, ...] = (10, 10, 9)) -> None:
    torch.manual_seed(1)
    model(torch.randn(2, *shape), torch.zeros(2, dtype=torch.long))  # (initialises the lazy classifier)
    engine = Engine(model, single_backward=single_backward)
    for batch in steps:
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, *shape), torch.randint(0, 3, (batch,)))
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_standardised_conv2d(groups: int, single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """BiT's convolution, strided and padded, with and without groups, after a plain convolution."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                         StandardisedConv2d(4, 6, 3, stride=2, padding=1, groups=groups))
    _run(Head(body, 6 * 4 * 4), (3, 8, 8), single_backward)
    assert {path for name, path in taken if name == "StandardisedConv2d"} == {True}


@pytest.mark.parametrize("single_backward", [False, True])
def test_scaled_conv1d_with_dilation(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """A learned gain on the kernel (a parameter of the module beside its weight) and a dilated, padded Conv1d on
    inputs that need no gradient."""
    torch.manual_seed(0)
    body = ScaledConv1d(3, 4, 3, padding=2, dilation=2)
    _run(Head(body, 4 * 12), (3, 12), single_backward)
    assert {path for name, path in taken if name == "ScaledConv1d"} == {True}


@pytest.mark.parametrize("single_backward", [False, True])
def test_weight_normalised_conv_transpose1d(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """HiFi-GAN's upsampling: a weight-normalised ``ConvTranspose1d`` (stride 2, padding, output padding)."""
    torch.manual_seed(0)
    upsample = parametrizations.weight_norm(nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1, output_padding=1))
    body = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), upsample)
    _run(Head(body, 3 * 13), (2, 6), single_backward)
    assert {path for name, path in taken} == {True}  # (ParametrizedConvTranspose1d: the originals included)


@pytest.mark.parametrize(
    ("spatial", "groups", "geometry"),
    [(1, 1, dict(stride=3, padding=2, dilation=2)), (2, 2, dict(stride=2, padding=1, output_padding=1))],
)
def test_conv_transpose_functions(spatial: int, groups: int, geometry: dict[str, int],
                                  taken: list[tuple[str, bool]]) -> None:
    """``F.conv_transpose1d`` / ``2d`` on a weight of the module's own: strides, padding, dilation, output padding and
    groups."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 1) if spatial == 2 else nn.Conv1d(2, 4, 1),
                         Scaled(spatial, 4, 6, 3, groups, **geometry))
    shape = (2, 5) if spatial == 1 else (2, 4, 4)
    _run(Head(body, 0), shape, single_backward=False)
    assert {path for name, path in taken if name == "Scaled"} == {True}


def test_frames_folded_into_the_batch(taken: list[tuple[str, bool]]) -> None:
    """Two frames per example in a ``[B * 2, C, H, W]`` batch: each example's blocks are those of its two samples."""

    class Frames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = StandardisedConv2d(3, 4, 3, padding=1)
            self.classifier = nn.Linear(2 * 4 * 5 * 5, 3)

        def forward(self, x: Tensor, labels: Tensor) -> Tensor:
            features = torch.tanh(self.conv(x.flatten(0, 1))).reshape(x.shape[0], -1)
            return F.cross_entropy(self.classifier(features), labels, reduction="none")

    torch.manual_seed(0)
    model = Frames()
    engine = Engine(model)
    for batch in (10, 10):
        losses = model(torch.randn(batch, 2, 3, 5, 5), torch.randint(0, 3, (batch,)))
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward=False)
    assert {path for name, path in taken if name == "StandardisedConv2d"} == {True}


def test_conv3d_keeps_the_products_per_example(taken: list[tuple[str, bool]]) -> None:
    """A kernel computed before a 3-D convolution: not described, exact on the usual path."""

    class Scaled3d(nn.Conv3d):
        def forward(self, x: Tensor) -> Tensor:
            return F.conv3d(x, self.weight * 2, self.bias, self.stride, self.padding)

    torch.manual_seed(0)
    _run(Head(Scaled3d(2, 3, 2), 0), (2, 3, 3, 3), single_backward=False, steps=(10,))
    assert {path for name, path in taken if name == "Scaled3d"} == {False}


def test_task_losses(taken: list[tuple[str, bool]]) -> None:
    """``[B, 2]`` losses (two heads) through a weight-standardised convolution."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = StandardisedConv2d(2, 3, 3, padding=1, stride=2)
            self.heads = nn.Linear(3 * 3 * 3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.heads(torch.tanh(self.conv(x)).flatten(1)) ** 2

    torch.manual_seed(0)
    model = TwoHeads()
    engine = Engine(model, single_backward=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randn(10, 2, 5, 5)), single_backward=True)
    assert {path for name, path in taken if name == "StandardisedConv2d"} == {True}


@pytest.mark.parametrize("single_backward", [False, True])
def test_bit(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    """transformers' BiT (weight-standardised convolutions, group norms followed by their activation, dynamic "SAME"
    padding), frozen batch statistics aside."""
    torch.manual_seed(0)
    config = tf.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=4, num_labels=3,
                          global_padding="SAME", layer_type="bottleneck")
    model = tf.BitForImageClassification(config)
    engine = Engine(model, single_backward=single_backward)
    for batch in (10, 10):
        model.zero_grad(set_to_none=True)
        logits = model(pixel_values=torch.randn(batch, 3, 16, 16)).logits
        losses = F.cross_entropy(logits, torch.randint(0, 3, (batch,)), reduction="none")
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    paths = {name: path for name, path in taken}
    assert paths["WeightStandardizedConv2d"] is True and paths["BitGroupNormActivation"] is True
    assert {path for name, path in taken if name in ("WeightStandardizedConv2d", "BitGroupNormActivation")} == {True}


@pytest.mark.parametrize("spatial", [1, 2])
def test_stock_transposed_convolutions_with_overlapping_patches(spatial: int, taken: list[tuple[str, bool]]) -> None:
    """``nn.ConvTranspose1d`` / ``2d`` whose kernel is not its stride (no closed form of their own): the generic
    call's kernel and bias are described by their convolution."""
    torch.manual_seed(0)
    conv = (nn.ConvTranspose1d if spatial == 1 else nn.ConvTranspose2d)(4, 3, 3, stride=2, padding=1)
    first = nn.Conv1d(2, 4, 1) if spatial == 1 else nn.Conv2d(2, 4, 1)
    _run(Head(nn.Sequential(first, conv), 0), (2, 4) if spatial == 1 else (2, 3, 3), single_backward=True)
    assert {path for name, path in taken} == {True}


def test_weight_normalised_conv_transpose_under_parametrize_cached() -> None:
    """Under ``parametrize.cached()`` the weight computed in the first call is reused by the second, whose own aliases
    it does not depend on: the originals are then covered where the weight is computed (exact)."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = parametrizations.weight_norm(nn.ConvTranspose1d(3, 3, 3, stride=2, padding=1))
            self.head = nn.Linear(3 * 17, 3)

        def forward(self, x: Tensor, labels: Tensor) -> Tensor:
            features = torch.tanh(self.up(torch.tanh(self.up(x))))
            return F.cross_entropy(self.head(features.flatten(1)), labels, reduction="none")

    torch.manual_seed(0)
    model = Twice()
    engine = Engine(model)
    for batch in (10, 9):
        with parametrize.cached():
            losses = model(torch.randn(batch, 3, 5), torch.randint(0, 3, (batch,)))
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward=False)
    losses = model(torch.randn(10, 3, 5), torch.randint(0, 3, (10,)))  # (and without the cache again)
    assert_exact_step_with_freed_graph(engine, model, losses, single_backward=False)
