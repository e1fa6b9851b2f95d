"""Plain ``torch.distributed`` scenarios for ``hf_jd.trainer._distributed`` (2 CPU processes, gloo).

:func:`run_all` is started on every rank by ``launch.spawn``; it runs every scenario, records
``{"ok": True, ...}`` or the traceback per scenario, and writes ``rank<r>.json``. References are
computed independently on every rank with ``torch.func.jacrev`` on the concatenated global batch
(every rank can rebuild every rank's batch from its seed).
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.nn.parallel import DistributedDataParallel as DDP

from hf_jd.aggregation import UPGradWeighting
from hf_jd.trainer._distributed import (
    CommunicationLog,
    DDPCommunicationTracker,
    all_processes_true,
    all_reduce_jacobians_mean,
    global_mtl_gramian,
    global_mtl_jacobian,
)

VOCAB, DIM, HIDDEN, TASKS, BATCH, LENGTH = 20, 4, 6, 3, 4, 3
TOKEN_RANGES = {0: (0, 8), 1: (5, 14)}  # rows 14..19 of the embedding are never used


class TaskNet(nn.Module):
    """Embedding → mean over tokens → Linear → tanh → LayerNorm → 3 regression outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.lin = nn.Linear(DIM, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.heads = nn.Linear(HIDDEN, TASKS)

    def forward(self, ids: Tensor, targets: Tensor, skip_norm: bool = False) -> Tensor:
        """Per-example, per-task squared errors ``[B, TASKS]`` (``skip_norm``: without the LayerNorm)."""
        hidden = torch.tanh(self.lin(self.emb(ids).mean(dim=1)))
        if not skip_norm:
            hidden = self.norm(hidden)
        return (self.heads(hidden) - targets) ** 2


def make_model() -> TaskNet:
    torch.manual_seed(1234)
    return TaskNet()


def batch(rank: int, micro: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 * rank + micro)
    low, high = TOKEN_RANGES[rank]
    ids = torch.randint(low, high, (BATCH, LENGTH), generator=generator)
    targets = torch.randn(BATCH, TASKS, generator=generator)
    return ids, targets


def global_batch(world: int, micro: int = 0) -> tuple[Tensor, Tensor]:
    parts = [batch(rank, micro) for rank in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def jacobian(model: nn.Module, ids: Tensor, targets: Tensor, per_example: bool, skip_norm: bool = False) -> Tensor:
    """Explicit Jacobian ``[rows, n]`` of the task losses (``per_example``: of the per-example losses)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def losses(values: dict[str, Tensor]) -> Tensor:
        errors = functional_call(model, values, (ids, targets, skip_norm))
        return errors.mean(dim=1) if per_example else errors.mean(dim=0)

    jac = jacrev(losses)(params)
    rows = next(iter(jac.values())).shape[0]
    return torch.cat([jac[name].reshape(rows, -1) for name in params], dim=1)


def flat_grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def close(a: Tensor, b: Tensor, what: str, atol: float = 1e-5) -> None:
    if not torch.allclose(a, b, atol=atol, rtol=1e-4):
        raise AssertionError(f"{what}: max abs difference {float((a - b).abs().max()):.3g}")


# ---------------------------------------------------------------------- scenarios
def gramian_matches_single_process(rank: int, world: int) -> dict[str, Any]:
    model = make_model()
    log = CommunicationLog()
    losses = model(*batch(rank)).mean(dim=0)
    gramian = global_mtl_gramian(losses, list(model.parameters()), log=log)
    full = jacobian(model, *global_batch(world), per_example=False)
    close(gramian, full @ full.T, "global Gramian vs single-process Gramian")
    # Rows of the embedding that some rank uses: the union of the token ranges.
    used = int(torch.unique(global_batch(world)[0]).numel())
    dense = sum(p.numel() for name, p in model.named_parameters() if name != "emb.weight")
    expected = 4 * TASKS * (dense + used * DIM)
    rows_2d = VOCAB + HIDDEN + TASKS  # one byte per row of the 2-D parameters
    flags = len(list(model.parameters()))  # and one "reached" byte per parameter
    return {
        "jacobian_bytes": log.details["jacobian"],
        "expected_jacobian_bytes": expected,
        "row_mask_bytes": log.details["row_masks"],
        "expected_row_mask_bytes": rows_2d + flags,
        "gramian": gramian.tolist(),
    }


def jacobians_unpack_to_mean(rank: int, world: int) -> dict[str, Any]:
    model = make_model()
    params = list(model.parameters())
    losses = model(*batch(rank)).mean(dim=0)
    local = torch.autograd.grad
    rows = [local(losses[k], params, retain_graph=True) for k in range(TASKS)]
    jacobians = [torch.stack([row[i] for row in rows]) for i in range(len(params))]
    reduced = all_reduce_jacobians_mean(jacobians, bucket_bytes=200)  # small buckets: several blocks
    per_rank = [jacobian(model, *batch(r), per_example=False) for r in range(world)]
    mean = sum(per_rank) / world
    got = torch.cat([j.reshape(TASKS, -1) for j in reduced.jacobians()], dim=1)
    close(got, mean, "unpacked mean Jacobian")
    return {"blocks": len(reduced.blocks)}


def ddp_mtl_global_step(rank: int, world: int) -> dict[str, Any]:
    model = make_model()
    reference = copy.deepcopy(model)
    ddp = DDP(model)
    tracker = DDPCommunicationTracker()
    ddp.register_comm_hook(tracker, DDPCommunicationTracker.hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = ddp(*batch(rank)).mean(dim=0)
    gramian = global_mtl_gramian(losses, list(model.parameters()))
    buckets_after_gramian = tracker.buckets
    weights = UPGradWeighting()(gramian)
    (weights * losses).sum().backward()
    optimizer.step()

    full = jacobian(reference, *global_batch(world), per_example=False)
    ref_weights = UPGradWeighting()(full @ full.T)
    expected = flat_params(reference) - 0.1 * (ref_weights @ full)
    close(flat_params(model), expected, "parameters after one step vs single process on the global batch")
    close(weights, ref_weights, "weights")
    return {
        "buckets_after_gramian": buckets_after_gramian,
        "ddp_backwards": tracker.backwards,
        "ddp_bytes": tracker.log.all_reduce_bytes,
        "param_bytes": 4 * sum(p.numel() for p in model.parameters()),
    }


def ddp_mtl_global_grad_accumulation(rank: int, world: int) -> dict[str, Any]:
    model = make_model()
    reference = copy.deepcopy(model)
    ddp = DDP(model)
    tracker = DDPCommunicationTracker()
    ddp.register_comm_hook(tracker, DDPCommunicationTracker.hook)
    backwards = []
    for micro in range(2):
        context = ddp.no_sync() if micro == 0 else torch.enable_grad()
        with context:
            losses = ddp(*batch(rank, micro)).mean(dim=0)
            weights = UPGradWeighting()(global_mtl_gramian(losses, list(model.parameters())))
            ((weights * losses).sum() * 0.5).backward()
        backwards.append(tracker.backwards)
    expected = 0
    for micro in range(2):
        full = jacobian(reference, *global_batch(world, micro), per_example=False)
        expected = expected + 0.5 * (UPGradWeighting()(full @ full.T) @ full)
    close(flat_grads(model), expected, "accumulated gradient vs single process")
    return {"ddp_backwards_per_micro_batch": backwards}


def ddp_iwrm_local_step(rank: int, world: int) -> dict[str, Any]:
    from hf_jd.autogram import Engine

    model = make_model()
    reference = copy.deepcopy(model)
    engine = Engine(model, batch_dim=0)
    ddp = DDP(model)
    tracker = DDPCommunicationTracker()
    ddp.register_comm_hook(tracker, DDPCommunicationTracker.hook)
    losses = ddp(*batch(rank)).mean(dim=1)
    gramian = engine.compute_gramian(losses)
    buckets_after_gramian = tracker.buckets
    weights = UPGradWeighting()(gramian)
    (weights * losses).sum().backward()
    # By hand: each rank's own weights on its own Jacobian, then the mean over ranks.
    updates, all_weights = [], []
    for r in range(world):
        local = jacobian(reference, *batch(r), per_example=True)
        local_weights = UPGradWeighting()(local @ local.T)
        all_weights.append(local_weights)
        updates.append(local_weights @ local)
    close(weights, all_weights[rank], "local weights")
    close(flat_grads(model), sum(updates) / world, "gradient = mean over ranks of the local updates")
    global_full = jacobian(reference, *global_batch(world), per_example=True)
    return {
        "buckets_after_gramian": buckets_after_gramian,
        "ddp_backwards": tracker.backwards,
        "weights": weights.tolist(),
        "min_directional_derivative": float((global_full @ flat_grads(model)).min()),
    }


def ddp_mtl_global_direct_step(rank: int, world: int) -> dict[str, Any]:
    """The scheme of the trainer: forward under no_sync, all-reduced J over all parameters, the
    Gramian of the covered ones (all but the heads, like jd_modules), ``wᵀ J`` written directly."""
    model = make_model()
    reference = copy.deepcopy(model)
    ddp = DDP(model)
    tracker = DDPCommunicationTracker()
    ddp.register_comm_hook(tracker, DDPCommunicationTracker.hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    covered = [i for i, (name, _) in enumerate(model.named_parameters()) if not name.startswith("heads")]
    log = CommunicationLog()
    with ddp.no_sync():
        losses = ddp(*batch(rank)).mean(dim=0)
    reduced = global_mtl_jacobian(losses, params, log=log)
    weights = UPGradWeighting()(reduced.gramian(covered))
    reduced.add_weighted_to_grads(params, weights, factor=1.0)
    optimizer.step()

    full = jacobian(reference, *global_batch(world), per_example=False)
    sizes = [p.numel() for p in reference.parameters()]
    columns = torch.cat([torch.full((size,), i in covered) for i, size in enumerate(sizes)])
    covered_part = full[:, columns]
    ref_weights = UPGradWeighting()(covered_part @ covered_part.T)
    expected = flat_params(reference) - 0.1 * (ref_weights @ full)
    close(flat_params(model), expected, "parameters after one direct step vs single process on the global batch")
    return {"ddp_buckets": tracker.buckets, "jd_bytes": log.payload_bytes}


def ddp_mtl_global_direct_reached_union(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 skips the LayerNorm: its gradient is (J_0 + 0) / 2 on both ranks; an unused
    parameter keeps ``grad=None`` on both."""
    model = make_model()
    reference = copy.deepcopy(model)
    unused = nn.Parameter(torch.ones(2))
    params = [*model.parameters(), unused]
    losses = model(*batch(rank), skip_norm=rank == 1).mean(dim=0)
    reduced = global_mtl_jacobian(losses, params)
    weights = UPGradWeighting()(reduced.gramian())
    reduced.add_weighted_to_grads(params, weights)
    if unused.grad is not None:
        raise AssertionError("a parameter reached on no process got a gradient")
    full = sum(jacobian(reference, *batch(r), per_example=False, skip_norm=r == 1) for r in range(world)) / world
    expected_weights = UPGradWeighting()(full @ full.T)
    close(weights, expected_weights, "weights")
    close(flat_grads(model), expected_weights @ full, "update with a parameter reached on one process only")
    return {"reached": reduced.reached}


def layout_mismatch_raises(rank: int, world: int) -> dict[str, Any]:
    rows = TASKS + rank  # rank 1 has one task more
    jacobians = [torch.ones(rows, 2, 2)]
    try:
        all_reduce_jacobians_mean(jacobians)
    except RuntimeError as error:
        return {"message": str(error)}
    raise AssertionError("no error for different layouts")


def agreement(rank: int, world: int) -> dict[str, Any]:
    log = CommunicationLog()
    return {
        "one_false": all_processes_true(rank == 0, log=log),
        "all_true": all_processes_true(True, log=log),
        "bytes": log.payload_bytes,
    }


SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "gramian_matches_single_process": gramian_matches_single_process,
    "jacobians_unpack_to_mean": jacobians_unpack_to_mean,
    "ddp_mtl_global_step": ddp_mtl_global_step,
    "ddp_mtl_global_grad_accumulation": ddp_mtl_global_grad_accumulation,
    "ddp_iwrm_local_step": ddp_iwrm_local_step,
    "ddp_mtl_global_direct_step": ddp_mtl_global_direct_step,
    "ddp_mtl_global_direct_reached_union": ddp_mtl_global_direct_reached_union,
    "layout_mismatch_raises": layout_mismatch_raises,
    "agreement": agreement,
}


def run_all(rank: int, world: int, store: str, out_dir: str) -> None:
    """Entry point of every rank: initialise gloo, run every scenario, write ``rank<r>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results: dict[str, Any] = {"world_size": dist.get_world_size()}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = {"ok": True, **scenario(rank, world)}
            except Exception:  # noqa: BLE001 - recorded for the test to report
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    # Tearing down gloo while the peer is already gone can abort the process (SIGABRT) after the
    # work is done: wait for every rank, then leave without running the destructors.
    dist.barrier()
    os._exit(0)
