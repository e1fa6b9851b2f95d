"""Multi-process (DDP) Jacobian descent: process-group helpers, the exact global MTL Gramian and
communication accounting.

Under ``accelerate launch`` / ``torchrun`` every process holds a replica of the model wrapped by
``DistributedDataParallel`` (DDP) and its own slice (its *local batch*) of the global batch. DDP
averages the parameter gradients over the processes during ``backward``. Jacobian descent (Quinton
& Rey, "Jacobian Descent For Multi-Objective Optimization", arXiv 2406.16232) needs more than that
average: the weights come from the Gramian ``G = J Jᵀ`` of the Jacobian ``J`` of the losses. This
module says which ``J``, for the two settings of ``jd_ddp_gramian``:

``"global"`` (the default for ``jd_mode="mtl"``)
    The losses are the task losses averaged over the processes, ``L_k = (1/P) Σ_p L_k^p``; with
    equal local batch sizes and mean-reduced task losses this is the task loss of the concatenated
    global batch. Its Jacobian is ``J = (1/P) Σ_p J_p``, where ``J_p`` (``m × n``) is process
    ``p``'s Jacobian of its local task losses. ``G = J Jᵀ`` has cross-process terms
    ``J_p J_qᵀ``, so it cannot be assembled from local Gramians. The exact scheme used by
    JDTrainer (:func:`global_mtl_jacobian`): the forward pass runs under DDP's ``no_sync``; every
    process computes ``J_p`` w.r.t. all trainable parameters (:func:`hf_jd.autojac.jac`, ``m``
    batched vector-Jacobian products) and all-reduces it (mean), so every process holds the same
    ``J``, forms the same ``G`` (on the parameters covered by ``jd_modules``) and the same weights
    ``w``, and writes the same update ``wᵀ J`` into ``.grad``: the step of a single process on the
    global batch, without DDP's gradient all-reduce.

    Communication per weight computation: ``m`` times the parameters' size, *row-sparse*: a row of
    a parameter (e.g. the embedding vector of a token that no process saw) whose Jacobian is zero on
    every process is not sent; one byte per row (and per parameter) is all-reduced first to agree
    on the rows. For embedding tables this removes almost all of their cost. Steps that reuse
    cached weights (``jd_update_weights_every > 1``) are ordinary weighted backward passes through
    DDP. :func:`global_mtl_gramian` is the variant that keeps DDP: the Gramian from the all-reduced
    Jacobian of the covered parameters, then a weighted backward whose DDP average is ``wᵀ J``
    (``m`` times the covered size plus DDP's all-reduce of the gradients).

``"local"`` (the default for ``jd_mode="iwrm"`` and ``"iwmtl"``)
    Each process computes the Gramian of its own local Jacobian ``J_p`` (one row per local example,
    or per local example and task) with the autogram engine, its own weights ``w_p`` and
    back-propagates ``Σ_i w_{p,i} ℓ_{p,i}``; DDP averages. The update is therefore

        ``d = (1/P) Σ_p A(J_p)``,

    the mean over processes of the aggregation of each process's local Jacobian: exactly Jacobian
    descent with a batch of ``B_local`` examples whose ``P`` updates are averaged, as gradient
    accumulation over ``P`` micro-batches would do. Conflicts between examples held by different
    processes are not seen by the aggregator (for UPGrad, the non-conflict guarantee
    ``J_p d_p ≥ 0`` holds per process for its own update ``d_p``, not for the averaged ``d`` over
    the global batch). No communication beyond DDP's gradient all-reduce (and, in JDTrainer, two
    1-byte agreements per step so that all processes skip or raise together on non-finite values).

The exact global Gramian for ``iwrm`` (``B_total × B_total``) would need, for every layer, the
cross terms between the per-example gradients of different processes, i.e. an all-gather of the
per-example factors that the autogram engine captures (layer inputs and output gradients), or of
the per-example gradients themselves (``B_local × n`` per process). It is not implemented:
:func:`resolve_ddp_gramian` rejects ``"global"`` with ``iwrm``/``iwmtl``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "CommunicationLog",
    "DDPCommunicationTracker",
    "all_gather_objects",
    "all_processes_true",
    "all_reduce_jacobians_mean",
    "ddp_gradient_bytes",
    "distributed_rank",
    "distributed_world_size",
    "global_mtl_gramian",
    "global_mtl_jacobian",
    "ReducedJacobian",
    "resolve_ddp_gramian",
]

DDP_GRAMIAN_SETTINGS = ("auto", "global", "local")
DEFAULT_BUCKET_BYTES = 25 * 2**20


# ---------------------------------------------------------------------- process group
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def distributed_world_size(group: Any = None) -> int:
    """Number of processes of ``group`` (the default group when ``None``); 1 without ``torch.distributed``.

    Accelerate and the Trainer initialise the default process group at start-up, so this is the
    number of processes started by ``accelerate launch`` / ``torchrun`` once the
    ``TrainingArguments`` exist.

    Parameters
    ----------
    group
        A process group, or ``None`` for the default one.

    Returns
    -------
    int
        The number of processes.
    """
    return dist.get_world_size(group) if _initialized() else 1


def all_gather_objects(value: object, group: Any = None) -> list[object]:
    """``value`` of every process of ``group`` (the default group when ``None``), in rank order; ``[value]``
    with one process. A collective: every process of the group must call it.

    Parameters
    ----------
    value
        A picklable object.
    group
        A process group, or ``None`` for the default one.

    Returns
    -------
    list
        One entry per process.
    """
    world_size = distributed_world_size(group)
    if world_size == 1:
        return [value]
    gathered: list[object] = [None] * world_size
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def distributed_rank(group: Any = None) -> int:
    """Rank of this process in ``group``; 0 without ``torch.distributed``.

    Parameters
    ----------
    group
        A process group, or ``None`` for the default one.

    Returns
    -------
    int
        The rank.
    """
    return dist.get_rank(group) if _initialized() else 0


def resolve_ddp_gramian(setting: str, mode: str) -> str:
    """Resolve ``jd_ddp_gramian`` for ``jd_mode``: ``"global"`` or ``"local"``.

    Parameters
    ----------
    setting
        ``"auto"``, ``"global"`` or ``"local"``.
    mode
        ``"mtl"``, ``"iwrm"`` or ``"iwmtl"``.

    Returns
    -------
    str
        ``"auto"`` gives ``"global"`` for ``mtl`` and ``"local"`` otherwise.

    Raises
    ------
    ValueError
        For an unknown setting or mode, or ``"global"`` with ``iwrm``/``iwmtl`` (the
        ``B_total × B_total`` Gramian across processes is not implemented).
    """
    if setting not in DDP_GRAMIAN_SETTINGS:
        raise ValueError(
            f"jd_ddp_gramian={setting!r} is not valid: choose one of {', '.join(map(repr, DDP_GRAMIAN_SETTINGS))}."
        )
    if mode not in ("mtl", "iwrm", "iwmtl"):
        raise ValueError(f"jd_mode={mode!r} is not valid: choose one of 'mtl', 'iwrm', 'iwmtl'.")
    if setting == "auto":
        return "global" if mode == "mtl" else "local"
    if setting == "global" and mode != "mtl":
        raise ValueError(
            f"jd_ddp_gramian='global' is only implemented for jd_mode='mtl', not {mode!r}: the Gramian of all "
            "processes' examples would need every layer's per-example factors from every process. Use "
            "jd_ddp_gramian='local' (each process weights its own examples) or 'auto'."
        )
    return setting


# ---------------------------------------------------------------------- accounting
@dataclass
class CommunicationLog:
    """Bytes that this process hands to collectives (its payload), per kind of collective.

    ``payload_bytes`` counts the local tensor of every collective once (what ``all_reduce`` reduces,
    what ``all_gather`` contributes). With a ring algorithm each process sends about
    ``2 (P - 1) / P`` times the payload of an all-reduce and ``P - 1`` times the payload of an
    all-gather: see :meth:`ring_bytes_sent`.
    """

    all_reduce_bytes: int = 0
    all_gather_bytes: int = 0
    collectives: int = 0
    details: dict[str, int] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        """Total payload (all collectives)."""
        return self.all_reduce_bytes + self.all_gather_bytes

    def add(self, kind: str, tensor: Tensor, what: str) -> None:
        """Record one collective of ``kind`` (``"all_reduce"`` or ``"all_gather"``) on ``tensor``.

        Parameters
        ----------
        kind
            ``"all_reduce"`` or ``"all_gather"``.
        tensor
            The local tensor of the collective (its bytes are the payload).
        what
            Label under which the bytes are also counted in ``details``.

        Raises
        ------
        ValueError
            If ``kind`` is unknown.
        """
        size = tensor.numel() * tensor.element_size()
        if kind == "all_reduce":
            self.all_reduce_bytes += size
        elif kind == "all_gather":
            self.all_gather_bytes += size
        else:
            raise ValueError(f"Unknown collective kind {kind!r}: use 'all_reduce' or 'all_gather'.")
        self.collectives += 1
        self.details[what] = self.details.get(what, 0) + size

    def ring_bytes_sent(self, world_size: int) -> float:
        """Bytes each process sends with ring collectives among ``world_size`` processes.

        Parameters
        ----------
        world_size
            Number of processes ``P``.

        Returns
        -------
        float
            ``2 (P - 1) / P`` times the all-reduce payload plus ``P - 1`` times the all-gather payload.

        Raises
        ------
        ValueError
            If ``world_size < 1``.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}.")
        return 2 * (world_size - 1) / world_size * self.all_reduce_bytes + (world_size - 1) * self.all_gather_bytes

    def reset(self) -> None:
        """Forget everything recorded."""
        self.all_reduce_bytes = self.all_gather_bytes = self.collectives = 0
        self.details = {}


