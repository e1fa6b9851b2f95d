"""Multi-task Jacobian descent on several GPUs (or CPU processes) with ``accelerate launch``.

One process per device, each holding a replica of the model (DDP) and a slice of every global
batch. With ``jd_mode="mtl"`` the default ``jd_ddp_gramian="auto"`` means ``"global"``: the task
Jacobians are averaged over the processes, every process computes the same Gramian and UPGrad
weights, and the step equals the step of one process on the whole global batch. ``"local"`` lets
each process weight its own batch (see ``examples/accelerate/README.md``).

Launch (2 GPUs; ``accelerate config`` writes a config, or use the one next to this file)::

    accelerate launch --config_file examples/accelerate/accelerate_config.yaml \
        examples/accelerate/train_multi_gpu.py --output_dir out/multi_gpu

On CPU only (2 processes, gloo; ``--use_cpu`` is required, otherwise each process trains alone)::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate/train_multi_gpu.py \
        --output_dir out/multi_cpu --use_cpu --max_steps 20
    torchrun --nproc_per_node 2 examples/accelerate/train_multi_gpu.py --output_dir out/multi_cpu --use_cpu

Every ``JDTrainingArguments`` flag works (``--jd_aggregator``, ``--jd_ddp_gramian local``,
``--per_device_train_batch_size``, ``--bf16``...); ``--dataloader_pin_memory`` defaults to true only
when CUDA is available (pinned memory needs an accelerator, and torch warns without one). The data are
generated (:mod:`hf_jd.synthetic`: token ids of a 64-token vocabulary) and the encoder is a small BERT
built from a config, so nothing is downloaded. A pretrained backbone would make no sense on those ids,
so ``--model_name_or_path`` is rejected: fine-tune one on a real dataset with
``examples/multi_head_finetune.py --model_name_or_path ... --dataset_name ... --task_columns ...``, or
replace :func:`hf_jd.synthetic.make_multitask_text_dataset` below by your tokenised dataset.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import BertConfig, HfArgumentParser, set_seed

from hf_jd import JDTrainer, JDTrainingArguments, MultiHeadModel
from hf_jd.synthetic import MULTITASK_TASKS, make_multitask_text_dataset
from hf_jd.trainer._distributed import distributed_rank, distributed_world_size, resolve_ddp_gramian

#: Vocabulary of the generated token ids (and of the BERT built for them).
GENERATED_VOCAB_SIZE = 64


@dataclass
class ScriptArguments:
    """Options of this script (the training options are those of ``JDTrainingArguments``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Not supported here: the data are generated token ids, meaningless to a pretrained backbone. "
            "Use examples/multi_head_finetune.py with --dataset_name for a pretrained backbone on real data."
        },
    )
    hidden_size: int = field(default=64, metadata={"help": "Hidden size of the small BERT built from a config."})
    num_layers: int = field(default=2, metadata={"help": "Layers of the small BERT."})
    num_train: int = field(default=2048, metadata={"help": "Generated training examples."})
    num_eval: int = field(default=256, metadata={"help": "Generated evaluation examples."})
    expected_world_size: int | None = field(
        default=None,
        metadata={"help": "Fail unless this many processes joined (guards against silently training alone)."},
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path is not None:
            raise ValueError(
                f"--model_name_or_path {self.model_name_or_path!r} is not supported by this example: it trains on "
                f"generated token ids of its own {GENERATED_VOCAB_SIZE}-token vocabulary, which a pretrained "
                "backbone cannot read (an IndexError for a smaller vocabulary, meaningless training otherwise). "
                "Drop the option to train the small BERT built from a config; for a pretrained backbone on a real "
                "dataset use examples/multi_head_finetune.py --model_name_or_path ... --dataset_name ... "
                "--task_columns ..., or replace make_multitask_text_dataset in this script by your tokenised data."
            )


def _heads() -> dict[str, dict[str, Any]]:
    return {
        task: {"kind": "classification", "num_labels": size} if kind == "classification" else {"kind": "regression"}
        for task, (kind, size) in MULTITASK_TASKS.items()
    }


def _model(script: ScriptArguments, vocab_size: int) -> MultiHeadModel:
    backbone = BertConfig(
        vocab_size=vocab_size, hidden_size=script.hidden_size, num_hidden_layers=script.num_layers,
        num_attention_heads=max(1, script.hidden_size // 32), intermediate_size=4 * script.hidden_size,
        max_position_embeddings=64,
    )  # fmt: skip
    return MultiHeadModel.from_backbone(backbone, _heads())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, JDTrainingArguments))
    defaults = ["--jd_mode", "mtl", "--jd_task_names", *MULTITASK_TASKS, "--report_to", "none",
                "--max_steps", "50", "--per_device_train_batch_size", "16", "--learning_rate", "1e-3",
                "--logging_steps", "10", "--save_strategy", "no",
                # Pinned memory needs an accelerator: on CPU torch warns at every dataloader (a later flag wins).
                "--dataloader_pin_memory", "true" if torch.cuda.is_available() else "false"]  # fmt: skip
    script, args = parser.parse_args_into_dataclasses(args=defaults + list(sys.argv[1:] if argv is None else argv))
    world_size = distributed_world_size()  # the process group exists once the TrainingArguments do
    if args.world_size != world_size or int(os.environ.get("WORLD_SIZE", "1")) != world_size:
        raise RuntimeError(
            f"The launcher started WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')} processes but this one trains "
            f"with {args.world_size}. On CPU pass --use_cpu (and `accelerate launch --multi_gpu`, not --cpu)."
        )
    if script.expected_world_size is not None and world_size != script.expected_world_size:
        raise RuntimeError(
            f"Expected {script.expected_world_size} processes, got {world_size}: start them with `torchrun "
            f"--nproc_per_node {script.expected_world_size}` or `accelerate launch --multi_gpu --num_processes "
            f"{script.expected_world_size}` (on CPU add --use_cpu; `accelerate launch --cpu` starts one process)."
        )
    if distributed_rank() == 0:
        setting = resolve_ddp_gramian(args.jd_ddp_gramian, args.jd_mode)
        global_batch = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
        print(f"{world_size} process(es), jd_mode={args.jd_mode}, jd_ddp_gramian={setting}, "
              f"global batch {global_batch}")  # fmt: skip

    # Seed before building the model (its initial weights), as the Trainer itself seeds only later,
    # so that two runs of the same command give the same results.
    set_seed(args.seed)
    data = make_multitask_text_dataset(
        script.num_train, script.num_eval, vocab_size=GENERATED_VOCAB_SIZE, seed=args.seed
    )
    trainer = JDTrainer(model=_model(script, GENERATED_VOCAB_SIZE), args=args, train_dataset=data["train"],
                        eval_dataset=data["eval"])  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    if distributed_rank() == 0:
        print({key: round(value, 4) for key, value in metrics.items() if isinstance(value, float)})
    # Wait for every process, then leave the process group before exiting: a gloo group alive at
    # interpreter exit occasionally aborts a process ("terminate called without an active exception"),
    # and a process leaving while another still prints or evaluates can leave that one waiting forever.
    trainer.accelerator.wait_for_everyone()
    # Free the DDP wrapper first. Otherwise its reducer holds the last reference to the gloo group, whose
    # destructor then runs when the wrapper is freed, holding Python's lock while it waits for the group's
    # worker threads, one of which may still need that lock to free the barrier's tensors: a deadlock at
    # exit (seen in about one run in ten on a loaded machine, torch 2.13). Freed by the group's own
    # Python object in end_training, the group waits without the lock.
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    trainer.accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
