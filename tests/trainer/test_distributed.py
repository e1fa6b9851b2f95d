"""Multi-process Jacobian descent (DDP, 2 CPU processes, gloo) and the helpers of ``_distributed``.

Three groups of tests:

- single-process tests of the helpers (world size 1, error messages, accounting);
- ``torch.distributed`` scenarios run once in 2 spawned processes
  (``distributed_workers/core.py``): the global MTL Gramian against ``jacrev`` on the concatenated
  batch, DDP's all-reduce count, one SGD step, gradient accumulation and the local IWRM step;
- JDTrainer under ``torchrun --nproc_per_node 2`` (``distributed_workers/trainer_worker.py``)
  against a single-process JDTrainer run on the global batch and against computations by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from distributed_workers.core import TASKS as CORE_TASKS
from distributed_workers.core import TaskNet, batch, run_all
from distributed_workers.launch import run_in_own_session, spawn, torchrun
from hf_jd import JDTrainer
from hf_jd.aggregation import UPGradWeighting
from hf_jd.trainer._distributed import (
    CommunicationLog,
    all_processes_true,
    all_reduce_jacobians_mean,
    ddp_gradient_bytes,
    distributed_rank,
    distributed_world_size,
    global_mtl_gramian,
    global_mtl_jacobian,
    resolve_ddp_gramian,
)
from hf_jd.trainer._stats import StatsAccumulator
from jd_trainer_helpers import (
    TASKS,
    TwoTaskNet,
    explicit_jacobian,
    make_args,
    missing_labels_dataset,
    multi_head_model,
    tiny_bert,
    token_dataset,
    two_task_dataset,
)

WORKERS = Path(__file__).parent / "distributed_workers"


# ---------------------------------------------------------------------- single process
@pytest.mark.parametrize(
    ("setting", "mode", "expected"),
    [("auto", "mtl", "global"), ("auto", "iwrm", "local"), ("auto", "iwmtl", "local"),
     ("local", "mtl", "local"), ("global", "mtl", "global"), ("local", "iwrm", "local")],
)  # fmt: skip
def test_resolve_ddp_gramian(setting, mode, expected):
    assert resolve_ddp_gramian(setting, mode) == expected


@pytest.mark.parametrize(
    ("setting", "mode", "message"),
    [("global", "iwrm", "only implemented for jd_mode='mtl'"), ("global", "iwmtl", "jd_ddp_gramian='local'"),
     ("everywhere", "mtl", "jd_ddp_gramian='everywhere' is not valid"), ("auto", "per_token", "jd_mode='per_token'")],
)  # fmt: skip
def test_resolve_ddp_gramian_rejects(setting, mode, message):
    with pytest.raises(ValueError, match=message):
        resolve_ddp_gramian(setting, mode)


def test_single_process_helpers():
    assert distributed_world_size() == 1
    assert distributed_rank() == 0
    log = CommunicationLog()
    assert all_processes_true(True, log=log) is True
    assert all_processes_true(False, log=log) is False
    assert log.payload_bytes == 0  # nothing is sent without a process group


def _task_losses(model: TaskNet, rank: int = 0):
    return model(*batch(rank)).mean(dim=0)


def _explicit_task_jacobian(model: TaskNet, rank: int = 0) -> torch.Tensor:
    params = {name: p.detach() for name, p in model.named_parameters()}
    jac = jacrev(lambda values: functional_call(model, values, batch(rank)).mean(dim=0))(params)
    return torch.cat([jac[name].reshape(CORE_TASKS, -1) for name in params], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_mtl_gramian_single_process_is_the_gramian(dtype):
    model = TaskNet().to(dtype)
    gramian = global_mtl_gramian(_task_losses(model), list(model.parameters()), bucket_bytes=64)
    full = _explicit_task_jacobian(model)
    assert gramian.dtype == dtype
    torch.testing.assert_close(gramian, full @ full.T, atol=1e-5, rtol=1e-4)


def test_reduced_jacobian_unpacks_single_process():
    model = TaskNet()
    params = list(model.parameters())
    losses = _task_losses(model)
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    jacobians = [torch.stack(per_param) for per_param in zip(*rows)]
    reduced = all_reduce_jacobians_mean(jacobians, bucket_bytes=100)
    assert len(reduced.blocks) > 1
    for got, expected in zip(reduced.jacobians(), jacobians):
        torch.testing.assert_close(got, expected)
    full = torch.cat([j.reshape(CORE_TASKS, -1) for j in jacobians], dim=1)
    torch.testing.assert_close(reduced.gramian(), full @ full.T)


def test_global_mtl_gramian_leaves_grads_untouched():
    model = TaskNet()
    losses = _task_losses(model)
    global_mtl_gramian(losses, list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    losses.sum().backward()  # the graph was retained for the weighted backward


@pytest.mark.parametrize(
    ("losses", "params", "error", "message"),
    [
        (lambda m: m(*batch(0)), lambda m: list(m.parameters()), ValueError, r"shape \[m\]"),
        (lambda m: m(*batch(0)).mean(dim=0).detach(), lambda m: list(m.parameters()), ValueError, "require grad"),
        (lambda m: m(*batch(0)).mean(dim=0), lambda m: [], ValueError, "params is empty"),
        (lambda m: [1.0, 2.0], lambda m: list(m.parameters()), ValueError, r"shape \[m\]"),
    ],
)
def test_global_mtl_gramian_rejects(losses, params, error, message):
    model = TaskNet()
    with pytest.raises(error, match=message):
        global_mtl_gramian(losses(model), params(model))


@pytest.mark.parametrize(
    ("jacobians", "kwargs", "error", "message"),
    [
        ([], {}, ValueError, "jacobians is empty"),
        ([torch.zeros(2, 3), torch.zeros(3, 3)], {}, ValueError, "same number m >= 1 of rows"),
        ([torch.zeros(())], {}, ValueError, "same number m >= 1 of rows"),
        ([[0.0, 1.0]], {}, TypeError, "must be torch.Tensor"),
        ([torch.zeros(2, 3)], {"bucket_bytes": 0}, ValueError, "bucket_bytes must be a positive int"),
    ],
)
def test_all_reduce_jacobians_mean_rejects(jacobians, kwargs, error, message):
    with pytest.raises(error, match=message):
        all_reduce_jacobians_mean(jacobians, **kwargs)


def test_global_mtl_jacobian_single_process_writes_the_update():
    model = TaskNet()
    unused = torch.nn.Parameter(torch.ones(3))
    params = [*model.parameters(), unused]
    model.lin.weight.grad = torch.ones_like(model.lin.weight)  # an accumulated gradient stays
    reduced = global_mtl_jacobian(_task_losses(model), params, bucket_bytes=128)
    assert reduced.reached == [True] * 7 + [False]
    full = _explicit_task_jacobian(model)
    covered = [0, 1, 2]  # embedding and the first Linear only
    width = sum(p.numel() for p in params[:3])
    torch.testing.assert_close(reduced.gramian(covered), full[:, :width] @ full[:, :width].T, atol=1e-5, rtol=1e-4)
    weights = torch.tensor([0.5, -1.0, 2.0])
    reduced.add_weighted_to_grads(params, weights, factor=0.25)
    expected = 0.25 * (weights @ full)
    start = model.emb.weight.numel()  # lin.weight follows the embedding
    expected[start : start + model.lin.weight.numel()] += 1.0  # the gradient it already had
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert unused.grad is None  # reached by no loss: left alone, as by a backward pass


def test_reduced_jacobian_rejects_bad_weights_and_params():
    model = TaskNet()
    params = list(model.parameters())
    reduced = global_mtl_jacobian(_task_losses(model), params)
    with pytest.raises(ValueError, match="weights must have 3 entries"):
        reduced.weighted_sums(torch.ones(4))
    with pytest.raises(ValueError, match="Expected 7 parameters"):
        reduced.add_weighted_to_grads(params[:-1], torch.ones(3))
    with pytest.raises(ValueError, match="reached has 1 entries for 2 Jacobians"):
        all_reduce_jacobians_mean([torch.zeros(2, 3), torch.zeros(2, 4)], reached=[True])


def test_arguments_reject_global_gramian_for_per_example_losses(tmp_path):
    # Needs the integration patch (arguments.py calls resolve_ddp_gramian).
    with pytest.raises(ValueError, match="only implemented for jd_mode='mtl'"):
        make_args(tmp_path, jd_mode="iwrm", jd_ddp_gramian="global")


def test_communication_log():
    log = CommunicationLog()
    log.add("all_reduce", torch.zeros(10), "jacobian")
    log.add("all_reduce", torch.zeros(3, dtype=torch.uint8), "row_masks")
    log.add("all_gather", torch.zeros(2, dtype=torch.float64), "factors")
    assert (log.all_reduce_bytes, log.all_gather_bytes, log.payload_bytes, log.collectives) == (43, 16, 59, 3)
    assert log.details == {"jacobian": 40, "row_masks": 3, "factors": 16}
    # Ring all-reduce: 2 (P-1)/P of the payload; all-gather: (P-1) times the local part.
    assert log.ring_bytes_sent(4) == pytest.approx(2 * 3 / 4 * 43 + 3 * 16)
    assert log.ring_bytes_sent(1) == 0
    with pytest.raises(ValueError, match="Unknown collective kind 'broadcast'"):
        log.add("broadcast", torch.zeros(1), "x")
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        log.ring_bytes_sent(0)
    log.reset()
    assert log.payload_bytes == 0 and log.details == {}


def test_ddp_gradient_bytes():
    model = TaskNet()
    model.emb.weight.requires_grad_(False)
    expected = 4 * sum(p.numel() for name, p in model.named_parameters() if name != "emb.weight")
    assert ddp_gradient_bytes(list(model.parameters())) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fsdp": "full_shard"}, "does not support FSDP"),
        ({"deepspeed": {"train_batch_size": 8}}, "does not support DeepSpeed"),
    ],
)
def test_sharded_parallelism_rejected_at_start_up(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, **kwargs)


# ---------------------------------------------------------------------- 2 processes, torch.distributed
@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """Every scenario of ``distributed_workers/core.py``, run once in 2 processes: results by rank."""
    return spawn(run_all, 2, tmp_path_factory.mktemp("core"), timeout=180.0)


def _scenario(core, name):
    assert [ranks["world_size"] for ranks in core] == [2, 2]
    results = [ranks[name] for ranks in core]
    for rank, result in enumerate(results):
        assert result["ok"], f"rank {rank} failed:\n{result['error']}"
    return results


@pytest.mark.multiprocess
@pytest.mark.slow
def test_global_gramian_equals_single_process_gramian(core):
    results = _scenario(core, "gramian_matches_single_process")
    assert results[0]["gramian"] == results[1]["gramian"]  # bit-identical on every process
    for result in results:
        # Row-sparse all-reduce: only embedding rows used by some process are sent.
        assert result["jacobian_bytes"] == result["expected_jacobian_bytes"]
        assert result["row_mask_bytes"] == result["expected_row_mask_bytes"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_reduced_jacobians_are_the_mean(core):
    results = _scenario(core, "jacobians_unpack_to_mean")
    assert all(result["blocks"] > 1 for result in results)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_step_with_global_gramian(core):
    for result in _scenario(core, "ddp_mtl_global_step"):
        assert result["buckets_after_gramian"] == 0  # the Jacobian pass does not trigger DDP
        assert result["ddp_backwards"] == 1  # the weighted backward does, once
        assert result["ddp_bytes"] == result["param_bytes"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_grad_accumulation_with_global_gramian(core):
    for result in _scenario(core, "ddp_mtl_global_grad_accumulation"):
        assert result["ddp_backwards_per_micro_batch"] == [0, 1]  # no_sync, then one all-reduce


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_local_iwrm_step(core):
    results = _scenario(core, "ddp_iwrm_local_step")
    for result in results:
        assert result["buckets_after_gramian"] == 0  # the autogram engine's pass does not trigger DDP
        assert result["ddp_backwards"] == 1


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_direct_global_step_needs_no_ddp_all_reduce(core):
    results = _scenario(core, "ddp_mtl_global_direct_step")
    for result in results:
        assert result["ddp_buckets"] == 0  # every process wrote the same update itself
        assert result["jd_bytes"] > 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_direct_global_step_reached_union(core):
    for result in _scenario(core, "ddp_mtl_global_direct_reached_union"):
        assert result["reached"] == [True] * 7 + [False]  # the LayerNorm (reached on rank 0) counts


@pytest.mark.multiprocess
@pytest.mark.slow
def test_layout_mismatch_raises_on_every_process(core):
    for result in _scenario(core, "layout_mismatch_raises"):
        assert "different layouts" in result["message"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_agreement_across_processes(core):
    for result in _scenario(core, "agreement"):
        assert (result["one_false"], result["all_true"], result["bytes"]) == (False, True, 2)


def test_stats_means_over_processes_with_differing_names():
    """``pop_means(across_processes=True)``: total sum over total count of every name any process has."""
    accumulator = StatsAccumulator()
    accumulator.add({"x": torch.tensor(1.0), "y": torch.tensor(2.0)})
    accumulator.add({"x": torch.tensor(3.0)})
    other = {"x": (10.0, 2), "z": (6.0, 3)}  # another process: two observations of x, none of y
    seen = []
    means = accumulator.pop_means(across_processes=True, gather=lambda local: seen.append(local) or [local, other])
    assert seen == [{"x": (4.0, 2), "y": (2.0, 1)}]
    assert means == {"x": 14.0 / 4, "y": 2.0, "z": 2.0}
    assert not accumulator
    # Without a process group (one process) it is the plain mean.
    accumulator.add({"x": torch.tensor(1.0)})
    accumulator.add({"x": torch.tensor(2.0)})
    assert accumulator.pop_means(across_processes=True) == {"x": 1.5}


# ---------------------------------------------------------------------- 2 processes, JDTrainer
@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """The scenarios of ``trainer_worker.py`` under ``torchrun --nproc_per_node 2``: {name: [rank0, rank1]}."""
    out = tmp_path_factory.mktemp("trainer_runs")
    names = ["mtl_global", "mtl_global_ga2", "mtl_global_modules", "mtl_global_reuse", "iwrm_local", "iwrm_local_ga2",
             "nonfinite_skip", "mtl_local_stats", "mtl_local_gradvac", "mtl_eval_uneven", "iwrm_eval",
             "mtl_global_missing_labels"]  # fmt: skip
    torchrun(WORKERS / "trainer_worker.py", [str(out), *names], timeout=300.0)
    names.append("mtl_local_gradvac_resumed")  # (run by the mtl_local_gradvac scenario)
    runs = {
        name: [torch.load(out / f"{name}_rank{rank}.pt", weights_only=False) for rank in range(2)] for name in names
    }
    evaluations = {name: runs.pop(name) for name in ["mtl_eval_uneven", "iwrm_eval"]}
    for name, ranks in runs.items():
        for rank, run in enumerate(ranks):
            assert run["world_size"] == 2, f"{name} rank {rank}: the processes did not form one group"
            assert run["ddp_wrapped"], f"{name} rank {rank}: the model was not wrapped in DDP"
    return {**runs, **evaluations}


def _single_process_run(tmp_path, initial, **arguments):
    model = TwoTaskNet()
    model.load_state_dict(initial)
    args = make_args(tmp_path, optim="sgd", jd_mode="mtl", jd_task_names=TASKS, **arguments)
    trainer = JDTrainer(model=model, args=args, train_dataset=two_task_dataset(16))
    trainer.train()
    return model, trainer


def _assert_same_parameters(model, state, what):
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            state[name], value, atol=1e-5, rtol=0, msg=lambda text, name=name: f"{what}, {name}: {text}"
        )


def _logged(run, key):
    return [entry[key] for entry in run["log_history"] if key in entry]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_mtl_global_equals_single_process_on_global_batch(trainer_runs, tmp_path):
    ranks = trainer_runs["mtl_global"]
    assert all(run["ddp_gramian"] == "global" for run in ranks)
    # The two processes saw the two halves of the first global batch of 8.
    seen = torch.cat([run["inputs"][0]["x"] for run in ranks])
    torch.testing.assert_close(seen, torch.tensor(two_task_dataset(16)["x"][:8]))
    model, trainer = _single_process_run(tmp_path, ranks[0]["initial"], max_steps=1, per_device_train_batch_size=8)
    for rank, run in enumerate(ranks):
        _assert_same_parameters(model, run["final"], f"rank {rank} after one step")
        for task in TASKS:  # every process logs the weights of the global Gramian
            expected = _logged({"log_history": trainer.state.log_history}, f"jd/weight_{task}")
            assert _logged(run, f"jd/weight_{task}") == pytest.approx(expected, abs=1e-5)
        # Every process wrote the same update itself: DDP's gradient all-reduce never ran.
        assert run["ddp_backwards"] == 0
        assert run["jd_bytes"] > 0
        assert _logged(run, "jd/comm_bytes") == [float(run["jd_bytes"])]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_mtl_global_logs_the_task_losses_of_the_global_batch(trainer_runs, tmp_path):
    """``loss_<task>`` is averaged over the processes like ``loss`` (it used to be rank 0's half only)."""
    ranks = trainer_runs["mtl_global"]
    halves = []
    for run in ranks:  # each process's task losses on its own half, by hand
        model = TwoTaskNet()
        model.load_state_dict(run["initial"])
        with torch.no_grad():
            halves.append({task: float(loss) for task, loss in model(**run["inputs"][0])["losses"].items()})
    _, trainer = _single_process_run(tmp_path, ranks[0]["initial"], max_steps=1, per_device_train_batch_size=8)
    for task in TASKS:
        assert halves[0][task] != pytest.approx(halves[1][task], rel=1e-2)  # rank 0's half alone would be wrong
        mean = (halves[0][task] + halves[1][task]) / 2
        # Equal halves and mean-reduced task losses: the mean of the halves is the loss of the global batch.
        assert _logged({"log_history": trainer.state.log_history}, f"loss_{task}") == pytest.approx([mean], rel=1e-5)
        for rank, run in enumerate(ranks):
            assert _logged(run, f"loss_{task}") == pytest.approx([mean], rel=1e-5), f"rank {rank}, task {task}"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_local_statistics_are_averaged_over_processes(trainer_runs):
    """With "local" weights every logged statistic is the mean over the processes of each one's own values; a
    statistic that one process lacks at a step (``jd/min_cosine`` with a zero Jacobian row) is the mean over the
    processes that have it, and the logging collective does not hang on the differing names."""
    ranks = trainer_runs["mtl_local_stats"]
    local = [run["local_stats"] for run in ranks]  # [rank][step] -> {name: value}
    assert [len(steps) for steps in local] == [2, 2]
    assert "jd/min_cosine" in local[0][1] and "jd/min_cosine" not in local[1][1]
    assert local[0][0]["jd/weight_a"] != pytest.approx(local[1][0]["jd/weight_a"], rel=1e-3)  # the processes differ
    for step in range(2):
        names = set(local[0][step]) | set(local[1][step])
        expected = {}
        for name in names:
            values = [steps[step][name] for steps in local if name in steps[step]]
            expected[name] = sum(values) / len(values)
        for rank, run in enumerate(ranks):
            logged = [entry for entry in run["log_history"] if "loss" in entry][step]
            assert {name: logged.get(name) for name in names} == pytest.approx(expected, rel=1e-6, abs=1e-7), (
                f"rank {rank}, step {step}"
            )
    assert local[1][1]["loss_a"] == 0.0
    assert _logged(ranks[0], "loss_a")[1] == pytest.approx(local[0][1]["loss_a"] / 2, rel=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_grad_accumulation_two_processes(trainer_runs, tmp_path):
    ranks = trainer_runs["mtl_global_ga2"]
    model, _ = _single_process_run(
        tmp_path, ranks[0]["initial"], max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    for rank, run in enumerate(ranks):
        _assert_same_parameters(model, run["final"], f"rank {rank} after two steps of 2 micro-batches")
        # Every micro-batch's update is written directly (forward under no_sync): no DDP all-reduce.
        assert run["ddp_backwards_at_step"] == [0, 0]
        assert len(run["inputs"]) == 4


def _local_update_by_hand(initial, inputs, labels):
    model = tiny_bert()
    model.load_state_dict(initial)
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(**inputs).logits
    losses = F.cross_entropy(logits, labels, reduction="none")
    jacobian = explicit_jacobian(losses, params)
    weights = UPGradWeighting()(jacobian @ jacobian.T)
    return weights, weights @ jacobian


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_mtl_global_with_jd_modules(trainer_runs, tmp_path):
    ranks = trainer_runs["mtl_global_modules"]
    model, _ = _single_process_run(
        tmp_path, ranks[0]["initial"], max_steps=1, per_device_train_batch_size=8, jd_modules=["encoder"]
    )
    for rank, run in enumerate(ranks):
        # The heads (outside jd_modules) get the weighted gradient of the global batch too.
        _assert_same_parameters(model, run["final"], f"rank {rank}, jd_modules=['encoder']")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_mtl_global_reused_weights(trainer_runs, tmp_path):
    ranks = trainer_runs["mtl_global_reuse"]
    model, _ = _single_process_run(
        tmp_path, ranks[0]["initial"], max_steps=2, per_device_train_batch_size=8, jd_update_weights_every=2
    )
    for rank, run in enumerate(ranks):
        _assert_same_parameters(model, run["final"], f"rank {rank}, weights reused at step 1")
        # Step 0 writes the global update itself; step 1 reuses the weights in a backward through DDP.
        assert run["ddp_backwards_at_step"] == [0, 1]


def _micro_batch_by_hand(run, micro):
    """Weights and update of one rank's micro-batch, recomputed from the initial model."""
    dataset = token_dataset(16)
    all_ids = torch.tensor(dataset["input_ids"])
    inputs = run["inputs"][micro]
    rows = [int((all_ids == row).all(dim=1).nonzero()[0]) for row in inputs["input_ids"]]
    labels = torch.tensor(dataset["labels"])[rows]
    return _local_update_by_hand(run["initial"], dict(inputs), labels)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_iwrm_local_is_mean_of_local_updates(trainer_runs):
    ranks = trainer_runs["iwrm_local"]
    assert all(run["ddp_gramian"] == "local" for run in ranks)
    updates, local_weights = [], []
    for run in ranks:
        weights, update = _micro_batch_by_hand(run, 0)
        updates.append(update)
        local_weights.append(weights)
    expected = (updates[0] + updates[1]) / 2  # DDP averages the processes' aggregated local Jacobians
    for rank, run in enumerate(ranks):
        # Every process logs the mean over the processes of each one's own (local) weight statistics
        # (to the dual solver's tolerance).
        for key, reduce in (("jd/weight_min", torch.min), ("jd/weight_max", torch.max), ("jd/weight_mean", torch.mean)):
            mean = sum(float(reduce(weights)) for weights in local_weights) / 2
            assert _logged(run, key) == pytest.approx([mean], rel=1e-3), key
        torch.testing.assert_close(
            run["grads"][0], expected, atol=1e-4, rtol=1e-3, msg=lambda t, rank=rank: f"rank {rank}: {t}"
        )
        assert run["ddp_backwards"] == 1  # the weighted backward synchronised once
        assert _logged(run, "jd/comm_bytes") == [2.0]  # only the two 1-byte finiteness agreements


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_iwrm_local_grad_accumulation(trainer_runs):
    ranks = trainer_runs["iwrm_local_ga2"]
    expected = 0
    for run in ranks:
        assert len(run["inputs"]) == 2
        for micro in range(2):
            expected = expected + 0.5 * _micro_batch_by_hand(run, micro)[1] / 2
    for rank, run in enumerate(ranks):
        torch.testing.assert_close(
            run["grads"][0], expected, atol=1e-4, rtol=1e-3, msg=lambda t, rank=rank: f"rank {rank}: {t}"
        )
        # Accelerate runs the first micro-batch under no_sync: one all-reduce per optimizer step.
        assert run["ddp_backwards_at_step"] == [1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_nonfinite_loss_on_one_process_skips_on_all(trainer_runs):
    ranks = trainer_runs["nonfinite_skip"]
    for run in ranks:
        assert run["skipped_steps"] == 1  # rank 0's losses were finite, it skipped all the same
        assert _logged(run, "jd/skipped_steps") == [1.0, 1.0]
        assert run["ddp_backwards"] == 0
    torch.testing.assert_close(ranks[0]["grads"][0], torch.zeros_like(ranks[0]["grads"][0]))
    for name, value in ranks[0]["final"].items():
        torch.testing.assert_close(ranks[1]["final"][name], value, atol=0, rtol=0)
    # The skipped step's loss is filtered alike on both (the Trainer's logging_nan_inf_filter): one process logged its
    # finite loss, the other nothing, and their average was half a loss.
    assert _logged(ranks[0], "loss")[0] == _logged(ranks[1], "loss")[0] == 0.0


@pytest.mark.multiprocess
def test_accelerate_example_runs_and_exits_in_two_processes(tmp_path):
    """examples/accelerate/train_multi_gpu.py under torchrun with 2 CPU processes: it trains, prints the metrics
    once and both processes exit (rank 0 used to wait forever at exit in about half of the runs, before the
    example waited for every process ahead of end_training)."""
    script = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "train_multi_gpu.py"
    arguments = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--max_steps", "3", "--num_train", "64",
                 "--num_eval", "32", "--expected_world_size", "2"]  # fmt: skip
    result = torchrun(script, arguments, timeout=120.0)
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("'eval_loss'") == 1


def test_launcher_timeout_kills_the_workers_too(tmp_path):
    """A launcher that times out is killed with the processes it started (no worker left using the CPU)."""
    marker = tmp_path / "child.pid"
    quiet = "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL"  # (the pipes close with the launcher)
    child = (
        f"import subprocess, time; pid = subprocess.Popen(['sleep', '60'], {quiet}).pid; "
        f"open({str(marker)!r}, 'w').write(str(pid)); time.sleep(60)"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_own_session([sys.executable, "-c", child], dict(os.environ), timeout=3.0)
    pid = int(marker.read_text())
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # (a zombie has exited)
    except FileNotFoundError:
        return False


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_resumes_each_processs_own_aggregator_state(trainer_runs):
    """With per-process weights each rank's GradVac has its own targets: the checkpoint keeps each one (it kept rank
    0's, which rank 1 then resumed with), so that the resumed run ends where the uninterrupted one does."""
    for rank in range(2):
        full, resumed = trainer_runs["mtl_local_gradvac"][rank], trainer_runs["mtl_local_gradvac_resumed"][rank]
        for name, value in full["final"].items():
            torch.testing.assert_close(resumed["final"][name], value, atol=1e-6, rtol=0)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_task_losses_of_an_uneven_evaluation_leave_out_the_padding(trainer_runs, tmp_path):
    """12 examples in global batches of 8: accelerate pads rank 1's last batch with the first examples, which the
    per-task losses counted (eval_loss_a was the mean over 16 examples). They equal one process's evaluation now."""
    model = TwoTaskNet()
    model.load_state_dict(trainer_runs["mtl_eval_uneven"][0]["model"])
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, per_device_eval_batch_size=4)
    trainer = JDTrainer(model=model, args=args, train_dataset=two_task_dataset(16))
    single = trainer.evaluate(two_task_dataset(12, seed=5))
    for rank in range(2):
        metrics = trainer_runs["mtl_eval_uneven"][rank]["metrics"]
        for key in ("eval_loss", "eval_loss_a", "eval_loss_b"):
            assert metrics[key] == pytest.approx(single[key], rel=1e-5), (rank, key)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_eval_loss_of_a_model_that_ignores_the_token_count_is_not_multiplied_by_the_processes(trainer_runs, tmp_path):
    """BERT's classifier accepts the Trainer's num_items_in_batch and ignores it; the Trainer then multiplies its loss
    by the number of processes (eval_loss was twice the loss on 2 processes)."""
    model = tiny_bert()
    model.load_state_dict(trainer_runs["iwrm_eval"][0]["model"])
    args = make_args(tmp_path, jd_mode="iwrm", per_device_eval_batch_size=4)
    single = JDTrainer(model=model, args=args, train_dataset=token_dataset(16)).evaluate(token_dataset(16, seed=3))
    for rank in range(2):
        assert trainer_runs["iwrm_eval"][rank]["metrics"]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_trainer_mtl_global_with_missing_labels_equals_single_process_on_global_batch(trainer_runs, tmp_path):
    """A MultiHeadModel's task loss is the mean over the examples carrying the task's label: the global step weights
    each process's by its label count (rank 1 carries no label of task b, which halved b's loss and gradient)."""
    ranks = trainer_runs["mtl_global_missing_labels"]
    model = multi_head_model()
    model.load_state_dict(ranks[0]["initial"])
    args = make_args(tmp_path, optim="sgd", jd_mode="mtl", jd_task_names=TASKS, label_names=["labels_a", "labels_b"],
                     max_steps=1, per_device_train_batch_size=8, train_sampling_strategy="sequential")  # fmt: skip
    trainer = JDTrainer(model=model, args=args, train_dataset=missing_labels_dataset())
    trainer.train()
    for rank, run in enumerate(ranks):
        _assert_same_parameters(model, run["final"], f"rank {rank} after one step")
        for task in TASKS:
            expected = _logged({"log_history": trainer.state.log_history}, f"loss_{task}")
            assert _logged(run, f"loss_{task}") == pytest.approx(expected, rel=1e-5)
