"""JDTrainer under ``torchrun --nproc_per_node 2`` on CPU (gloo): run scenarios, save what each rank saw.

Usage: ``torchrun --nproc_per_node 2 trainer_worker.py OUT_DIR SCENARIO [SCENARIO ...]``. For each
scenario every rank saves ``OUT_DIR/<scenario>_rank<r>.pt`` with the initial and final parameters,
the gradients before each optimizer step, the inputs of every training forward, the log history
and what DDP communicated (through :class:`DDPCommunicationTracker`). The test compares them with a
single-process run and with computations by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/trainer, for jd_trainer_helpers

from jd_trainer_helpers import (
    TASKS,
    TwoTaskNet,
    make_args,
    missing_labels_dataset,
    multi_head_model,
    tiny_bert,
    token_dataset,
    two_task_dataset,
)

from hf_jd import JDTrainer
from hf_jd.trainer._distributed import DDPCommunicationTracker, distributed_rank


class Recorder(TrainerCallback):
    """Attaches the DDP communication tracker at the start and records gradients before each step."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.tracker = DDPCommunicationTracker()
        self.attached = False
        self.grads: list[torch.Tensor] = []
        self.ddp_backwards_at_step: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(self.tracker, DDPCommunicationTracker.hook)
            self.attached = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        params = [p for p in model.parameters() if p.requires_grad]
        self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in params]))
        self.ddp_backwards_at_step.append(self.tracker.backwards)


def _record_local_stats(trainer: JDTrainer) -> list[dict[str, float]]:
    """The statistics this process records at each micro-batch, before any averaging over processes."""
    recorded: list[dict[str, float]] = []
    accumulator = trainer.jd_step.stats
    add = accumulator.add

    def recording_add(stats: dict[str, torch.Tensor]) -> None:
        recorded.append({name: float(value) for name, value in stats.items()})
        add(stats)

    accumulator.add = recording_add
    return recorded


def _run(
    out_dir: Path, name: str, model: torch.nn.Module, dataset: Any, trainer_kwargs: dict[str, Any] | None = None,
    resume: Path | None = None, **arguments: Any,
) -> None:
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inputs_seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs_seen.append({k: v.detach().clone() for k, v in kwargs.items()
                                                         if isinstance(v, torch.Tensor)}) if module.training else None,
        with_kwargs=True,
    )  # fmt: skip
    recorder = Recorder()
    args = make_args(out_dir / name, optim="sgd", **arguments)
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder], **(trainer_kwargs or {}))
    recorder.trainer = trainer
    local_stats = _record_local_stats(trainer)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    communication = getattr(trainer.jd_step, "communication", None)
    torch.save(
        {
            "world_size": args.world_size,
            "ddp_wrapped": recorder.attached,
            "initial": initial,
            "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grads": recorder.grads,
            "inputs": inputs_seen,
            "log_history": trainer.state.log_history,
            "ddp_backwards": recorder.tracker.backwards,
            "ddp_backwards_at_step": recorder.ddp_backwards_at_step,
            "ddp_bytes": recorder.tracker.log.all_reduce_bytes,
            "jd_bytes": None if communication is None else communication.payload_bytes,
            "ddp_gramian": getattr(trainer.jd_step, "ddp_gramian", None),
            "skipped_steps": trainer.jd_step.skipped_steps,
            "local_stats": local_stats,
        },
        out_dir / f"{name}_rank{distributed_rank()}.pt",
    )


def mtl_global(out_dir: Path) -> None:
    torch.manual_seed(0)
    _run(out_dir, "mtl_global", TwoTaskNet(), two_task_dataset(16), jd_mode="mtl", jd_task_names=TASKS,
         max_steps=1, per_device_train_batch_size=4)  # fmt: skip


def mtl_global_ga2(out_dir: Path) -> None:
    torch.manual_seed(0)
    _run(out_dir, "mtl_global_ga2", TwoTaskNet(), two_task_dataset(16), jd_mode="mtl", jd_task_names=TASKS,
         max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)  # fmt: skip


def mtl_global_modules(out_dir: Path) -> None:
    torch.manual_seed(0)
    _run(out_dir, "mtl_global_modules", TwoTaskNet(), two_task_dataset(16), jd_mode="mtl", jd_task_names=TASKS,
         max_steps=1, per_device_train_batch_size=4, jd_modules=["encoder"])  # fmt: skip


def mtl_global_reuse(out_dir: Path) -> None:
    torch.manual_seed(0)
    _run(out_dir, "mtl_global_reuse", TwoTaskNet(), two_task_dataset(16), jd_mode="mtl", jd_task_names=TASKS,
         max_steps=2, per_device_train_batch_size=4, jd_update_weights_every=2)  # fmt: skip


def iwrm_local(out_dir: Path) -> None:
    torch.manual_seed(0)
    _run(out_dir, "iwrm_local", tiny_bert(), token_dataset(16), jd_mode="iwrm", max_steps=1,
         per_device_train_batch_size=4)  # fmt: skip


def iwrm_local_ga2(out_dir: Path) -> None:
    torch.manual_seed(0)
    _run(out_dir, "iwrm_local_ga2", tiny_bert(), token_dataset(16), jd_mode="iwrm", max_steps=1,
         per_device_train_batch_size=2, gradient_accumulation_steps=2)  # fmt: skip


