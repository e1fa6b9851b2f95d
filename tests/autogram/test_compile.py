"""The engine on a model run through ``torch.compile``: compiled backward kernels cannot be vmapped, so
batches of vectors (one per task, or per loss row) are back-propagated one after the other there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_jd.autogram import Engine
from hf_jd.autogram._batched_grad import explain_donated_buffers

from ._reference import assert_gramian_matches, jacobian, trainable


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8))
        self.first = nn.Linear(8, 2)
        self.second = nn.Linear(8, 1)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(inputs)
        return self.first(features), self.second(features)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "single_backward"), [("tasks", False), ("examples_and_tasks", True)])
def test_compiled_model_gramian_and_step(mode: str, single_backward: bool) -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _TwoHeads()
    engine = Engine(model, batch_dim=None if mode == "tasks" else 0, single_backward=single_backward)
    compiled = torch.compile(model)
    inputs = torch.randn(4, 5)
    first, second = compiled(inputs)
    per_example = torch.stack([first.pow(2).mean(dim=1), (second[:, 0] - 1.0).pow(2)], dim=1)  # [B, 2]
    losses = per_example.mean(dim=0) if mode == "tasks" else per_example
    params = trainable(model)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses, retain_graph=True)
    assert_gramian_matches(gramian, jac)
    weights = torch.rand(losses.numel(), dtype=gramian.dtype) + 0.5
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights.view(losses.shape))
    expected = weights.to(jac.dtype) @ jac
    actual = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_donated_buffers_error_says_what_to_do() -> None:
    """AOTAutograd donates the saved buffers of a compiled backward unless told not to, which forbids the
    graph that the Gramian pass retains (seen on a compiled BERT): the engine's error says how to turn
    donation off; other errors pass through unchanged."""
    torch_message = (
        "This backward function was compiled with non-empty donated buffers which requires create_graph=False "
        "and retain_graph=False. Please keep backward(create_graph=False, retain_graph=False) across all "
        "backward() function calls, or set torch._functorch.config.donated_buffer=False to disable donated buffer."
    )
    with pytest.raises(RuntimeError, match="donated_buffer = False") as info, explain_donated_buffers():
        raise RuntimeError(torch_message)
    assert "Gramian pass keeps the graph" in str(info.value)
    with pytest.raises(RuntimeError, match="^something else$"), explain_donated_buffers():
        raise RuntimeError("something else")
