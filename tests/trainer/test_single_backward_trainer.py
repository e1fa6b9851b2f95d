"""``jd_single_backward``: the engine writes the update itself; the first steps equal the two-pass ones.

Also the first-step self-check of the Gramian (``Engine.check_gramian``) run by JDTrainer, and the
single-backward step under DDP (2 CPU processes, gloo) against the two-pass step.
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from distributed_workers.launch import spawn
from hf_jd import JDTrainer
from jd_trainer_helpers import TASKS, GradCapture, TwoTaskNet, make_args, tiny_bert, token_dataset, two_task_dataset


def _train(tmp_path: Path, model: nn.Module, dataset: Any, **kwargs: Any) -> list[Tensor]:
    capture = GradCapture()
    args = make_args(tmp_path, **kwargs)
    JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture]).train()
    return capture.grads


@pytest.mark.parametrize("ga", [1, 2])
def test_iwrm_steps_equal_two_pass_steps(tmp_path, ga):
    torch.manual_seed(0)
    model = tiny_bert()
    twin = copy.deepcopy(model)
    dataset = token_dataset()
    kwargs = {"jd_mode": "iwrm", "gradient_accumulation_steps": ga, "max_steps": 2}
    two_pass = _train(tmp_path / "two", model, dataset, **kwargs)
    single = _train(tmp_path / "one", twin, dataset, jd_single_backward=True, **kwargs)
    assert len(single) == len(two_pass) == 2
    for step, (expected, actual) in enumerate(zip(two_pass, single)):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=f"step {step}")


@pytest.mark.parametrize("mode", ["mtl", "iwmtl"])
def test_multitask_and_partial_coverage_equal_two_pass(tmp_path, mode):
    # jd_modules=encoder: the heads are outside the engine, so the single-backward update gives them
    # their gradient by the engine's fallback (an ordinary weighted backward restricted to them).
    model = TwoTaskNet()
    twin = copy.deepcopy(model)
    dataset = two_task_dataset()
    kwargs = {"jd_mode": mode, "jd_task_names": TASKS, "jd_modules": ["encoder"], "jd_aggregator": "mgda",
              "gradient_accumulation_steps": 2, "max_steps": 1}  # fmt: skip
    two_pass = _train(tmp_path / "two", model, dataset, **kwargs)
    single = _train(tmp_path / "one", twin, dataset, jd_single_backward=True, **kwargs)
    torch.testing.assert_close(single[0], two_pass[0], rtol=1e-4, atol=1e-6)


def test_engine_is_built_in_single_backward_mode(tmp_path):
    args = make_args(tmp_path, jd_mode="iwrm", jd_single_backward=True, max_steps=1)
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    trainer.train()
    assert trainer.jd_step.single_backward
    assert trainer.jd_step.engine._single_backward
    assert trainer.jd_step._gramian_checked  # the first step verified the Gramian


def test_arguments_reject_single_backward_without_autogram(tmp_path):
    with pytest.raises(ValueError, match="jd_single_backward=True needs the autogram engine"):
        make_args(tmp_path, jd_mode="iwrm", jd_engine="autojac", jd_single_backward=True)
    with pytest.raises(ValueError, match="jd_single_backward=True needs the autogram engine"):
        make_args(tmp_path, jd_mode="iwrm", jd_aggregator="trimmed_mean", jd_aggregator_kwargs={"trim_number": 0},
                  jd_single_backward=True)
    with pytest.raises(ValueError, match="jd_single_backward must be a bool"):
        make_args(tmp_path, jd_mode="iwrm", jd_single_backward="yes")


class _PreHookNet(nn.Module):
    """Returns ``loss`` per example; a user's forward pre-hook on ``child`` uses the child's own bias, a use the
    autogram engine does not see (it is not in the child's captured call): only the first-step check finds the
    wrong Gramian. (Examples mixed between two layers, the earlier case here, are now handled by the engine.)"""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.child = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.child.register_forward_pre_hook(lambda module, args: (args[0] * (1 + 5 * module.bias.sum()),))

    def forward(self, x: Tensor, labels_a: Tensor | None = None, labels_b: Tensor | None = None) -> dict[str, Tensor]:
        hidden = torch.tanh(self.first(x))
        hidden = torch.tanh(self.child(hidden))
        pred = self.head(hidden).squeeze(-1)
        out = {"logits": pred}
        if labels_a is not None:
            out["loss"] = ((pred - labels_a) ** 2).mean()
        return out


def _per_example_losses(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Any]:
    out = model(x=inputs["x"])
    return (out["logits"] - inputs["labels_a"]) ** 2, out


@pytest.mark.parametrize("single_backward", [False, True])
def test_first_step_check_detects_a_wrong_gramian(tmp_path, single_backward):
    dataset = two_task_dataset().remove_columns(["labels_b"])
    args = make_args(tmp_path, jd_mode="iwrm", jd_single_backward=single_backward, max_steps=1,
                     label_names=["labels_a"])  # fmt: skip
    trainer = JDTrainer(model=_PreHookNet(), args=args, train_dataset=dataset, compute_losses=_per_example_losses)
    with pytest.raises(RuntimeError, match="does not account for all uses(.|\n)*jd_engine='autojac'"):
        trainer.train()


def test_first_step_check_passes_and_runs_once(tmp_path, monkeypatch):
    from hf_jd.autogram import Engine

    calls: list[int] = []
    original = Engine.check_gramian

    def counting(self, *args: Any, **kwargs: Any) -> bool:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "check_gramian", counting)
    args = make_args(tmp_path, jd_mode="iwrm", jd_single_backward=True, max_steps=3)
    JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset()).train()
    assert len(calls) == 1


# ---------------------------------------------------------------------- DDP, 2 processes
def _ddp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """Two-pass and single-backward local IWRM steps under DDP; writes both averaged updates."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hf_jd.aggregation import UPGradWeighting
    from hf_jd.autogram import Engine

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    result: dict[str, Any] = {}
    try:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 2))
        generator = torch.Generator().manual_seed(10 + rank)
        ids = torch.randint(0, 20, (4, 5), generator=generator)
        targets = torch.randn(4, 5, 2, generator=generator)
        updates = {}
        for single in (False, True):
            model = copy.deepcopy(base)
            engine = Engine(model, single_backward=single)
            ddp = DDP(model)
            losses = (ddp(ids) - targets).pow(2).mean(dim=(1, 2))
            weights = UPGradWeighting()(engine.compute_gramian(losses))
            if single:
                engine.backward(weights * 0.5)  # e.g. two micro-batches: the factor of accelerator.backward
            else:
                ((weights * losses).sum() * 0.5).backward()
            updates[single] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).tolist()
        result = {"ok": True, "two_pass": updates[False], "single": updates[True]}
    except Exception:  # noqa: BLE001 - reported by the test
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_single_backward_equals_two_pass(tmp_path):
    results = spawn(_ddp_worker, 2, tmp_path, timeout=120.0)
    for rank, result in enumerate(results):
        assert result["ok"], f"rank {rank} failed:\n{result['error']}"
    two_pass = [torch.tensor(result["two_pass"]) for result in results]
    single = [torch.tensor(result["single"]) for result in results]
    # DDP averaged the gradients: the same update on both processes, equal to the two-pass one.
    torch.testing.assert_close(two_pass[0], two_pass[1])
    torch.testing.assert_close(single[0], single[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(single[0], two_pass[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("single_backward", [False, True])
def test_self_check_runs_again_after_a_batch_that_cannot_tell(tmp_path, monkeypatch, single_backward):
    """Engine.check_gramian returns False on a batch whose per-example gradients cancel to rounding (it raised that
    a parameter is used outside its module): JDTrainer checks the next batch instead, once."""
    from hf_jd.autogram import Engine

    answers = iter([False, True])
    calls: list[int] = []
    original = Engine.check_gramian

    def check(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        assert original(self, *args, **kwargs)
        return next(answers)

    monkeypatch.setattr(Engine, "check_gramian", check)
    args = make_args(tmp_path, jd_mode="iwrm", jd_single_backward=single_backward, max_steps=3)
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    trainer.train()
    assert len(calls) == 2 and trainer.jd_step._gramian_checked
