"""Communication of multi-process Jacobian descent: ``jd_ddp_gramian="global"`` vs ``"local"``.

Part 1 (2 CPU processes, gloo, DDP): a tiny BERT (hidden 128, 2 layers) with 3 task heads
(:class:`hf_jd.trainer.MultiHeadModel`, ``jd_mode="mtl"``). For each setting, the bytes per
optimizer step that every process hands to collectives (payload), measured by
:class:`hf_jd.trainer._distributed.CommunicationLog` for JD's own collectives and by a DDP
communication hook for DDP's gradient all-reduce, and the wall time per step:

- ``local``: each process its own Gramian (autogram engine), DDP averages the weighted gradients;
- ``global``: what JDTrainer does: forward under ``no_sync``, the task Jacobians w.r.t. all
  parameters are all-reduced (row-sparse, :func:`global_mtl_jacobian`), every process computes the
  same Gramian, weights and update ``wᵀ J`` and writes it itself (no DDP all-reduce);
- ``global-ddp``: the variant that keeps DDP (:func:`global_mtl_gramian`, then a weighted backward
  whose DDP average is ``wᵀ J``).

For comparison it prints, computed from the shapes, what two other exact global schemes would
send: the dense Jacobian all-reduce (no row sparsity) and an all-gather of the per-layer factors
(each layer's inputs and per-task output gradients) from which the cross-process Gramian terms
could be formed.

Part 2 (one process, what ``"local"`` costs in IWRM): per-example Jacobian of a batch of the
tiny BERT, split into ``P`` equal parts as ``P`` processes would hold it. The update of
``"local"`` is the mean of UPGrad of each part; the exact global update is UPGrad of the whole
Jacobian. Printed: cosine between them and, over the whole batch, the number of examples whose
loss increases to first order (``J_i · d < 0``) and the smallest ``J_i · d`` normalised by
``‖d‖``.

Run: ``python benchmarks/bench_ddp.py [--steps 3] [--batch 8] [--length 64] [--vocab 30522]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from _cli import int_in_range, positive_int

TASKS = ("topic", "sentiment", "score")
SETTINGS = ("local", "global", "global-ddp")
QUALITY_PARTS = (1, 2, 4)  # part 2: numbers of processes the global batch is split between
QUALITY_MULTIPLE = math.lcm(*QUALITY_PARTS)  # part 2's global batch splits into any of them in equal parts


def _bert_config(vocab: int, length: int) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
        max_position_embeddings=max(64, length), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def _mtl_model(vocab: int, length: int) -> nn.Module:
    from hf_jd.trainer import MultiHeadModel

    torch.manual_seed(0)
    heads = {
        "topic": {"kind": "classification", "num_labels": 4},
        "sentiment": {"kind": "classification", "num_labels": 2},
        "score": {"kind": "regression"},
    }
    return MultiHeadModel.from_backbone(_bert_config(vocab, length), heads)


def _mtl_batch(rank: int, step: int, batch: int, length: int, vocab: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "input_ids": torch.randint(1, vocab, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "labels_topic": torch.randint(0, 4, (batch,), generator=generator),
        "labels_sentiment": torch.randint(0, 2, (batch,), generator=generator),
        "labels_score": torch.randn(batch, generator=generator),
    }


def _factor_bytes(model: nn.Module, inputs: dict[str, Tensor], num_tasks: int) -> int:
    """Payload of an all-gather of the per-layer factors for the global MTL Gramian (float32).

    Linear: inputs ``[N, d_in]`` and ``m`` output gradients ``[N, d_out]`` (``N`` tokens);
    Embedding: the ids (int64) and ``m`` output gradients; LayerNorm: normalised inputs and ``m``
    output gradients. Other modules with parameters are counted like a Linear on their output.
    """
    total = 0
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        if not isinstance(output, Tensor) or not any(True for _ in module.parameters(recurse=False)):
            return
        tokens = output.numel() // output.shape[-1]
        d_out = output.shape[-1]
        if isinstance(module, nn.Embedding):
            total += tokens * 8 + num_tasks * tokens * d_out * 4
        elif isinstance(module, nn.Linear):
            total += tokens * (module.in_features + num_tasks * d_out) * 4
        else:
            total += tokens * (d_out + num_tasks * d_out) * 4

    for module in model.modules():
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return total


def _worker(rank: int, world: int, store: str, out: str, steps: int, batch: int, length: int, vocab: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hf_jd.aggregation import UPGradWeighting
    from hf_jd.autogram import Engine
    from hf_jd.trainer._distributed import (
        CommunicationLog,
        DDPCommunicationTracker,
        global_mtl_gramian,
        global_mtl_jacobian,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
    weighting = UPGradWeighting()
    results: dict[str, Any] = {}
    for setting in SETTINGS:
        model = _mtl_model(vocab, length)
        engine = Engine(model, batch_dim=None)
        ddp = DDP(model)
        tracker = DDPCommunicationTracker()
        ddp.register_comm_hook(tracker, DDPCommunicationTracker.hook)
        log = CommunicationLog()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        times = []
        for step in range(steps):
            inputs = _mtl_batch(rank, step, batch, length, vocab)
            dist.barrier()
            start = time.perf_counter()
            engine.enabled = setting == "local"
            with ddp.no_sync() if setting == "global" else contextlib.nullcontext():
                outputs = ddp(**inputs)
            losses = torch.stack([outputs.losses[task] for task in TASKS])
            if setting == "global":
                reduced = global_mtl_jacobian(losses, list(model.parameters()), log=log)
                weights = weighting(reduced.gramian())
                reduced.add_weighted_to_grads(list(model.parameters()), weights)
            else:
                if setting == "local":
                    gramian = engine.compute_gramian(losses)
                else:
                    gramian = global_mtl_gramian(losses, list(model.parameters()), log=log)
                weights = weighting(gramian)
                (weights * losses).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        covered = sum(p.numel() for p in model.parameters())
        results[setting] = {
            "jd_bytes": log.payload_bytes / steps,
            "jd_details": {k: v / steps for k, v in log.details.items()},
            "ddp_bytes": tracker.log.all_reduce_bytes / steps,
            "seconds": statistics.median(times[1:] if len(times) > 1 else times),
            "params": covered,
        }
        if setting == "global":
            results["dense_jacobian_bytes"] = len(TASKS) * covered * 4
            results["factor_bytes"] = _factor_bytes(model, _mtl_batch(rank, 0, batch, length, vocab), len(TASKS))
        engine.remove()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    os._exit(0)  # skip gloo's teardown, which can abort when the peer has already exited


def _mib(value: float) -> str:
    return f"{value / 2**20:9.3f} MiB"


def communication(steps: int, batch: int, length: int, vocab: int) -> None:
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, str(Path(folder, "store")), folder, steps, batch, length, vocab),
                           nprocs=world, join=True, start_method="spawn")  # fmt: skip
        results = json.loads(Path(folder, "rank0.json").read_text())
    params = results["local"]["params"]
    print(f"Part 1: MTL, {len(TASKS)} tasks, tiny BERT (hidden 128, 2 layers, vocab {vocab}), {params:,} parameters,")
    print(f"        {world} processes (gloo, CPU), local batch {batch} x {length} tokens, {steps} steps.")
    print("Payload per process and optimizer step (what each process hands to collectives):")
    print(f"{'setting':<12}{'JD collectives':>18}{'DDP all-reduce':>18}{'total':>18}{'time/step':>12}")
    for setting in SETTINGS:
        entry = results[setting]
        total = entry["jd_bytes"] + entry["ddp_bytes"]
        print(f"{setting:<12}{_mib(entry['jd_bytes']):>18}{_mib(entry['ddp_bytes']):>18}{_mib(total):>18}"
              f"{entry['seconds']:>11.3f}s")  # fmt: skip
    details = ", ".join(f"{k}: {v:,.0f} B" for k, v in results["global"]["jd_details"].items())
    print(f"global JD collectives in detail: {details}")
    print("Other exact global schemes (computed from the shapes, not run):")
    print(f"  dense Jacobian all-reduce (m x n floats): {_mib(results['dense_jacobian_bytes'])}")
    print(f"  all-gather of per-layer factors:          {_mib(results['factor_bytes'])} "
          f"(payload; a ring all-gather sends (P-1) x this per process)")  # fmt: skip


def local_quality(parts_list: list[int], batch: int, length: int, vocab: int, repeats: int) -> None:
    from transformers import BertForSequenceClassification

    from hf_jd.aggregation import UPGrad
    from hf_jd.autojac import jac

    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config(vocab, length))
    params = [p for p in model.parameters() if p.requires_grad]
    aggregator = UPGrad()
    print(f"\nPart 2: what 'local' costs in IWRM (UPGrad, tiny BERT vocab {vocab}, global batch {batch} x {length}, "
          f"{repeats} batches)")  # fmt: skip
    print(f"{'P':>3}{'cos(local, global)':>20}{'|local|/|global|':>18}{'#increasing local':>19}"
          f"{'#increasing global':>20}{'min J_i.d/|d| local':>21}{'global':>10}")  # fmt: skip
    rows: dict[int, list[tuple[float, ...]]] = {parts: [] for parts in parts_list}
    for repeat in range(repeats):
        generator = torch.Generator().manual_seed(repeat)
        ids = torch.randint(1, vocab, (batch, length), generator=generator)
        labels = torch.randint(0, 2, (batch,), generator=generator)
        logits = model(input_ids=ids).logits
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        jacobian = torch.cat([j.reshape(batch, -1) for j in jac(losses, params)], dim=1)
        global_update = aggregator(jacobian)
        for parts in parts_list:
            local_update = sum(aggregator(chunk) for chunk in jacobian.chunk(parts)) / parts
            cosine = float(nn.functional.cosine_similarity(local_update, global_update, dim=0))
            ratio = float(local_update.norm() / global_update.norm())
            derivative_local = jacobian @ local_update / local_update.norm()
            derivative_global = jacobian @ global_update / global_update.norm()
            rows[parts].append((cosine, ratio, float((derivative_local < -1e-6).sum()),
                                float((derivative_global < -1e-6).sum()), float(derivative_local.min()),
                                float(derivative_global.min())))  # fmt: skip
    for parts, values in rows.items():
        mean = [statistics.mean(column) for column in zip(*values)]
        print(f"{parts:>3}{mean[0]:>20.4f}{mean[1]:>18.4f}{mean[2]:>19.2f}{mean[3]:>20.2f}"
              f"{mean[4]:>21.4f}{mean[5]:>10.4f}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of this benchmark.

    Returns
    -------
    argparse.ArgumentParser
        The parser; its numeric options reject out-of-range values.
    """
    parts = ", ".join(str(p) for p in QUALITY_PARTS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=3, help="optimizer steps per setting (part 1)")
    parser.add_argument("--batch", type=positive_int, default=8, help="local batch size per process (part 1)")
    parser.add_argument("--length", type=positive_int, default=64, help="tokens per example (part 1)")
    parser.add_argument(
        "--vocab", type=int_in_range(2), default=30522, help="vocabulary (part 1; at least 2: ids are drawn from 1)"
    )
    parser.add_argument(
        "--quality-batch", type=positive_int, default=16,
        help=f"global batch of part 2, split into {parts} equal parts: a multiple of {QUALITY_MULTIPLE}",
    )
    parser.add_argument("--quality-vocab", type=int_in_range(2), default=1000, help="vocabulary of part 2 (at least 2)")
    parser.add_argument("--quality-length", type=positive_int, default=16, help="tokens per example (part 2)")
    parser.add_argument("--quality-repeats", type=positive_int, default=3, help="batches averaged over (part 2)")
    parser.add_argument("--skip-quality", action="store_true", help="run part 1 only")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); exit with a usage error on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quality_batch % QUALITY_MULTIPLE:
        parser.error(f"--quality-batch must be a multiple of {QUALITY_MULTIPLE} (it is split into "
                     f"{', '.join(str(p) for p in QUALITY_PARTS)} equal parts), got {args.quality_batch}")  # fmt: skip
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run parts 1 and 2 and print their tables (``argv``: the command line, ``sys.argv[1:]`` when None)."""
    args = parse_args(argv)
    communication(args.steps, args.batch, args.length, args.vocab)
    if not args.skip_quality:
        local_quality(
            list(QUALITY_PARTS), args.quality_batch, args.quality_length, args.quality_vocab, args.quality_repeats
        )


if __name__ == "__main__":
    main()