def ddp_gradient_bytes(params: Sequence[Tensor]) -> int:
    """Payload of DDP's gradient all-reduce for ``params`` (once per optimizer step).

    Parameters
    ----------
    params
        The model's parameters.

    Returns
    -------
    int
        Bytes of the parameters that require grad.
    """
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad)


class DDPCommunicationTracker:
    """DDP communication hook that all-reduces (mean) like DDP's default and records the payload.

    Attach with ``ddp_model.register_comm_hook(tracker, DDPCommunicationTracker.hook)`` before the
    first backward (DDP accepts one hook per model). ``log`` then holds DDP's bytes, ``buckets``
    the number of buckets reduced and ``backwards`` the number of backward passes that reduced
    something (each bucket of bucket index 0 starts one).

    Parameters
    ----------
    group
        The process group of the all-reduce (``None``: the default one).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.log = CommunicationLog()
        self.buckets = 0
        self.backwards = 0

    @staticmethod
    def hook(state, bucket):  # type: ignore[no-untyped-def]  # annotations set below (DDP checks them)
        """The communication hook: record the bucket's bytes, then all-reduce its mean asynchronously.

        Parameters
        ----------
        state
            The :class:`DDPCommunicationTracker`.
        bucket
            The ``dist.GradBucket`` of gradients to reduce.

        Returns
        -------
        torch.futures.Future
            Completed with the averaged bucket buffer.
        """
        buffer = bucket.buffer()
        state.buckets += 1
        if bucket.index() == 0:
            state.backwards += 1
        state.log.add("all_reduce", buffer, "ddp_gradients")
        buffer.div_(distributed_world_size(state.group))
        future = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()
        return future.then(lambda done: done.value()[0])


# DDP compares the hook's annotations with the real classes, which `from __future__ import
# annotations` would turn into strings.
DDPCommunicationTracker.hook.__annotations__ = {
    "state": DDPCommunicationTracker,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[Tensor],
}


# ---------------------------------------------------------------------- agreement
def all_processes_true(flag: bool, *, group: Any = None, log: CommunicationLog | None = None) -> bool:
    """Whether ``flag`` holds on every process (one 1-byte all-reduce; ``flag`` with one process).

    Use it before a decision that changes which collectives follow (skipping a non-finite step,
    raising), so that no process waits for a collective that the others never start.

    Parameters
    ----------
    flag
        This process's value.
    group
        The process group (``None``: the default one).
    log
        If given, records the 1-byte all-reduce.

    Returns
    -------
    bool
        Whether ``flag`` is true on every process.
    """
    if distributed_world_size(group) == 1:
        return bool(flag)
    tensor = torch.tensor([0 if flag else 1], dtype=torch.uint8, device=_device(group))
    if log is not None:
        log.add("all_reduce", tensor, "agreement")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item()) == 0


def _device(group: Any = None) -> torch.device:
    """The device collectives of ``group`` use (CUDA for NCCL, else CPU)."""
    backend = dist.get_backend(group) if _initialized() else "gloo"
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- the global Jacobian
@dataclass
class _Piece:
    """Where one parameter's Jacobian sits in the reduced blocks."""

    index: int
    shape: torch.Size
    rows: Tensor | None  # indices of the rows sent (dim 1 of the Jacobian), None = all
    block: int = 0
    start: int = 0
    width: int = 0


