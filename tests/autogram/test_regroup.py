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


class _SortedByLength(nn.Module):
    """Examples sorted by a length between two layers and put back in order before the head (as code packing
    sequences by length does), with token ids looked up in an embedding and no dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.first, self.second, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:  # [B, T], [B] -> [B]
        h = torch.tanh(self.first(self.emb(ids).mean(1)))
        order = torch.argsort(lengths, descending=True)
        h = torch.tanh(self.second(h[order]))
        return self.head(h[torch.argsort(order)]).squeeze(-1).pow(2)


@pytest.mark.parametrize("single_backward", [False, True])
def test_order_picked_by_the_data_is_checked_on_every_step(single_backward: bool) -> None:
    """A first batch already in order (the identity) passes the grouping check; later batches in another order are
    checked again. Everything above the token ids' lookup used to count as computed from parameters alone, so the
    indexing was not seen as picking rows by the data and the first step's grouping was trusted: 16% off."""
    torch.manual_seed(0)
    model = _SortedByLength()
    engine = Engine(model, single_backward=single_backward)
    generator = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reordered calls take the per-row path: the engine says so
        for step in range(3):
            ids = torch.randint(0, 30, (6, 5), generator=generator)
            lengths = torch.arange(6, 0, -1) if step == 0 else torch.randperm(6, generator=generator) + 1
            model.zero_grad(set_to_none=True)
            assert_exact_step_with_freed_graph(engine, model, model(ids, lengths), single_backward)


class _BufferIndexedTable(nn.Module):
    """Rows regrouped to ``[B * T, d]`` plus a parameter table looked up at a buffer's indices (Swin's relative
    positions): the same on every step, so the verified grouping is trusted."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 4)
        self.table = nn.Parameter(torch.randn(7, 4))
        self.register_buffer("index", torch.tensor([3, 1, 4, 1, 5]))
        self.mid, self.out = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, ids: Tensor) -> Tensor:  # [B, 5] -> [B]
        h = self.emb(ids) + self.table[self.index]
        h = self.mid(h.reshape(-1, 4)).reshape(ids.shape[0], -1, 4)
        return self.out(torch.tanh(h)).pow(2).mean(1).squeeze(-1)


def test_lookup_at_a_buffers_indices_keeps_the_grouping_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The regrouped rows are verified on the first step only: the table's lookup at a buffer's indices selects no
    row by the data, while the token ids' lookup does not move rows."""
    from hf_jd.autogram import engine as engine_module

    trusted: list[bool] = []
    original = engine_module.grads_verified

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        trusted.append(kwargs.get("trusted") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "grads_verified", recorded)
    torch.manual_seed(0)
    model = _BufferIndexedTable()
    engine = Engine(model)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, model(torch.randint(0, 30, (3, 5))), False)
    assert trusted[-1] and not trusted[0]
