"""When the engine back-propagates several vectors in one vmapped pass, and when one vector at a time.

The result is the same either way (checked against the explicit Jacobian); these tests check the choice itself, which
is only visible in the cost: the engine's products of one generic call over its loss rows must stay batched where
vmap works, and fall back to a loop only where it does not (compiled graphs, checkpointed blocks, group norms of
channels-last inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_gramian_matches, grads_of, jacobian, trainable


@contextmanager
def counted_passes() -> Iterator[dict[str, int]]:
    """Count the backward passes over a batch of vectors (``is_grads_batched=True``) and over one vector."""
    counts = {"batched": 0, "single": 0}
    original = torch.autograd.grad

    def grad(*args: Any, **kwargs: Any) -> Any:
        counts["batched" if kwargs.get("is_grads_batched") else "single"] += 1
        return original(*args, **kwargs)

    torch.autograd.grad = grad
    try:
        yield counts
    finally:
        torch.autograd.grad = original


class _LayerScale(nn.Module):
    """A direct parameter used on a channels-last tensor (ConvNeXt's layer scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        return (self.gamma * x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # back to [N, C, H, W], channels-last


def _model(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), norm, _LayerScale(4), nn.Flatten(1),
                         nn.Linear(4 * 5 * 5, 3))


@pytest.mark.parametrize("group_norm", [False, True])
def test_channels_last_inputs_are_vmapped_unless_a_group_norm_needs_the_loop(group_norm: bool) -> None:
    """Channels-last inputs used to send every product through the one-vector loop; only a GroupNorm's backward kernel
    needs it (vmap rejects its memory-format query), so other channels-last graphs keep their batched passes."""
    torch.manual_seed(0)
    model = _model(nn.GroupNorm(2, 4) if group_norm else nn.Tanh())
    engine = Engine(model)
    x = torch.randn(5, 5, 5, 4).permute(0, 3, 1, 2)  # channels-last
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    losses = model(x).pow(2).mean(1)
    jac = jacobian(losses, trainable(model))
    with counted_passes() as counts:
        gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jac)
    if group_norm:
        assert counts["batched"] == 0
    else:
        assert counts["batched"] > 0


def test_a_trusted_grouping_keeps_the_generic_products_batched() -> None:
    """On a later step of a model whose grouping was verified (ConvNeXt: its layer scales' products start where the
    parameters are used, checked on the first step), the pass over the plain vector alone runs as one ordinary
    backward pass, but the generic calls' products over the loss rows stay batched (they were looped too)."""
    torch.manual_seed(0)
    config = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2,
                               image_size=8, num_labels=3)
    model = tf.ConvNextForImageClassification(config)
    engine = Engine(model)
    for _ in range(2):
        losses = model(pixel_values=torch.randn(4, 3, 8, 8)).logits.logsumexp(-1)
        jac = jacobian(losses, trainable(model))
        with counted_passes() as counts:
            gramian = engine.compute_gramian(losses)
        assert_gramian_matches(gramian, jac)
        model.zero_grad(set_to_none=True)
    assert engine._verified_groupings, "the second step did not reuse a verified grouping"
    assert counts["batched"] > 0


class _Unpooled(nn.Module):
    """max_pool then max_unpool of channels-last features (the unpooling's backward kernel vmap rejects for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        pooled, indices = nn.functional.max_pool2d(torch.tanh(self.conv(x)), 2, return_indices=True)
        return self.head(nn.functional.max_unpool2d(pooled, indices, 2).flatten(1))


class _FunctionalGroupNorm(nn.Module):
    """``F.group_norm`` inside a forward, on a tensor no module call receives: channels-last only because the model's
    convolution weights are (``model.to(memory_format=torch.channels_last)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.affine = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        normalised = nn.functional.group_norm(self.conv(x), 2, self.affine)
        return self.head(normalised.mean((2, 3)))


@pytest.mark.parametrize("model_class", [_Unpooled, _FunctionalGroupNorm])
def test_channels_last_tensors_seen_in_the_graph_loop(model_class: type[nn.Module]) -> None:
    """Whether vmap rejects a backward kernel is read from the graph's nodes (the layout of the tensor they saved), also
    when no module call received a channels-last input: the pass loops over the vectors and stays exact."""
    torch.manual_seed(0)
    model = model_class()
    x = torch.randn(3, 3, 4, 4)
    if model_class is _Unpooled:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        model = model.to(memory_format=torch.channels_last)
    engine = Engine(model)
    out = model(x)
    losses = torch.stack([out.logsumexp(1), out.pow(2).mean(1)], 1)  # [B, 2]
    jac = jacobian(losses, trainable(model))
    with counted_passes() as counts:
        gramian = engine.compute_gramian(losses)
    assert_gramian_matches(gramian, jac)
    assert counts["batched"] == 0


class _GroupNormNet(nn.Module):
    """A channels-last stem, a group norm (called, or its parameters passed to ``F.group_norm`` by a parent with a
    parameter of its own), a head."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.tensor(1.5)) if functional else None
        self.functional = functional

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        if self.functional:
            assert self.scale is not None
            h = nn.functional.group_norm(h, 2, self.gn.weight, self.gn.bias) * self.scale
        else:
            h = self.gn(h)
        return self.head(torch.tanh(h).mean((2, 3)))


@pytest.mark.parametrize("case", ["norm_outside_engine", "functional_in_parent", "check_gramian"])
def test_passes_that_ask_a_channels_last_group_norm_for_its_weight_only(case: str) -> None:
    """torch 2.13 crashes the process (a segmentation fault) when a channels-last group norm's backward is asked for
    its weight's gradient but not its input's: the single backward's pass for parameters outside the engine, the pass
    of a parent's generic check, and check_gramian's pass ask for the group norm's input gradient too."""
    torch.manual_seed(0)
    model = _GroupNormNet(functional=case == "functional_in_parent")
    if case == "norm_outside_engine":
        engine = Engine(model.stem, model.head, single_backward=True)
    elif case == "check_gramian":
        model.gn.requires_grad_(True)
        engine = Engine(model.gn, model.head)
    else:
        engine = Engine(model, single_backward=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(3, 3, 4, 4))
        losses = out.logsumexp(1)
        params = trainable(model)
        jac = jacobian(losses, params)  # (all of them: asking for some only would crash torch here too)
        covered = {id(p) for p in trainable(*engine._capture.roots)}
        columns = torch.cat([torch.full((p.numel(),), id(p) in covered) for p in params])
        gramian = engine.compute_gramian(losses, retain_graph=True)
        assert_gramian_matches(gramian, jac[:, columns])
        weights = torch.linspace(0.5, 1.5, 3)
        if case == "check_gramian":
            engine.check_gramian(losses, gramian, weights)
            losses.backward(weights)
        else:
            engine.backward(weights)
        torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)