def _check_same_layout(jacobians: Sequence[Tensor], group: Any, log: CommunicationLog | None) -> None:
    """Raise on every process if the processes' Jacobians do not have the same layout."""
    num_rows = jacobians[0].shape[0]
    total = sum(j.numel() for j in jacobians)
    signature = torch.tensor([num_rows, total, len(jacobians)], dtype=torch.int64)
    both = torch.cat([signature, -signature]).to(_device(group))
    if log is not None:
        log.add("all_reduce", both, "layout_check")
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[:3].tolist(), (-both[3:]).tolist()
    if high != low:
        raise RuntimeError(
            "The processes have Jacobians of different layouts (rows, entries, tensors): between "
            f"{low} and {high}. Every process must compute the same number of task losses w.r.t. the same "
            "parameters; check that the model and jd_task_names are identical on every process."
        )


def _row_masks(
    jacobians: Sequence[Tensor], reached: Sequence[bool], group: Any, log: CommunicationLog | None
) -> tuple[list[Tensor | None], list[bool]]:
    """For each Jacobian ``[m, rows, ...]`` of a parameter with 2+ dimensions: the rows non-zero on
    some process (one byte per row all-reduced with MAX); ``None`` for the others (sent densely).
    Also the union over processes of ``reached`` (one byte per parameter, in the same collective)."""
    sparse = [j.dim() >= 3 for j in jacobians]
    local = [
        j.reshape(j.shape[0], j.shape[1], -1).ne(0).any(dim=2).any(dim=0)
        for j, is_sparse in zip(jacobians, sparse)
        if is_sparse
    ]
    flags = torch.tensor([bool(r) for r in reached], dtype=torch.bool, device=jacobians[0].device)
    mask = torch.cat([*local, flags]).to(torch.uint8).to(_device(group))
    if log is not None:
        log.add("all_reduce", mask, "row_masks")
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
    union = [bool(v) for v in mask[mask.numel() - len(reached) :].tolist()]
    result: list[Tensor | None] = []
    offset = 0
    for j, is_sparse in zip(jacobians, sparse):
        if not is_sparse:
            result.append(None)
            continue
        rows = mask[offset : offset + j.shape[1]].to(j.device).bool()
        offset += j.shape[1]
        result.append(None if bool(rows.all()) else torch.nonzero(rows).flatten())
    return result, union


