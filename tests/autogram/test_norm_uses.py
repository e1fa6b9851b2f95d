"""Generic calls whose weights meet the data in a layer or group norm (a norm subclass with a forward of its own):
per-example gradients from the normalised input the norm's node keeps."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hf_jd.autogram import Engine

from ._reference import assert_exact_step_with_freed_graph


class GroupNormActivation(nn.GroupNorm):
    """BiT's group norm followed by its activation."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm1P(nn.LayerNorm):
    """Nemotron's layer norm: a scale of ``1 + weight``, computed in float32."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight + 1, self.bias, self.eps).to(x.dtype)


class ScaleOnly(nn.Module):
    """A layer norm over the last two dimensions with a scale of its own (times 2) and no shift."""

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(shape) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight * 2)


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, features: int, tasks: int = 0) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(features, tasks or 3)
        self.tasks = tasks

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        logits = self.head(torch.tanh(self.body(x)).flatten(1))
        if self.tasks:  # [B, m] losses
            return logits ** 2
        return F.cross_entropy(logits, labels, reduction="none")


def _steps(model: nn.Module, shape: tuple[int, ...], single_backward: bool) -> None:
    engine = Engine(model, single_backward=single_backward)
    for batch in (10, 10, 9):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, *shape), torch.randint(0, 3, (batch,)))
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_group_norm_with_activation(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), GroupNormActivation(2, 4))
    with torch.no_grad():
        body[1].weight.uniform_(0.5, 1.5)
        body[1].bias.uniform_(-0.5, 0.5)
    _steps(Classifier(body, 4 * 5 * 5), (2, 5, 5), single_backward)
    assert {path for name, path in taken if name == "GroupNormActivation"} == {True}


@pytest.mark.parametrize("single_backward", [False, True])
def test_layer_norm_with_its_own_scale(single_backward: bool, taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 6), LayerNorm1P(6))
    _steps(Classifier(body, 4 * 6), (4, 3), single_backward)
    assert {path for name, path in taken if name == "LayerNorm1P"} == {True}


def test_layer_norm_over_two_dimensions_without_shift(taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 6), ScaleOnly((4, 6)))
    _steps(Classifier(body, 4 * 6), (4, 3), single_backward=False)
    assert {path for name, path in taken if name == "ScaleOnly"} == {True}


def test_time_major_layer_norm(taken: list[tuple[str, bool]]) -> None:
    """A layer norm on ``[T, B, d]`` positions: each position's block belongs to the example the check finds."""

    class TimeMajor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 5)
            self.norm = LayerNorm1P(5)
            self.head = nn.Linear(5, 3)

        def forward(self, x: Tensor, labels: Tensor) -> Tensor:
            states = self.norm(self.proj(x.transpose(0, 1)))  # [T, B, d]
            return F.cross_entropy(self.head(states.mean(0)), labels, reduction="none")

    torch.manual_seed(0)
    _steps(TimeMajor(), (4, 3), single_backward=True)
    assert {path for name, path in taken if name == "LayerNorm1P"} == {True}


def test_task_losses(taken: list[tuple[str, bool]]) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), GroupNormActivation(2, 4), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 6), LayerNorm1P(6))
    _steps(Classifier(body, 6, tasks=2), (2, 4, 4), single_backward=True)
    assert {path for name, path in taken if name in ("GroupNormActivation", "LayerNorm1P")} == {True}
