"""Groupings by example verified on one step and trusted on later steps of the same structure."""

from __future__ import annotations

import warnings

import pytest

import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import assert_exact_step_with_freed_graph


class _RolledBatch(nn.Module):
    """A fixed roll along the batch between two layers: the identity when the batch size divides the shift only."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> [B]
        batch, length, _ = x.shape
        h = self.mid(self.inp(x).roll(2, 0).reshape(-1, 4)).reshape(batch, length, 4)
        return self.out(torch.tanh(h)).pow(2).mean(1).squeeze(-1)


def test_grouping_verified_for_one_batch_size_is_not_trusted_for_another() -> None:
    """Verified with B = 2 (the roll is the identity), the same structure with B = 4 permutes the examples: it is
    checked again (it was trusted, 1.4e-2 off)."""
    torch.manual_seed(0)
    model = _RolledBatch()
    engine = Engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the roll mixes the examples: the engine says so
        for batch in (2, 3, 2, 4):
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 3, 3)), False)


class _RolledMix(nn.Module):
    """Examples mixed between two layers by a fixed roll along the batch (the identity when B divides the shift)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> [B]
        h = self.inp(x)
        return self.out(torch.tanh(h + 0.3 * h.roll(2, 0))).pow(2).mean(1).squeeze(-1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_mixing_checked_again_for_another_batch_size(single_backward: bool) -> None:
    """With B = 2 on the first step the roll mixes nothing; with B = 3 it does (the first step's finding was kept for
    later batch sizes, 1e-2 off)."""
    torch.manual_seed(1)
    model = _RolledMix()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine says the examples are mixed
        for batch in (2, 3, 3, 2, 4):
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 3, 3)), single_backward)


def test_losses_mixed_by_a_roll_for_some_batch_sizes() -> None:
    """Losses ``(l + l.roll(2)) / 2``: unmixed with B = 2, mixed with B = 3 or 4 (the B = 2 finding was trusted, up to
    200% off)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    engine = Engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (2, 3, 2, 4):
            model.zero_grad(set_to_none=True)
            token = model(torch.randn(batch, 3, 3)).squeeze(-1).pow(2).mean(1)
            assert_exact_step_with_freed_graph(engine, model, (token + token.roll(2, 0)) / 2, False)


@pytest.mark.parametrize("single_backward", [False, True])
def test_submodules_called_without_their_root_with_a_smaller_batch(single_backward: bool) -> None:
    """A step that calls the model's submodules directly, then a smaller batch (the last of an epoch): the batch size
    starts again with each forward pass (it was the largest so far: 'the losses have 2 rows but ... 3 examples')."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    engine = Engine(model, single_backward=single_backward)
    for batch in (2, 3, 2):
        model.zero_grad(set_to_none=True)
        hidden = model[1](model[0](torch.randn(batch, 3, 3)))  # the root's forward is not used
        assert_exact_step_with_freed_graph(engine, model, model[2](hidden).pow(2).mean(1).squeeze(-1), single_backward)
