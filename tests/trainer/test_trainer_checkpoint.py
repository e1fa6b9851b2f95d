"""JDTrainer evaluation, checkpoints and resumption, and mixed precision."""

from __future__ import annotations

import math
import os

import pytest
import torch

from hf_jd import JDTrainer
from hf_jd.trainer import JD_STATE_NAME

from jd_trainer_helpers import TASKS, TwoTaskNet, collate, make_args, tiny_bert, token_dataset, two_task_dataset


def _weights_by_step(trainer: JDTrainer) -> dict[int, dict[str, float]]:
    return {
        log["step"]: {key: value for key, value in log.items() if key.startswith("jd/weight")}
        for log in trainer.state.log_history
        if any(key.startswith("jd/weight") for key in log)
    }


def _setup(mode: str):
    """Model factory, dataset and mode arguments for each JD mode."""
    if mode == "iwrm":
        return tiny_bert, token_dataset(n=32), {"jd_mode": "iwrm"}
    return TwoTaskNet, two_task_dataset(n=32), {"jd_mode": mode, "jd_task_names": TASKS}


@pytest.mark.parametrize(("mode", "ga"), [("mtl", 2), ("iwmtl", 1), ("iwrm", 2)])
def test_train_evaluate_save_and_resume(tmp_path, mode, ga):
    """A resumed run gives the same weights and parameters as an uninterrupted one.

    The aggregator is stateful (random weights from its own generator): without its state in the
    checkpoint the resumed weights would differ.
    """
    make_model, dataset, mode_args = _setup(mode)
    common = {
        **mode_args,
        "jd_aggregator": "random",
        "jd_aggregator_kwargs": {"seed": 3},
        "max_steps": 4,
        "gradient_accumulation_steps": ga,
        "save_strategy": "steps",
        "save_steps": 2,
        "eval_strategy": "steps",
        "eval_steps": 2,
    }
    torch.manual_seed(0)
    full = JDTrainer(
        model=make_model(), args=make_args(tmp_path / "full", **common), train_dataset=dataset, eval_dataset=dataset
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / JD_STATE_NAME).is_file()
    evaluation = next(log for log in full.state.log_history if "eval_loss" in log)
    if mode != "iwrm":
        assert evaluation["eval_loss_a"] > 0 and evaluation["eval_loss_b"] > 0

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = JDTrainer(
        model=make_model(), args=make_args(tmp_path / "resumed", **common), train_dataset=dataset,
        eval_dataset=dataset,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))

    full_weights, resumed_weights = _weights_by_step(full), _weights_by_step(resumed)
    assert sorted(resumed_weights) == [1, 2, 3, 4]  # steps 1-2 come with the checkpoint's log history
    for step in (3, 4):
        assert resumed_weights[step] == pytest.approx(full_weights[step], rel=1e-6)
    # The random weights change from step to step, so the comparison above is not trivial.
    assert full_weights[3] != pytest.approx(full_weights[4])
    for p_full, p_resumed in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p_full, p_resumed)


def test_resume_without_state_file_fails_for_stateful_aggregator(tmp_path):
    dataset = two_task_dataset()
    args = make_args(tmp_path / "a", jd_mode="mtl", jd_task_names=TASKS, jd_aggregator="random",
                     jd_aggregator_kwargs={"seed": 0}, save_strategy="steps", save_steps=1, max_steps=1)  # fmt: skip
    JDTrainer(model=TwoTaskNet(), args=args, train_dataset=dataset).train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    os.remove(checkpoint / JD_STATE_NAME)
    args = make_args(tmp_path / "b", jd_mode="mtl", jd_task_names=TASKS, jd_aggregator="random",
                     jd_aggregator_kwargs={"seed": 0}, max_steps=2)  # fmt: skip
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=dataset)
    with pytest.raises(FileNotFoundError, match=JD_STATE_NAME):
        trainer.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("mode", ["mtl", "iwmtl"])
def test_evaluate_reports_task_losses(tmp_path, mode):
    model = TwoTaskNet()
    dataset = two_task_dataset(n=12)
    args = make_args(tmp_path, jd_mode=mode, jd_task_names=TASKS, per_device_eval_batch_size=5)
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    metrics = trainer.evaluate()
    batch = collate(dataset, 0, 12)
    with torch.no_grad():
        out = model(batch["x"], labels_a=batch["labels_a"], labels_b=batch["labels_b"])
    assert metrics["eval_loss_a"] == pytest.approx(out["losses"]["a"].item(), rel=1e-5)
    assert metrics["eval_loss_b"] == pytest.approx(out["losses"]["b"].item(), rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(out["loss"].item(), rel=1e-5)


def test_evaluation_does_not_capture(tmp_path):
    seen = []

    class Probe(TwoTaskNet):
        def forward(self, x, labels_a=None, labels_b=None, loss_reduction="mean"):
            engine = trainer.jd_step.engine
            seen.append((torch.is_grad_enabled(), engine.enabled if engine is not None else None))
            return super().forward(x, labels_a, labels_b, loss_reduction)

    dataset = two_task_dataset(n=8)
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, jd_engine="autogram", max_steps=1,
                     eval_strategy="steps", eval_steps=1)  # fmt: skip
    trainer = JDTrainer(model=Probe(), args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    assert seen[0] == (True, True)  # the training forward captures
    assert seen[1:] and all(state == (False, False) for state in seen[1:])  # evaluation does not


def test_bf16_autocast_on_cpu(tmp_path):
    torch.manual_seed(0)
    args = make_args(tmp_path, jd_mode="iwrm", bf16=True, max_steps=2)
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    dtypes = []
    original = trainer.jd_step._record

    def record(losses, weights, gramian):
        dtypes.append((losses.dtype, None if weights is None else weights.dtype))
        original(losses, weights, gramian)

    trainer.jd_step._record = record
    logits_dtypes = []
    # Accelerate casts the model outputs back to float32; inside the forward, Linear layers run in bf16.
    trainer.model.classifier.register_forward_hook(lambda module, args, out: logits_dtypes.append(out.dtype))
    trainer.train()
    assert logits_dtypes and all(d == torch.bfloat16 for d in logits_dtypes)  # autocast was on
    assert dtypes and all(d == (torch.float32, torch.float32) for d in dtypes)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs and all(math.isfinite(log["loss"]) and math.isfinite(log["jd/weight_mean"]) for log in logs)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def _save_random_checkpoint(tmp_path) -> str:
    args = make_args(tmp_path / "a", jd_mode="mtl", jd_task_names=TASKS, jd_aggregator="random",
                     jd_aggregator_kwargs={"seed": 0}, save_strategy="steps", save_steps=1, max_steps=1)  # fmt: skip
    JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset()).train()
    return str(tmp_path / "a" / "checkpoint-1")


