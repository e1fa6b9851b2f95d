"""Accumulation of the Gramian (:mod:`hf_jd.autogram._accumulate`): a weight used by several calls, some of which hold
output gradients larger than their per-row gradients (Linear layers on a table of positions broadcast over the batch,
as DeBERTa-v3's attention projections on its relative embeddings), has those uses' per-row gradients summed as they
arrive, and their records released, instead of all the uses held to the end of the pass; and a table's LayerNorm
computes its per-row input gradients in one buffer of their size."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine, _accumulate, _outer

from ._memory import peak_held_bytes
from ._reference import assert_exact_step, assert_gramian_matches, jacobian, trainable

EXAMPLES, LENGTH, WIDTH = 4, 5, 8


class _TableAttention(nn.Module):
    """Each projection used twice: on the tokens and on a table of positions shared by the examples (broadcast over
    the batch), the table a buffer or, as DeBERTa's, a layer-normalised embedding weight read directly."""

    def __init__(self, layers: int, positions: int, normalised: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(3, WIDTH)
        self.projections = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(layers))
        self.positions = nn.Embedding(positions, WIDTH)
        self.norm = nn.LayerNorm(WIDTH) if normalised else None
        if not normalised:
            self.positions.requires_grad_(False)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.embed(inputs)
        table = self.positions.weight if self.norm is None else self.norm(self.positions.weight)
        out = inputs.new_zeros(inputs.shape[0])
        for projection in self.projections:
            keys = projection(table).unsqueeze(0).expand(inputs.shape[0], -1, -1)
            scores = torch.bmm(projection(hidden), keys.transpose(1, 2))
            out = out + scores.tanh().mean(dim=(1, 2))
        return out


def _step(model: nn.Module, engine: Engine) -> tuple[Tensor, Tensor, int]:
    """Losses, Gramian and the most bytes held at once (tensors of at least 16 KiB) by its computation."""
    losses = model(torch.randn(EXAMPLES, LENGTH, 3)).pow(2)
    gramian, peak = peak_held_bytes(lambda: engine.compute_gramian(losses), 16 * 1024)
    return losses, gramian, peak


def test_uses_on_a_shared_table_are_not_held_to_the_end_of_the_pass() -> None:
    torch.manual_seed(0)
    positions = 256
    model = _TableAttention(layers=4, positions=positions, normalised=False)
    engine = Engine(model, batch_dim=0)
    for _ in range(2):  # (the second step with the plans of the first)
        losses, gramian, peak = _step(model, engine)
        assert_gramian_matches(gramian, jacobian(losses, trainable(model)))
    table_grads = EXAMPLES * positions * WIDTH * 4  # bytes of one use's per-example output gradients
    # Before: the four table uses' output gradients were all held until the end of the pass (5 of them at the peak).
    assert peak <= 3 * table_grads


def test_layer_normalised_table_per_row_gradients_in_one_buffer() -> None:
    torch.manual_seed(0)
    positions = 1024
    model = _TableAttention(layers=1, positions=positions, normalised=True)
    engine = Engine(model, batch_dim=0)
    for _ in range(2):
        losses, gramian, peak = _step(model, engine)
        assert_gramian_matches(gramian, jacobian(losses, trainable(model)))
    rows = EXAMPLES * positions * WIDTH * 4  # bytes of the table's per-example gradients
    # The per-row gradients of the table under the LayerNorm held five buffers of their size (6.25 at the peak, with
    # the output gradients), then two (4.375, with the broadcast plan's per-example stack built from a list).
    assert peak <= 4 * rows


@pytest.mark.parametrize("single_backward", [False, True])
def test_summed_uses_step(single_backward: bool) -> None:
    """The weighted backward after the summed uses gives the autojac step (and the single backward, which keeps its
    uses, the same)."""
    torch.manual_seed(0)
    model = _TableAttention(layers=2, positions=64, normalised=True)
    engine = Engine(model, batch_dim=0, single_backward=single_backward)
    losses = model(torch.randn(EXAMPLES, LENGTH, 3)).pow(2)
    assert_exact_step(engine, losses, trainable(model), single_backward=single_backward)


class _TiedHead(nn.Module):
    """A small vocabulary whose output projection is tied to the input embedding: the head's per-row gradients
    (``R × V d``) are smaller than its output gradients (``B T V``), the embedding's are not summed as they arrive."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.head(torch.tanh(self.mix(self.embed(ids))))
        return nn.functional.cross_entropy(logits.transpose(1, 2), ids.roll(1, dims=1), reduction="none").mean(1)


@pytest.mark.parametrize(("length", "budget"), [(3, None), (40, None), (40, 100)])
def test_tied_embedding_with_a_summed_head(length: int, budget: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's rows are summed on long sequences only, and only within the budget of rows materialised at once
    (at GPT-2's full size, the sum and the embedding's rows added to it would take 2 x 2.5 GB at B=16)."""
    if budget is not None:  # (R numel = 4 x 48 = 192 entries)
        monkeypatch.setattr(_outer, "MAX_ROW_ENTRIES", budget)
    summed: list[bool] = []
    original = _accumulate._rows_smaller_than_factors
    monkeypatch.setattr(
        _accumulate, "_rows_smaller_than_factors", lambda *args: summed.append(original(*args)) or summed[-1]
    )
    torch.manual_seed(0)
    model = _TiedHead(vocab=6)
    engine = Engine(model, batch_dim=0)
    losses = model(torch.randint(0, 6, (EXAMPLES, length)))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert any(summed) == (length == 40 and budget is None)
