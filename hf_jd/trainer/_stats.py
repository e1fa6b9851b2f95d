"""Statistics of a Jacobian-descent step for logging: weights, task losses and conflicts.

Everything here works on small detached tensors (the weights, the losses and the ``[r, r]``
Gramian of the ``r`` Jacobian rows); values are accumulated on their device and turned into
Python floats only when the Trainer logs, so no step waits on a device synchronisation.

With several processes (DDP) :meth:`StatsAccumulator.pop_means` averages every statistic over
the processes as well (one ``all_gather_object`` per logging step), like the Trainer's ``loss``;
see its docstring for what each logged value then means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._distributed import all_gather_objects

__all__ = ["gramian_stats", "weight_stats", "loss_stats", "StatsAccumulator"]


def gramian_stats(gramian: Tensor) -> dict[str, Tensor]:
    """Conflict statistics of the rows of ``J`` from its Gramian ``G = J Jᵀ``.

    Returns ``jd/conflicting_pairs`` (number of pairs ``i < j`` with ``G_ij < 0``, i.e. rows whose
    gradients conflict) and, when at least one pair of non-zero rows exists, ``jd/min_cosine``
    (the smallest cosine similarity ``G_ij / sqrt(G_ii G_jj)`` over those pairs).

    Parameters
    ----------
    gramian
        The ``[m, m]`` Gramian.

    Returns
    -------
    dict[str, Tensor]
        The statistics above, as float32 scalars.
    """
    gramian = gramian.detach().float()
    rows = gramian.shape[0]
    upper = torch.triu(torch.ones(rows, rows, dtype=torch.bool, device=gramian.device), diagonal=1)
    stats = {"jd/conflicting_pairs": ((gramian < 0) & upper).sum().float()}
    norms = gramian.diagonal().clamp(min=0).sqrt()
    nonzero = norms > 0
    valid = upper & nonzero[:, None] & nonzero[None, :]
    if bool(valid.any()):
        cosine = gramian / (norms[:, None] * norms[None, :]).clamp(min=torch.finfo(torch.float32).tiny)
        stats["jd/min_cosine"] = cosine[valid].min().clamp(-1.0, 1.0)
    return stats


def weight_stats(weights: Tensor, mode: str, task_names: Sequence[str] | None) -> dict[str, Tensor]:
    """Summaries of the aggregation weights.

    ``mtl``: ``jd/weight_<task>``; ``iwrm``: ``jd/weight_min``, ``jd/weight_max``, ``jd/weight_mean``;
    ``iwmtl`` (weights ``[B, m]``): ``jd/weight_<task>`` is the total weight of the task over the
    batch, plus the min/max/mean over all entries.

    Parameters
    ----------
    weights
        The aggregation weights (``[m]``, ``[B]`` or ``[B, m]``).
    mode
        ``"mtl"``, ``"iwrm"`` or ``"iwmtl"``.
    task_names
        Names of the tasks (default: their indices).

    Returns
    -------
    dict[str, Tensor]
        The summaries above, as float32 scalars.
    """
    weights = weights.detach().float()
    stats: dict[str, Tensor] = {}
    if mode == "mtl":
        names = task_names or [str(k) for k in range(weights.numel())]
        for name, value in zip(names, weights.reshape(-1)):
            stats[f"jd/weight_{name}"] = value
        return stats
    if mode == "iwmtl":
        names = task_names or [str(k) for k in range(weights.shape[-1])]
        for name, value in zip(names, weights.reshape(-1, len(names)).sum(dim=0)):
            stats[f"jd/weight_{name}"] = value
    stats["jd/weight_min"] = weights.min()
    stats["jd/weight_max"] = weights.max()
    stats["jd/weight_mean"] = weights.mean()
    return stats


def loss_stats(
    losses: Tensor, mode: str, task_names: Sequence[str] | None, label_counts: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Per-task losses ``loss_<task>``.

    ``mtl``: each task loss. ``iwmtl``: each column's sum divided by ``label_counts[k]`` (the
    number of examples carrying task ``k``'s label; tasks with none are left out), or the column
    mean when the counts are unknown.

    Parameters
    ----------
    losses
        The losses (``[m]`` or ``[B, m]``).
    mode
        ``"mtl"``, ``"iwrm"`` or ``"iwmtl"`` (``iwrm`` gives no per-task loss).
    task_names
        Names of the tasks; without them there is no per-task loss.
    label_counts
        ``iwmtl``: the number of examples that carry each task's label.

    Returns
    -------
    dict[str, Tensor]
        ``loss_<task>`` per task, as float32 scalars.
    """
    losses = losses.detach().float()
    if mode == "mtl" and task_names:
        return {f"loss_{name}": value for name, value in zip(task_names, losses.reshape(-1))}
    if mode == "iwmtl" and task_names:
        columns = losses.reshape(-1, len(task_names))
        if label_counts is None:
            return {f"loss_{name}": value for name, value in zip(task_names, columns.mean(dim=0))}
        sums = columns.sum(dim=0)
        return {
            f"loss_{name}": total / count
            for name, total, count in zip(task_names, sums, label_counts)
            if count > 0
        }
    return {}