def test_resume_with_another_aggregator_names_both(tmp_path):
    checkpoint = _save_random_checkpoint(tmp_path)
    state = torch.load(os.path.join(checkpoint, JD_STATE_NAME), weights_only=False)
    assert state["aggregator_name"] == "random" and state["aggregator_class"] == "Random"
    args = make_args(tmp_path / "b", jd_mode="mtl", jd_task_names=TASKS, jd_aggregator="upgrad", max_steps=2)
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset())
    message = "saved with jd_aggregator='random' \\(Random\\), but this run uses jd_aggregator='upgrad' \\(UPGrad\\)"
    with pytest.raises(ValueError, match=message + ".*jd_reset_aggregator_state=True"):
        trainer.train(resume_from_checkpoint=checkpoint)


@pytest.mark.parametrize("aggregator", ["pcgrad", "upgrad"])
def test_switching_aggregators_on_resume_with_a_reset_state(tmp_path, aggregator):
    """The advice of the error above works, also towards a stateful aggregator (PCGrad's generator)."""
    checkpoint = _save_random_checkpoint(tmp_path)
    args = make_args(tmp_path / "b", jd_mode="mtl", jd_task_names=TASKS, jd_aggregator=aggregator, max_steps=2,
                     jd_reset_aggregator_state=True)  # fmt: skip
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset())
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 2


def test_a_checkpoint_without_state_file_resumes_a_stateful_aggregator_with_a_reset_state(tmp_path):
    checkpoint = _save_random_checkpoint(tmp_path)
    os.remove(os.path.join(checkpoint, JD_STATE_NAME))
    args = make_args(tmp_path / "b", jd_mode="mtl", jd_task_names=TASKS, jd_aggregator="random",
                     jd_aggregator_kwargs={"seed": 0}, max_steps=2, jd_reset_aggregator_state=True)  # fmt: skip
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset())
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 2


def test_resume_from_a_state_file_without_the_aggregator_name(tmp_path):
    """Checkpoints saved before the aggregator's name was stored still load."""
    checkpoint = _save_random_checkpoint(tmp_path)
    path = os.path.join(checkpoint, JD_STATE_NAME)
    state = torch.load(path, weights_only=False)
    del state["aggregator_name"], state["aggregator_class"]
    torch.save(state, path)
    args = make_args(tmp_path / "b", jd_mode="mtl", jd_task_names=TASKS, jd_aggregator="random",
                     jd_aggregator_kwargs={"seed": 0}, max_steps=2)  # fmt: skip
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset())
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 2


def test_task_losses_are_summed_over_processes(tmp_path, monkeypatch):
    """Each process evaluates its share of the eval set: the per-task [total, count] are summed over the
    processes before dividing (rank 0 used to report its own share only; checked under torchrun by hand:
    both ranks now report the full-set value). Here a second process's share is simulated."""
    from transformers import TrainingArguments

    model = TwoTaskNet()
    dataset = two_task_dataset(n=12)
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, per_device_eval_batch_size=5)
    trainer = JDTrainer(model=model, args=args, eval_dataset=dataset)
    single = trainer.evaluate()
    seen = []

    def reduce(tensor, reduction="sum"):
        seen.append((reduction, tensor.clone()))
        other = torch.tensor([[0.0, 0.0], [4.0, 2.0]], dtype=tensor.dtype)  # another rank's [total, count]
        return tensor + other

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "reduce", reduce)
    metrics = trainer.evaluate()
    assert [reduction for reduction, _ in seen] == ["sum"]
    local = seen[0][1]
    assert float(local[0, 0] / local[0, 1]) == pytest.approx(single["eval_loss_a"], rel=1e-6)
    assert metrics["eval_loss_a"] == pytest.approx(single["eval_loss_a"], rel=1e-6)
    assert metrics["eval_loss_b"] == pytest.approx(float((local[1, 0] + 4.0) / (local[1, 1] + 2.0)), rel=1e-6)