def _compact(jacobian: Tensor, rows: Tensor | None) -> Tensor:
    """``[m, k]``: the sent entries of one Jacobian (selected rows only)."""
    if rows is not None:
        jacobian = jacobian.index_select(1, rows)
    return jacobian.reshape(jacobian.shape[0], -1)


class ReducedJacobian:
    """The Jacobian averaged over processes, held as ``[m, k]`` blocks (rows of zeros dropped).

    Built by :func:`all_reduce_jacobians_mean`. :meth:`gramian` and :meth:`weighted_sums` work on
    the blocks; :meth:`jacobians` unpacks them into one ``[m, *param.shape]`` tensor per parameter.

    Parameters
    ----------
    blocks
        The ``[m, k]`` blocks, averaged over the processes.
    pieces
        Where each parameter's entries lie in the blocks.
    num_rows
        Number of rows ``m``.
    reached
        ``reached[i]``: whether the losses depend on parameter ``i`` on some process (default: all).
    """

    def __init__(
        self, blocks: list[Tensor], pieces: list[_Piece], num_rows: int, reached: list[bool] | None = None
    ) -> None:
        self.blocks = blocks
        self.pieces = sorted(pieces, key=lambda piece: piece.index)
        self.num_rows = num_rows
        self.reached = reached if reached is not None else [True] * len(pieces)

    def gramian(self, indices: Sequence[int] | None = None) -> Tensor:
        """``J Jᵀ`` (``[m, m]``), float64 if a block is float64, else float32.

        Parameters
        ----------
        indices
            Restrict ``J`` to these parameters (positions in the list given to
            :func:`all_reduce_jacobians_mean`); default all.

        Returns
        -------
        Tensor
            The symmetric ``[m, m]`` Gramian.
        """
        dtype = torch.float64 if any(b.dtype == torch.float64 for b in self.blocks) else torch.float32
        device = self.blocks[0].device if self.blocks else torch.device("cpu")
        gramian = torch.zeros(self.num_rows, self.num_rows, dtype=dtype, device=device)
        if indices is None:
            for block in self.blocks:
                block = block.to(dtype)
                gramian += block @ block.T
        else:
            for index in sorted(set(indices)):
                piece = self.pieces[index]
                values = self.blocks[piece.block][:, piece.start : piece.start + piece.width].to(dtype)
                gramian += values @ values.T
        return (gramian + gramian.T) / 2

    def weighted_sums(self, weights: Tensor) -> list[Tensor]:
        """``Σ_k w_k J_k`` for every parameter (its shape): the update ``wᵀ J`` split by parameter.

        Parameters
        ----------
        weights
            The ``m`` weights (any shape with ``m`` entries).

        Returns
        -------
        list of Tensor
            One update per parameter, of the parameter's shape, in the order they were given.

        Raises
        ------
        ValueError
            If ``weights`` does not have ``m`` entries.
        """
        weights = weights.reshape(-1)
        if weights.numel() != self.num_rows:
            raise ValueError(f"weights must have {self.num_rows} entries (one per row of J), got {weights.numel()}.")
        sums = [weights.to(block.dtype).to(block.device) @ block for block in self.blocks]
        result: list[Tensor] = []
        for piece in self.pieces:
            values = sums[piece.block][piece.start : piece.start + piece.width]
            if piece.rows is None:
                result.append(values.reshape(piece.shape))
            else:
                full = values.new_zeros(piece.shape)
                full[piece.rows] = values.reshape(piece.rows.numel(), *piece.shape[1:])
                result.append(full)
        return result

    def add_weighted_to_grads(self, params: Sequence[Tensor], weights: Tensor, factor: float = 1.0) -> None:
        """Add ``factor · Σ_k w_k J_k`` to the ``.grad`` of every reached parameter (no backward, no DDP hook).

        Every process holds the same blocks and weights, so every process writes the same gradient:
        the update of one process on the global batch. Parameters reached on no process keep their
        ``.grad`` (``None`` stays ``None``), as after an ordinary backward.

        Parameters
        ----------
        params
            The parameters of the Jacobian, in the order given to :func:`all_reduce_jacobians_mean`.
        weights
            The ``m`` weights.
        factor
            Factor of the update (gradient accumulation, loss scale).

        Raises
        ------
        ValueError
            If ``params`` or ``weights`` do not match the Jacobian.
        """
        if len(params) != len(self.pieces):
            raise ValueError(f"Expected {len(self.pieces)} parameters (those of the Jacobian), got {len(params)}.")
        for param, update, reached in zip(params, self.weighted_sums(weights), self.reached):
            if not reached:
                continue
            update = (update * factor).to(param.dtype).to(param.device)
            param.grad = update if param.grad is None else param.grad + update

    def jacobians(self) -> list[Tensor]:
        """One ``[m, *shape]`` Jacobian per parameter, in the order they were given.

        Returns
        -------
        list of Tensor
            The Jacobians, of the parameters' shapes (the zero rows that were not sent are zeros again).
        """
        result: list[Tensor] = [torch.empty(0)] * len(self.pieces)
        for piece in self.pieces:
            values = self.blocks[piece.block][:, piece.start : piece.start + piece.width]
            if piece.rows is None:
                result[piece.index] = values.reshape(self.num_rows, *piece.shape)
            else:
                full = values.new_zeros(self.num_rows, *piece.shape)
                inner = piece.shape[1:]
                full[:, piece.rows] = values.reshape(self.num_rows, piece.rows.numel(), *inner)
                result[piece.index] = full
        return result