class StatsAccumulator:
    """Running means of named scalar statistics over a logging interval."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, stats: dict[str, Tensor]) -> None:
        """Add one observation of each named scalar.

        Parameters
        ----------
        stats
            Name -> scalar tensor.
        """
        for name, value in stats.items():
            value = value.detach().float()
            if name in self._sums:
                self._sums[name] = self._sums[name] + value
                self._counts[name] += 1
            else:
                self._sums[name] = value.clone()
                self._counts[name] = 1

    def __bool__(self) -> bool:
        return bool(self._sums)

    def pop_means(
        self,
        across_processes: bool = False,
        gather: Callable[[object], list[object]] | None = None,
    ) -> dict[str, float]:
        """Return the mean of every statistic since the last call, and start a new interval.

        With ``across_processes`` (several processes, DDP) the means are taken over the observations
        of every process: the ``(sum, count)`` of each statistic are gathered from all processes in
        one collective (``torch.distributed.all_gather_object``) and each mean is the total sum over
        the total count, the same on every process. With equal counts (the usual case: every process
        runs the same steps) this is the mean over the processes of each process's interval mean,
        as the Trainer's ``loss`` is. It is a collective: every process must call it at the same
        logging step, also one that recorded nothing (the Trainer logs at the same steps on every
        process, after gathering ``loss``). What the logged values then mean, with ``JDTrainer``:

        - ``loss_<task>``: each process's task loss is on its local batch; logged is its mean over
          the processes (and the interval). For ``mtl`` with equal local batches and mean-reduced
          task losses this is the task loss of the global batch (the losses whose Jacobian gives
          the weights with ``jd_ddp_gramian="global"``). ``iwmtl``: the mean, over the processes
          (and micro-batches) holding some label of the task, of their label-count-normalised losses.
        - ``jd/weight_*``, ``jd/conflicting_pairs``, ``jd/min_cosine`` with ``"global"``: computed
          from the global Gramian, identical on every process, so the mean leaves them unchanged
          (exactly: the sum of ``P`` copies of a float32 in float64 is exact). With ``"local"``:
          each process's values on its own batch (its own weights and Gramian), averaged over the
          processes as over the micro-batches of gradient accumulation: ``jd/weight_min`` is the mean
          of the processes' minimums, ``jd/conflicting_pairs`` counts pairs within a process only.
        - ``jd/min_cosine`` and ``iwmtl``'s ``loss_<task>`` are absent from some observations (no
          pair of non-zero rows, no label of the task); their mean is over the observations that
          have them, on whichever processes.

        Parameters
        ----------
        across_processes
            Average over the processes of the default ``torch.distributed`` group too (nothing more
            without an initialised group of several processes).
        gather
            Replaces the collective (for tests): maps this process's ``{name: (sum, count)}`` to the
            list of every process's.

        Returns
        -------
        dict[str, float]
            Name -> mean over the observations of the interval.
        """
        names = list(self._sums)
        sums: list[float] = []
        if names:
            device = self._sums[names[0]].device
            # One device synchronisation for all the statistics.
            sums = torch.stack([self._sums[name].to(device) for name in names]).double().tolist()
        local = {name: (total, self._counts[name]) for name, total in zip(names, sums)}
        self._sums.clear()
        self._counts.clear()
        if not across_processes:
            return {name: total / count for name, (total, count) in local.items()}
        if gather is None:
            gather = all_gather_objects
        totals: dict[str, list[float]] = {}
        for process in gather(local):
            for name, (total, count) in process.items():  # type: ignore[attr-defined]
                entry = totals.setdefault(name, [0.0, 0])
                entry[0] += total
                entry[1] += count
        return {name: total / count for name, (total, count) in totals.items() if count > 0}