def nonfinite_skip(out_dir: Path) -> None:
    """Rank 1's first micro-batch has a NaN task loss: with jd_nonfinite='skip' both ranks must skip it."""
    calls = [0]

    def compute_losses(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        losses = torch.stack([outputs["losses"][task] for task in TASKS])
        calls[0] += 1
        if distributed_rank() == 1 and calls[0] == 1:
            losses = losses * torch.tensor([1.0, float("nan")])
        return losses, outputs

    torch.manual_seed(0)
    _run(out_dir, "nonfinite_skip", TwoTaskNet(), two_task_dataset(16), jd_mode="mtl", jd_task_names=TASKS,
         max_steps=2, per_device_train_batch_size=4, jd_nonfinite="skip",
         trainer_kwargs={"compute_losses": compute_losses})  # fmt: skip


def mtl_local_stats(out_dir: Path) -> None:
    """``"local"`` MTL over 2 steps; at step 2 rank 1's task ``a`` loss is multiplied by 0 (loss 0, zero
    Jacobian row), so that rank records no ``jd/min_cosine`` then while rank 0 does."""
    calls = [0]

    def compute_losses(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        losses = torch.stack([outputs["losses"][task] for task in TASKS])
        calls[0] += 1
        if distributed_rank() == 1 and calls[0] == 2:
            losses = losses * torch.tensor([0.0, 1.0])
        return losses, outputs

    torch.manual_seed(0)
    _run(out_dir, "mtl_local_stats", TwoTaskNet(), two_task_dataset(16), jd_mode="mtl", jd_task_names=TASKS,
         jd_ddp_gramian="local", max_steps=2, per_device_train_batch_size=4,
         trainer_kwargs={"compute_losses": compute_losses})  # fmt: skip


def mtl_local_gradvac(out_dir: Path) -> None:
    """GradVac with per-process weights (``"local"``): each rank's aggregator state (its targets) is its own. Four
    steps saved at step 2, then a run resumed from that checkpoint."""
    torch.manual_seed(0)
    _run(out_dir, "mtl_local_gradvac", TwoTaskNet(), two_task_dataset(32), jd_mode="mtl", jd_task_names=TASKS,
         jd_aggregator="gradvac", jd_ddp_gramian="local", max_steps=4, per_device_train_batch_size=4,
         save_strategy="steps", save_steps=2)  # fmt: skip
    torch.manual_seed(0)
    _run(out_dir, "mtl_local_gradvac_resumed", TwoTaskNet(), two_task_dataset(32), jd_mode="mtl",
         jd_task_names=TASKS, jd_aggregator="gradvac", jd_ddp_gramian="local", max_steps=4,
         per_device_train_batch_size=4, resume=out_dir / "mtl_local_gradvac" / "checkpoint-2")  # fmt: skip


def mtl_eval_uneven(out_dir: Path) -> None:
    """Evaluation of 12 examples in batches of 4 on 2 processes: the second global batch holds 4 real examples, rank
    1's half of it is padding (the first examples again)."""
    torch.manual_seed(0)
    model = TwoTaskNet()
    args = make_args(out_dir / "mtl_eval_uneven", jd_mode="mtl", jd_task_names=TASKS, per_device_eval_batch_size=4)
    trainer = JDTrainer(model=model, args=args, train_dataset=two_task_dataset(16))
    metrics = trainer.evaluate(two_task_dataset(12, seed=5))
    target = out_dir / f"mtl_eval_uneven_rank{distributed_rank()}.pt"
    torch.save({"metrics": metrics, "model": model.state_dict()}, target)


def iwrm_eval(out_dir: Path) -> None:
    """Evaluation of a BERT classifier, whose forward accepts the Trainer's token count but does not use it."""
    torch.manual_seed(0)
    model = tiny_bert()
    args = make_args(out_dir / "iwrm_eval", jd_mode="iwrm", per_device_eval_batch_size=4)
    metrics = JDTrainer(model=model, args=args, train_dataset=token_dataset(16)).evaluate(token_dataset(16, seed=3))
    torch.save({"metrics": metrics, "model": model.state_dict()}, out_dir / f"iwrm_eval_rank{distributed_rank()}.pt")


def mtl_global_missing_labels(out_dir: Path) -> None:
    _run(out_dir, "mtl_global_missing_labels", multi_head_model(), missing_labels_dataset(), jd_mode="mtl",
         jd_task_names=TASKS, label_names=["labels_a", "labels_b"], max_steps=1, per_device_train_batch_size=4,
         train_sampling_strategy="sequential")  # fmt: skip


SCENARIOS = {
    "mtl_global": mtl_global,
    "mtl_global_ga2": mtl_global_ga2,
    "mtl_global_modules": mtl_global_modules,
    "mtl_global_reuse": mtl_global_reuse,
    "iwrm_local": iwrm_local,
    "iwrm_local_ga2": iwrm_local_ga2,
    "nonfinite_skip": nonfinite_skip,
    "mtl_local_stats": mtl_local_stats,
    "mtl_local_gradvac": mtl_local_gradvac,
    "mtl_eval_uneven": mtl_eval_uneven,
    "iwrm_eval": iwrm_eval,
    "mtl_global_missing_labels": mtl_global_missing_labels,
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    target = Path(sys.argv[1])
    for scenario in sys.argv[2:]:
        SCENARIOS[scenario](target)
    # Leave the process group explicitly: a gloo group still alive at interpreter exit occasionally
    # aborts the process ("terminate called without an active exception", SIGABRT), which torchrun
    # reports as a failure although every scenario finished (seen in about 1 run in 8).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