def _plan_blocks(
    compact: list[Tensor], rows: list[Tensor | None], shapes: list[torch.Size], bucket_bytes: int
) -> Iterator[tuple[list[_Piece], list[Tensor]]]:
    """Group the compact Jacobians into blocks of one dtype and at most ``bucket_bytes`` each."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, values in enumerate(compact):
        by_dtype.setdefault(values.dtype, []).append(index)
    for indices in by_dtype.values():
        pieces: list[_Piece] = []
        parts: list[Tensor] = []
        size = 0
        for index in indices:
            values = compact[index]
            nbytes = values.numel() * values.element_size()
            if parts and size + nbytes > bucket_bytes:
                yield pieces, parts
                pieces, parts, size = [], [], 0
            pieces.append(_Piece(index, shapes[index], rows[index], width=values.shape[1]))
            parts.append(values)
            size += nbytes
        if parts:
            yield pieces, parts


def all_reduce_jacobians_mean(
    jacobians: Sequence[Tensor],
    *,
    group: Any = None,
    log: CommunicationLog | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    reached: Sequence[bool] | None = None,
) -> ReducedJacobian:
    """Average per-parameter Jacobians over the processes, sending only rows that are non-zero somewhere.

    Parameters
    ----------
    jacobians
        This process's Jacobians, one per parameter, each ``[m, *param.shape]`` with the same ``m``
        (as returned by :func:`hf_jd.autojac.jac`). Every process passes the same layout.
    group
        Process group (default: the default group).
    log
        Records the bytes of every collective.
    bucket_bytes
        Largest block all-reduced at once (one collective per block).
    reached
        Whether the local losses depend on each parameter (default: all); the result holds the
        union over processes.

    Returns
    -------
    ReducedJacobian
        The mean ``(1/P) Σ_p J_p``; with one process, ``J`` itself (no communication).

    Raises
    ------
    ValueError
        For an empty list, tensors with different numbers of rows or a non-positive ``bucket_bytes``.
    RuntimeError
        If the processes' layouts differ (raised on every process).
    """
    if not jacobians:
        raise ValueError("jacobians is empty: pass one [m, *param.shape] Jacobian per parameter.")
    if not all(isinstance(j, Tensor) for j in jacobians):
        raise TypeError("jacobians must be torch.Tensor objects of shape [m, *param.shape].")
    num_rows = jacobians[0].shape[0] if jacobians[0].dim() > 0 else -1
    if num_rows < 1 or any(j.dim() < 1 or j.shape[0] != num_rows for j in jacobians):
        raise ValueError(
            "Every Jacobian must have the same number m >= 1 of rows (dim 0), got shapes "
            f"{[tuple(j.shape) for j in jacobians]}."
        )
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}.")
    reached = [True] * len(jacobians) if reached is None else [bool(r) for r in reached]
    if len(reached) != len(jacobians):
        raise ValueError(f"reached has {len(reached)} entries for {len(jacobians)} Jacobians: give one per Jacobian.")
    world = distributed_world_size(group)
    if world > 1:
        _check_same_layout(jacobians, group, log)
        rows, reached = _row_masks(jacobians, reached, group, log)
    else:
        rows = [None] * len(jacobians)
    shapes = [j.shape[1:] for j in jacobians]
    compact = [_compact(j, r) for j, r in zip(jacobians, rows)]
    blocks: list[Tensor] = []
    all_pieces: list[_Piece] = []
    for pieces, parts in _plan_blocks(compact, rows, shapes, bucket_bytes):
        block = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()
        start = 0
        for piece in pieces:
            piece.block, piece.start = len(blocks), start
            start += piece.width
        if world > 1:
            device = _device(group)
            sent = block.to(device)
            if log is not None:
                log.add("all_reduce", sent, "jacobian")
            dist.all_reduce(sent, group=group)
            block = sent.div_(world).to(block.device)
        blocks.append(block)
        all_pieces.extend(pieces)
    return ReducedJacobian(blocks, all_pieces, num_rows, reached)


def _check_task_losses(losses: Any, params: Sequence[Tensor]) -> None:
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"losses must be a tensor of shape [m] (one loss per task), got {shape}.")
    if not losses.requires_grad:
        raise ValueError("losses do not require grad: compute them from the model's outputs in grad mode.")
    if not params:
        raise ValueError("params is empty: pass the parameters the Jacobian covers.")


def global_mtl_jacobian(
    losses: Tensor,
    params: Sequence[nn.Parameter],
    *,
    group: Any = None,
    log: CommunicationLog | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    retain_graph: bool = False,
) -> ReducedJacobian:
    """Jacobian of the task losses averaged over all processes, for a step without DDP's all-reduce.

    The cheaper exact scheme: every process computes its local task Jacobian ``J_p`` w.r.t.
    **all** its trainable ``params`` and all-reduces it (row-sparse). Every process then holds the
    same ``J = (1/P) Σ_p J_p``: :meth:`ReducedJacobian.gramian` (restricted to the covered
    parameters) gives the weights and :meth:`ReducedJacobian.add_weighted_to_grads` writes the
    update ``wᵀ J`` of every parameter, identical on every process, so DDP's gradient all-reduce
    is not needed: run the forward pass under ``ddp_model.no_sync()`` (or
    ``accelerator.no_sync(model)``) so that DDP does not wait for a backward. Per weight
    computation this sends ``m`` times the (row-sparse) parameter size instead of that plus DDP's
    all-reduce of the gradients.

    Parameters
    ----------
    losses
        Shape ``[m]`` (this process's task losses), requiring grad.
    params
        All trainable parameters, the same and in the same order on every process.
    group, log, bucket_bytes
        See :func:`all_reduce_jacobians_mean`.
    retain_graph
        Keep the autograd graph of ``losses`` (not needed when the update is written directly).

    Returns
    -------
    ReducedJacobian
        The same on every process; ``reached`` marks the parameters the losses depend on somewhere.
    """
    from ..autojac import jac
    from ..autojac._utils import find_leaves

    params = list(params)
    _check_task_losses(losses, params)
    leaves = {id(leaf) for leaf in find_leaves([losses])}
    reached = [id(p) in leaves for p in params]
    jacobians = jac(losses, params, retain_graph=retain_graph)
    return all_reduce_jacobians_mean(jacobians, group=group, log=log, bucket_bytes=bucket_bytes, reached=reached)


def global_mtl_gramian(
    losses: Tensor,
    params: Sequence[nn.Parameter],
    *,
    group: Any = None,
    log: CommunicationLog | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Tensor:
    """Gramian ``J Jᵀ`` of the Jacobian of the task losses averaged over all processes.

    Every process calls it with its local task losses ``[m]`` (mean over its local batch); the
    result is the same on every process and equals, with equal local batch sizes, the Gramian a
    single process computes on the concatenated global batch. The autograd graph of ``losses`` is
    kept for the weighted backward that follows. No parameter ``.grad`` is touched and DDP's
    gradient hooks do not fire (:func:`torch.autograd.grad` does not run the gradient
    accumulators).

    Parameters
    ----------
    losses
        Shape ``[m]``, requiring grad.
    params
        The parameters the Jacobian covers (the same, in the same order, on every process).
    group, log, bucket_bytes
        See :func:`all_reduce_jacobians_mean`.

    Returns
    -------
    Tensor
        ``[m, m]``, float32 (float64 for float64 parameters).
    """
    from ..autojac import jac

    params = list(params)
    _check_task_losses(losses, params)
    jacobians = jac(losses, params, retain_graph=True)
    return all_reduce_jacobians_mean(jacobians, group=group, log=log, bucket_bytes=bucket_bytes).gramian()
