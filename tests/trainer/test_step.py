"""Unit tests of the JD step helpers: module selection and weight reuse."""

from __future__ import annotations

import pytest
import torch

from hf_jd.aggregation import UPGrad, get_aggregator
from hf_jd.trainer._step import JDStep, select_modules

from jd_trainer_helpers import TwoTaskNet


def test_select_modules_whole_model_by_default():
    model = TwoTaskNet()
    assert select_modules(model, None) == [("", model)]


def test_select_modules_patterns_keep_outermost_only():
    model = TwoTaskNet()
    selected = select_modules(model, ["encoder.*", "encoder", "head_?"])
    assert [name for name, _ in selected] == ["encoder", "head_a", "head_b"]
    selected = select_modules(model, ["encoder.0", "encoder.2"])
    assert [name for name, _ in selected] == ["encoder.0", "encoder.2"]
    assert selected[0][1] is model.encoder[0]


def test_select_modules_unknown_pattern():
    with pytest.raises(ValueError, match="'dec' matches no submodule of TwoTaskNet. Names look like: encoder"):
        select_modules(TwoTaskNet(), ["dec"])


def _step(mode: str, **kwargs) -> JDStep:
    return JDStep(get_aggregator("upgrad"), mode=mode, engine="autojac", task_names=["a", "b"], **kwargs)


def test_needs_weights_every_k_steps():
    step = _step("mtl", update_weights_every=3)
    assert step.needs_weights(5)  # nothing cached yet
    step.cached_weights = torch.tensor([0.5, 0.5])
    assert [step.needs_weights(s) for s in range(7)] == [True, False, False, True, False, False, True]


def test_reused_weights_for_another_batch_size_are_task_means():
    step = _step("iwmtl")
    step.cached_weights = torch.tensor([[0.1, 0.2], [0.3, 0.6]])
    same = step._reusable_weights(torch.zeros(2, 2))
    torch.testing.assert_close(same, step.cached_weights)
    other = step._reusable_weights(torch.zeros(3, 2))
    torch.testing.assert_close(other, torch.tensor([[0.2, 0.4]] * 3))
    step = _step("iwrm")
    step.cached_weights = torch.tensor([0.1, 0.3])
    torch.testing.assert_close(step._reusable_weights(torch.zeros(3)), torch.full((3,), 0.2))


def test_state_dict_round_trip():
    step = JDStep(get_aggregator("random", seed=0), mode="mtl", engine="autojac", task_names=["a", "b"])
    step.cached_weights = torch.tensor([0.2, 0.8])
    step.skipped_steps = 2
    state = step.state_dict()
    expected = step.aggregator(torch.eye(2))
    other = JDStep(get_aggregator("random", seed=5), mode="mtl", engine="autojac", task_names=["a", "b"])
    other.load_state_dict(state)
    torch.testing.assert_close(other.cached_weights, torch.tensor([0.2, 0.8]))
    assert other.skipped_steps == 2
    torch.testing.assert_close(other.aggregator(torch.eye(2)), expected)


def test_autogram_needs_gramian_based_aggregator():
    with pytest.raises(ValueError, match="autogram engine needs a Gramian-based aggregator"):
        JDStep(get_aggregator("graddrop"), mode="mtl", engine="autogram", task_names=["a", "b"])


class _ClippedUPGrad(UPGrad):
    """UPGrad whose update is clipped to norm 1: its weights no longer define its update."""

    def aggregate(self, matrix: torch.Tensor) -> torch.Tensor:
        update = super().aggregate(matrix)
        return update / max(1.0, float(update.norm()))


def test_autogram_rejects_an_aggregator_that_overrides_aggregate():
    with pytest.raises(ValueError, match="_ClippedUPGrad overrides aggregate.*jd_engine='autojac'"):
        JDStep(_ClippedUPGrad(), mode="mtl", engine="autogram", task_names=["a", "b"])
    step = JDStep(_ClippedUPGrad(), mode="mtl", engine="autojac", task_names=["a", "b"])
    assert step.weighting is None  # (no weights to reuse or to give parameters outside the Jacobian)
    partial = JDStep(_ClippedUPGrad(), mode="mtl", engine="autojac", task_names=["a", "b"], module_patterns=["encoder"])
    with pytest.raises(ValueError, match="overrides aggregate"):
        partial.setup(TwoTaskNet())


def test_setup_splits_covered_and_other_parameters():
    model = TwoTaskNet()
    step = _step("mtl", module_patterns=["encoder"])
    step.setup(model)
    assert {id(p) for p in step._covered} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in step._others} == {id(p) for p in [*model.head_a.parameters(), *model.head_b.parameters()]}
    other = TwoTaskNet()
    step.setup(other)  # another model: set up again
    assert {id(p) for p in step._covered} == {id(p) for p in other.encoder.parameters()}


def _run_step(engine: str, scale: float, loss_scale: float, mode: str = "mtl") -> torch.Tensor:
    """One JDStep on a fresh copy of the same model, with a simulated fp16 loss scaler."""
    torch.manual_seed(0)
    model = TwoTaskNet()
    step = JDStep(get_aggregator("upgrad"), mode=mode, engine=engine, task_names=["a", "b"])
    step.setup(model)
    generator = torch.Generator().manual_seed(1)
    x, labels_a = torch.randn(4, 6, generator=generator), torch.randn(4, generator=generator)
    labels_b = torch.randint(0, 3, (4,), generator=generator)

    def forward():
        out = model(x, labels_a, labels_b, loss_reduction="mean" if mode == "mtl" else "none")
        return torch.stack([out["losses"]["a"], out["losses"]["b"]], dim=-1), out

    def backward(loss, **kwargs):
        (loss * loss_scale).backward(**kwargs)

    step.run(forward, backward, scale=scale, global_step=0, grad_factor=scale * loss_scale)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("mode", ["mtl", "iwmtl"])
def test_engines_agree_under_scaling(mode):
    """Both engines give the same .grad, scaled by the accumulation factor and the loss scale."""
    reference = _run_step("autojac", 1.0, 1.0, mode)
    for engine in ("autojac", "autogram"):
        torch.testing.assert_close(_run_step(engine, 0.5, 8.0, mode), 4.0 * reference, rtol=1e-4, atol=1e-6)
