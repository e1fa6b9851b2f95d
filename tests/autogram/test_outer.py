"""Per-row gradients ``Σ_t g_t a_tᵀ`` of Linear-like uses (:mod:`hf_jd.autogram._outer`) and their Gram sums over the
uses of a shared weight (:mod:`hf_jd.autogram._shared`), against explicit per-row gradients: inputs shared by all the
examples (a table broadcast over the batch, repeated per example as a stride-0 view) take one product with the table,
and each use's rows are computed once for the Gram of a weight's several uses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hf_jd.autogram import _outer, _shared
from hf_jd.autogram._outer import OuterProductRecord, OuterProductRows


def _explicit_rows(inputs: Tensor, grads: Tensor, transposed: bool) -> Tensor:
    """``[R, numel]`` per-row gradients from the copied inputs, in the weight's layout."""
    inputs = inputs.contiguous()
    if transposed:  # weight [d_in, d_out]
        rows = torch.einsum("eti,ektj->ekij", inputs, grads)
    else:  # weight [d_out, d_in]
        rows = torch.einsum("ektj,eti->ekji", grads, inputs)
    return rows.reshape(grads.shape[0] * grads.shape[1], -1)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_inputs_shared_by_the_examples(transposed: bool, chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    if chunked:  # (slices of the weight's first dimension at a time)
        monkeypatch.setattr(_outer, "CPU_CHUNK_ENTRIES", 64)
    table = torch.randn(7, 5, dtype=torch.float64)
    inputs = table.unsqueeze(0).expand(4, 7, 5)  # [E, T, d_in], stride 0 along the examples
    grads = torch.randn(4, 2, 7, 3, dtype=torch.float64)  # [E, m, T, d_out]
    factors = OuterProductRows(inputs, grads, transposed)
    assert factors.shared is not None
    assert not factors.prefers_ghost()
    expected = _explicit_rows(inputs, grads, transposed)
    torch.testing.assert_close(factors.weight_rows(), expected)
    torch.testing.assert_close(factors.weight_gram(), expected @ expected.T)
    weights = torch.rand(4, 2, dtype=torch.float64)
    torch.testing.assert_close(factors.weighted_weight_grad(weights), weights.reshape(-1) @ expected)
    # (rows kept for the single backward, then the factors dropped)
    kept = OuterProductRows(inputs, grads, transposed)
    kept.weight_rows(keep=True)
    kept.compact()
    assert kept.shared is None and kept.inputs is None
    torch.testing.assert_close(kept.weighted_weight_grad(weights), weights.reshape(-1) @ expected)


def test_inputs_of_each_example_are_not_shared() -> None:
    inputs = torch.randn(4, 7, 5)
    assert OuterProductRows(inputs, torch.randn(4, 1, 7, 3)).shared is None
    assert OuterProductRows(inputs[:1], torch.randn(1, 1, 7, 3)).shared is None  # (one example)


class _Use(OuterProductRecord):
    """A record holding given factors (the Gram sums only read them)."""

    def __init__(self, factors: OuterProductRows) -> None:  # (no module: not a captured call)
        self.factors = factors
        self.layout = None

    def _bind(self, grads: list[Tensor | None], layout: object) -> None:  # pragma: no cover - not bound
        raise AssertionError


@pytest.mark.parametrize("chunked", [False, True])
def test_rows_of_each_use_of_a_shared_weight_are_computed_once(chunked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight used by three calls (a reused layer, a projection applied to the hidden states and to a shared table):
    the Gram of its summed per-row gradients, each use's rows materialised once (per slice of the weight)."""
    torch.manual_seed(1)
    if chunked:
        monkeypatch.setattr(_outer, "CPU_CHUNK_ENTRIES", 12)
    table = torch.randn(9, 3, dtype=torch.float64)
    uses = [  # (long rows of small weights: materialised, not in the ghost form)
        OuterProductRows(torch.randn(4, 12, 3, dtype=torch.float64), torch.randn(4, 1, 12, 2, dtype=torch.float64)),
        OuterProductRows(torch.randn(4, 10, 3, dtype=torch.float64), torch.randn(4, 1, 10, 2, dtype=torch.float64)),
        OuterProductRows(table.expand(4, 9, 3), torch.randn(4, 1, 9, 2, dtype=torch.float64)),
    ]
    assert not any(use.prefers_ghost() for use in uses)
    expected = sum(_explicit_rows(use.inputs, use.grads, False) for use in uses)
    calls: list[slice | None] = []
    original = OuterProductRows.weight_rows

    def counted(self: OuterProductRows, keep: bool = False, part: slice | None = None) -> Tensor:
        calls.append(part)
        return original(self, keep, part)

    monkeypatch.setattr(OuterProductRows, "weight_rows", counted)
    gram = _shared.shared_gram([(_Use(use), "weight") for use in uses], 4, torch.float64)
    torch.testing.assert_close(gram, expected @ expected.T)
    assert len(calls) == len(uses) * len(uses[0]._chunks())


def test_rows_on_the_cpu_go_in_smaller_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, rows only multiplied into the Gramian are materialised within CPU_CHUNK_ENTRIES (buffers that
    glibc recycles); elsewhere within MAX_ROW_ENTRIES. Rows kept for the single backward are computed whole."""
    monkeypatch.setattr(_outer, "CPU_CHUNK_ENTRIES", 4 * 3)  # (4 rows x 3 inputs: one row of the weight per chunk)
    torch.manual_seed(3)
    inputs, grads = torch.randn(4, 12, 3, dtype=torch.float64), torch.randn(4, 1, 12, 5, dtype=torch.float64)
    factors = OuterProductRows(inputs, grads)
    assert not factors.prefers_ghost()
    assert len(factors._chunks()) == 5
    assert len(OuterProductRows(inputs.to("meta"), grads.to("meta"))._chunks()) == 1
    expected = _explicit_rows(inputs, grads, False)
    parts: list[slice | None] = []
    original = OuterProductRows.weight_rows

    def recorded(self: OuterProductRows, keep: bool = False, part: slice | None = None) -> Tensor:
        parts.append(part)
        return original(self, keep, part)

    monkeypatch.setattr(OuterProductRows, "weight_rows", recorded)
    torch.testing.assert_close(factors.weight_gram(), expected @ expected.T)
    assert len(parts) == 5 and None not in parts and factors._rows is None
    # (kept: 4 x 15 entries, fewer than the 240 of the output gradients they replace)
    parts.clear()
    torch.testing.assert_close(factors.weight_gram(keep_rows=True), expected @ expected.T)
    assert parts == [None] and factors._rows is not None
    weights = torch.rand(4, 1, dtype=torch.float64)
    torch.testing.assert_close(factors.weighted_weight_grad(weights), weights.reshape(-1) @ expected)


def test_output_gradients_arriving_as_a_permuted_view_are_laid_out_once() -> None:
    """An output gradient that arrives as a permuted view (a language model's logits under a loss taken on their
    ``[B, V, T]`` transpose) is made contiguous once, not copied again by each product reading it."""
    torch.manual_seed(2)
    inputs = torch.randn(4, 6, 5)
    grads = torch.randn(4, 9, 6).transpose(1, 2).unsqueeze(1)  # [E, m, T, d_out], not contiguous
    factors = OuterProductRows(inputs, grads)
    assert factors.grads.is_contiguous()
    expected = _explicit_rows(inputs, grads, False)
    torch.testing.assert_close(factors.weight_gram(), expected @ expected.T)
