"""Time-major layouts whose sizes coincide with the batch size on some steps: the engine's remembered checks and
its choice of the batched closed forms must not be fooled by them (exact Gramians compared with explicit Jacobians).

- A time-major ``[T, B, d]`` call seen with ``T = 1`` (in steps whose hidden size equals the batch size, which
  triggers the layout check) says nothing about whether its ``[T, B, d]`` tensors are batch-major when ``T = B``,
  nor does a batch-major call of a module about another call of it.
- With ``batch_dim=1``, convolutions and GroupNorm (whose closed forms need the samples along dimension 0) whose
  channels happen to number the examples (``C = B``) take the exact per-row path, as they do for ``C != B``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import jacobian, trainable


def _assert_exact(engine: Engine, losses: Tensor, model: nn.Module) -> None:
    """The engine's Gramian equals ``J Jᵀ`` of the explicit Jacobian (relative to its largest entry)."""
    jac = jacobian(losses, trainable(model))
    expected = jac @ jac.T
    gramian = engine.compute_gramian(losses)
    torch.testing.assert_close(gramian, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_time_major_call_seen_with_t_1_is_checked_when_t_equals_the_batch_size() -> None:
    """Steps with T = 1 and d = B verify the batch-major calls (their [B, 1, d] tensors have B along two
    dimensions); the time-major [1, B, d] call in between was not one of them, so on a later step with T = B its
    [T, B, d] tensors, which look batch-major, must be checked, not trusted (3.6 % off before)."""

    class TimeMajorMiddle(nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.proj, self.mid, self.head = nn.Linear(3, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

        def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
            h = torch.tanh(self.mid(self.proj(x).transpose(0, 1)))  # time-major [T, B, d]
            return self.head(h.transpose(0, 1)).squeeze(-1).pow(2).mean(1)  # [B]

    torch.manual_seed(0)
    model = TimeMajorMiddle(hidden=4)
    engine = Engine(model)
    for batch, length in [(4, 1), (4, 1), (3, 3)]:  # d == B on the first steps, T == B on the last
        _assert_exact(engine, model(torch.randn(batch, length, 3)), model)


def test_batch_major_conv_with_one_channel_and_one_example_under_batch_dim_1() -> None:
    """A time-major model (batch_dim=1) with a Conv1d on batch-major [B, C, T] tensors: with C = B = 1 the
    channels' size matched the batch size and the closed form raised that the examples would be mixed; like
    C != B, it takes the exact per-row path."""

    class ConvOnBatchMajor(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.proj, self.conv = nn.Linear(3, channels), nn.Conv1d(channels, channels, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:  # x: time-major [T, B, 3]
            return self.conv(self.proj(x).permute(1, 2, 0)).pow(2).mean((1, 2))  # conv on [B, C, T]; losses [B]

    torch.manual_seed(0)
    model = ConvOnBatchMajor(channels=1)
    engine = Engine(model, batch_dim=1)
    _assert_exact(engine, model(torch.randn(5, 1, 3)), model)


def test_group_norm_with_the_examples_as_channels_under_batch_dim_1_and_task_losses() -> None:
    """batch_dim=1, [B, m] losses: a GroupNorm on time-major [T, C, L] tensors whose channels are the examples
    (C = B, one group per channel) passes the grouping check along dimension 1, but its closed form needs the
    samples along dimension 0 (it raised): the exact per-row path."""

    class ExamplesAsChannels(nn.Module):
        def __init__(self, batch: int) -> None:
            super().__init__()
            self.proj, self.norm, self.head = nn.Linear(3, 5), nn.GroupNorm(batch, batch), nn.Linear(5, 2)

        def forward(self, x: Tensor) -> Tensor:  # x: time-major [T, B, 3]
            h = self.norm(self.proj(x))  # [T, B, 5]: GroupNorm samples T, channels B, positions 5
            return (self.head(h) - 0.5).pow(2).mean(0)  # [B, 2]

    torch.manual_seed(0)
    model = ExamplesAsChannels(batch=2).double()
    engine = Engine(model, batch_dim=1)
    for length in (3, 4):
        _assert_exact(engine, model(torch.randn(length, 2, 3, dtype=torch.float64)), model)


def test_group_norm_on_rows_with_as_many_channels_as_examples_under_batch_dim_1_and_task_losses() -> None:
    """batch_dim=1, [B, m] losses: a GroupNorm on flattened [B * T, C] rows with C = B, whose output gradients are
    all zero (a second GroupNorm of one channel per group normalises them away), passes the grouping check along
    dimension 1 (it cannot fail) and raised in its closed form: the exact per-row path."""

    class RowNorm(nn.Module):
        def __init__(self, batch: int) -> None:
            super().__init__()
            self.proj, self.norm, self.head = nn.Linear(3, batch), nn.GroupNorm(batch, batch), nn.Linear(batch, 2)

        def forward(self, x: Tensor) -> Tensor:  # x: time-major [T, B, 3]
            h = self.proj(x.transpose(0, 1))  # batch-major [B, T, C]
            b, t, c = h.shape
            rows = self.norm(self.norm(h.reshape(b * t, c)))  # GroupNorm on [B * T, C] rows, twice
            return (self.head(h + rows.reshape(b, t, c)) - 0.5).pow(2).mean(1)  # [B, 2]

    torch.manual_seed(0)
    model = RowNorm(batch=2).double()
    engine = Engine(model, batch_dim=1)
    _assert_exact(engine, model(torch.randn(3, 2, 3, dtype=torch.float64)), model)



def test_module_shared_by_a_batch_major_and_a_time_major_call() -> None:
    """One GroupNorm (as many channels as examples) applied to batch-major [B, C, L] tensors and to time-major
    [T, B, L] ones: the first steps (T = 1) verify its batch-major call only; when T = B its time-major call looks
    batch-major too and must be checked, not trusted because another call of the same module passed."""

    class SharedNorm(nn.Module):
        def __init__(self, batch: int) -> None:
            super().__init__()
            self.batch = batch
            self.wide, self.proj, self.head = nn.Linear(3, batch * 5), nn.Linear(3, 5), nn.Linear(5, 1)
            self.norm = nn.GroupNorm(batch, batch)  # one group per channel, normalised over 5 positions

        def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
            b, t, _ = x.shape
            batch_major = self.norm(self.wide(x).reshape(b, t, self.batch, 5).mean(1))  # [B, C, 5]
            time_major = self.norm(torch.tanh(self.proj(x)).transpose(0, 1))  # [T, B, 5]: channels are examples
            # (a layer after the time-major call: the check for losses that mix the examples does not reach it)
            return batch_major.pow(3).mean((1, 2)) + self.head(time_major.transpose(0, 1)).pow(2).mean((1, 2))

    torch.manual_seed(0)
    model = SharedNorm(batch=2).double()
    engine = Engine(model)
    for length in (1, 1, 2):  # T = 1, then T = B
        _assert_exact(engine, model(torch.randn(2, length, 3, dtype=torch.float64)), model)


class _FeatureScale(nn.Module):
    """A generic call: a learned scale of the features (no closed form)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class _TimeMajorGeneric(nn.Module):
    """Batch-major features → time-major ``[T, B, d]`` generic calls (a feature scale, PReLU, an RMSNorm) → losses."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(3, width), nn.Linear(width, 1)
        self.scale, self.act, self.norm = _FeatureScale(width), nn.PReLU(), nn.RMSNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
        h = self.norm(self.act(self.scale(self.proj(x).transpose(0, 1))))  # [T, B, d]
        return self.head(h.transpose(0, 1)).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_generic_time_major_calls_whose_width_equals_the_batch_size(
    single_backward: bool, per_row_calls: list[str]
) -> None:
    """``[T, B, d]`` generic calls with ``d = B``: both dimensions offer the batch size; the grouping check tries each
    and keeps the one that holds the examples (every step took the per-row pass: XLNet with ``B = d_model`` at 35 times
    a plain step). The Gramian and the update stay exact, with ``d = B`` and without."""
    from ._reference import assert_exact_step

    torch.manual_seed(0)
    model = _TimeMajorGeneric(width=4)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (the per-row path warns)
        for batch, length in [(4, 3), (4, 5), (3, 3), (4, 3)]:
            model.zero_grad(set_to_none=True)
            assert_exact_step(engine, model(torch.randn(batch, length, 3)), trainable(model), single_backward)
    assert per_row_calls == []
