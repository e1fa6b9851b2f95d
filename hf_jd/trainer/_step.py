"""One Jacobian-descent micro-batch step, independent of the Trainer's bookkeeping.

Two engines compute the same update (for Gramian-based aggregators):

- ``autogram``: the :class:`hf_jd.autogram.Engine` hooks capture what the forward pass needs, the
  Gramian ``G = J Jᵀ`` of the losses' Jacobian is computed without forming ``J``, the weighting maps
  it to weights ``w`` (float32, detached) and one ordinary backward of ``Σ w_i L_i`` writes the
  update ``wᵀ J`` into ``.grad``. That backward goes through the caller's ``backward`` function
  (``accelerator.backward``), so loss scaling, DDP synchronisation and gradient accumulation work as
  for a normal step. With ``single_backward`` the engine writes ``wᵀ J`` itself from the factors
  it captured (no second pass through the network), scaled by ``grad_factor`` (the factor
  ``accelerator.backward`` would apply) and delivered through autograd so that DDP's gradient hooks
  fire. On the first step, :meth:`hf_jd.autogram.Engine.check_gramian` verifies the Gramian with
  one extra backward.
- ``autojac``: :func:`hf_jd.autojac.backward` stores ``J`` in ``.jac`` and
  :func:`hf_jd.autojac.jac_to_grad` aggregates it into ``.grad`` (any aggregator).

Each micro-batch is weighted on its own; with gradient accumulation the updates of the
micro-batches add up (each scaled by ``scale``, normally ``1 / gradient_accumulation_steps``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..aggregation._base import update_is_weighted_rows
from ..autogram.shared_term import SharedTerm
from ._distributed import CommunicationLog, all_processes_true, global_mtl_jacobian
from ._stats import StatsAccumulator, gramian_stats, loss_stats, weight_stats

__all__ = ["JDStep", "NonFiniteLossError", "select_modules", "StepResult"]

BackwardFn = Callable[..., None]


@contextlib.contextmanager
def _autojac_hint(mode: str, global_step: int) -> Iterator[None]:
    """Re-raise the autogram engine's "cannot follow this model" errors with the trainer option that avoids them.

    The engine's own advice (``Engine(..., batch_dim=None)``, "the autojac engine") is not phrased in
    terms of the trainer's arguments; other errors pass through unchanged.
    """
    try:
        yield
    except (ValueError, RuntimeError) as error:
        message = str(error)
        if "batch_dim" not in message and "does not account for all uses" not in message:
            raise
        raise type(error)(
            f"{message}\nWith JDTrainer (jd_mode={mode!r}, step {global_step}): the autogram engine cannot follow "
            "this model. Set jd_engine='autojac' (explicit Jacobian: the same update, more memory)"
            + (", or use jd_mode='mtl' with task losses." if mode != "mtl" else ".")
        ) from error


@contextlib.contextmanager
def _rows_hint(mode: str) -> Iterator[None]:
    """Re-raise an aggregator's complaint about the number of rows (``constant`` weights or a
    preference vector of fixed length, ``krum``) with the reason it can change between steps in the
    per-example modes: the last batch of an epoch may be smaller."""
    try:
        yield
    except ValueError as error:
        if mode == "mtl" or "row" not in str(error):
            raise
        raise ValueError(
            f"{error}\nWith JDTrainer (jd_mode={mode!r}) the rows are the examples of the micro-batch (times the "
            "tasks): choose a per_device_train_batch_size the aggregator accepts (or its settings, e.g. Krum's "
            "n_byzantine, for that size), and since the last batch of an epoch may be smaller, set "
            "dataloader_drop_last=True."
        ) from error


class NonFiniteLossError(RuntimeError):
    """A loss, the Jacobian or the Gramian is inf or nan and ``jd_nonfinite="raise"``."""


@dataclass
class StepResult:
    """What one micro-batch step produced (all detached)."""

    losses: Tensor
    outputs: Any
    weights: Tensor | None
    skipped: bool


def select_modules(model: nn.Module, patterns: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """Return the submodules named by ``patterns`` (names or fnmatch patterns), outermost only.

    ``None`` selects the whole model (named ``""``). A module whose ancestor is already selected is
    dropped, so that no parameter is covered twice.

    Parameters
    ----------
    model
        The model.
    patterns
        ``jd_modules``: module names or fnmatch patterns, or ``None``.

    Returns
    -------
    list of (str, nn.Module)
        The selected modules with their names.

    Raises
    ------
    ValueError
        If a pattern matches no submodule (the message lists some valid names).
    """
    if patterns is None:
        return [("", model)]
    named = list(model.named_modules())
    selected: list[tuple[str, nn.Module]] = []
    for pattern in patterns:
        matches = [(name, module) for name, module in named if name and fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            examples = [name for name, _ in named if name and name.count(".") <= 1][:12]
            raise ValueError(
                f"jd_modules pattern {pattern!r} matches no submodule of {type(model).__name__}. Names look like: "
                f"{', '.join(examples)} (fnmatch patterns such as 'bert.encoder.*' are allowed)."
            )
        selected.extend(matches)
    names = sorted({name for name, _ in selected})
    outermost = {name for name in names if not any(name.startswith(other + ".") for other in names if other != name)}
    result: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    for name, module in selected:
        if name in outermost and name not in seen:
            seen.add(name)
            result.append((name, module))
    return result


def _trainable(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


@contextlib.contextmanager
def _engine_state(engine: Any, enabled: bool) -> Iterator[None]:
    if engine is None:
        yield
        return
    previous = engine.enabled
    engine.enabled = enabled
    try:
        yield
    finally:
        engine.enabled = previous


class JDStep:
    """State and logic of the Jacobian-descent step (aggregator, engine, cached weights, stats).

    Parameters
    ----------
    aggregator
        The aggregator (its ``.weighting`` is used by the autogram engine).
    mode
        ``"mtl"``, ``"iwrm"`` or ``"iwmtl"``.
    engine
        ``"autogram"`` or ``"autojac"``.
    task_names
        Task names in row order, for messages and metrics.
    update_weights_every
        Recompute the weights every k optimizer steps, reuse them in between.
    nonfinite
        ``"raise"`` or ``"skip"``.
    log_stats
        Whether to accumulate weight / loss / Gramian statistics.
    module_patterns
        ``jd_modules``: names or fnmatch patterns of the submodules the Jacobian covers.
    ddp_gramian
        With several processes: ``"global"`` (``mtl``: the task Jacobians are all-reduced, every
        process computes the weights and update of one process on the global batch, see
        :func:`hf_jd.trainer._distributed.global_mtl_jacobian`) or ``"local"`` (each process its own
        Gramian and weights; DDP averages the updates).
    single_backward
        autogram: build ``Engine(..., single_backward=True)`` and write the weighted gradient from the
        captured factors instead of a second backward (faster, holds the layers' output gradients).
    check_gramian
        autogram: verify the Gramian on the first step (:meth:`hf_jd.autogram.Engine.check_gramian`).
    check_rtol
        Relative tolerance of that check (looser under bf16/fp16 autocast).

    Raises
    ------
    ValueError
        If ``engine="autogram"`` with an aggregator that is not Gramian-based.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        mode: str,
        engine: str,
        task_names: Sequence[str] | None,
        update_weights_every: int = 1,
        nonfinite: str = "raise",
        log_stats: bool = True,
        module_patterns: Sequence[str] | None = None,
        ddp_gramian: str = "local",
        single_backward: bool = False,
        check_gramian: bool = True,
        check_rtol: float = 1e-3,
    ) -> None:
        if engine == "autogram" and not isinstance(aggregator, GramianWeightedAggregator):
            raise ValueError(
                f"The autogram engine needs a Gramian-based aggregator, got {type(aggregator).__name__}."
            )
        if engine == "autogram" and not update_is_weighted_rows(aggregator):
            raise ValueError(
                f"{type(aggregator).__name__} overrides aggregate() (or __call__), so its update is not the "
                "weighted sum of the rows that the autogram engine computes from the weighting: use "
                "jd_engine='autojac', or move the change into a Weighting."
            )
        self.aggregator = aggregator
        self.mode = mode
        self.engine_kind = engine
        self.task_names = list(task_names) if task_names else None
        self.update_weights_every = update_weights_every
        self.nonfinite = nonfinite
        self.log_stats = log_stats
        self.module_patterns = list(module_patterns) if module_patterns else None
        self.ddp_gramian = ddp_gramian
        self.single_backward = bool(single_backward)
        self.check_gramian = bool(check_gramian)
        self.check_rtol = float(check_rtol)
        self._gramian_checked = False
        self.communication = CommunicationLog()  # bytes of JD's own collectives (DDP's excluded)
        self.engine: Any = None
        self.cached_weights: Tensor | None = None
        self.skipped_steps = 0
        self.stats = StatsAccumulator()
        self._model: nn.Module | None = None
        self._covered: list[nn.Parameter] = []
        self._covered_ids: set[int] = set()
        self._others: list[nn.Parameter] = []
        self._label_counts: Sequence[int] | None = None
        self._warned_zero_rows = False

    # ------------------------------------------------------------------ set-up
    @property
    def weighting(self) -> Any:
        """The weighting of a Gramian-based aggregator whose weights define its update, else ``None``."""
        return self.aggregator.weighting if update_is_weighted_rows(self.aggregator) else None

    def setup(self, model: nn.Module) -> None:
        """Select the covered parameters (and build the autogram engine) for ``model``, once.

        Parameters
        ----------
        model
            The unwrapped model; calling again with the same model does nothing.

        Raises
        ------
        ValueError
            If a ``jd_modules`` pattern matches nothing, the selected modules have no trainable parameter,
            or parameters are left outside the Jacobian with an aggregator that has no weights.
        """
        if self._model is model:
            return
        self.close()
        modules = [module for _, module in select_modules(model, self.module_patterns)]
        if self.engine_kind == "autogram":
            from ..autogram import Engine

            self.engine = Engine(
                *modules, batch_dim=None if self.mode == "mtl" else 0, single_backward=self.single_backward
            )
            self.engine.enabled = False  # only enabled inside a step that needs the Gramian
            covered = list(self.engine.parameters())
        else:
            covered = _trainable(modules)
        if not covered:
            raise ValueError(
                "The Jacobian covers no trainable parameter: every parameter of the selected modules "
                f"({self.module_patterns or 'the whole model'}) has requires_grad=False. Check jd_modules."
            )
        self._covered = covered
        self._covered_ids = {id(p) for p in covered}
        self._others = [p for p in _trainable([model]) if id(p) not in self._covered_ids]
        if self._others and self.weighting is None:
            raise ValueError(
                f"jd_modules leaves {len(self._others)} trainable parameter tensor(s) outside the Jacobian, and "
                f"aggregator {type(self.aggregator).__name__} is not Gramian-based (or overrides aggregate()), so "
                "there are no weights to give them a weighted gradient. Cover the whole model (unset jd_modules), "
                "freeze the other parameters, or use a Gramian-based aggregator."
            )
        self._model = model

    def close(self) -> None:
        """Remove the engine's hooks (a later :meth:`setup` builds a new engine)."""
        self.detach()
        self.engine = None

    def detach(self) -> None:
        """Take the engine's hooks off the model at the end of training; the engine stays readable (its covered
        parameters, its mode) and a later :meth:`setup` builds a new one."""
        if self.engine is not None:
            self.engine.remove()
        self._model = None

    @contextlib.contextmanager
    def engine_disabled(self) -> Iterator[None]:
        """Context in which the autogram hooks capture nothing (evaluation, prediction).

        Yields
        ------
        None
            Control to the block; the engine's previous state is restored after it.
        """
        with _engine_state(self.engine, False):
            yield

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume with the same weights as an uninterrupted run.

        Returns
        -------
        dict[str, Any]
            The aggregator's state, the cached weights (on CPU) and the number of skipped steps.
        """
        return {
            "aggregator": self.aggregator.state_dict(),
            "cached_weights": None if self.cached_weights is None else self.cached_weights.cpu(),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Parameters
        ----------
        state
            The state; missing entries take their initial values.
        """
        self.aggregator.load_state_dict(state.get("aggregator", {}))
        cached = state.get("cached_weights")
        self.cached_weights = None if cached is None else cached.clone()
        self.skipped_steps = int(state.get("skipped_steps", 0))

    # ------------------------------------------------------------------ the step
    def needs_weights(self, global_step: int) -> bool:
        """Whether the optimizer step ``global_step`` recomputes the weights.

        Parameters
        ----------
        global_step
            Index of the optimizer step.

        Returns
        -------
        bool
            ``True`` when no weights are cached or ``global_step`` is a multiple of ``update_weights_every``.
        """
        return self.cached_weights is None or global_step % self.update_weights_every == 0

    def run(
        self,
        forward: Callable[[], tuple[Tensor, Any]],
        backward: BackwardFn,
        *,
        scale: float,
        global_step: int,
        grad_factor: float | None = None,
        world_size: int = 1,
        label_counts: Sequence[int] | None = None,
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        shared_term: Callable[[], SharedTerm | None] | None = None,
    ) -> StepResult:
        """Forward one micro-batch, then write its JD update (times ``scale``) into ``.grad``.

        Parameters
        ----------
        forward
            Runs the model and returns ``(losses, outputs)`` with the mode's shape.
        backward
            ``backward(loss, **kwargs)``, e.g. ``accelerator.backward``; used for every weighted
            backward so that loss scaling and gradient synchronisation apply.
        scale
            Factor of this micro-batch's contribution (``1 / gradient_accumulation_steps``).
        global_step
            The optimizer step being accumulated (decides recomputation and names errors).
        grad_factor
            Factor applied to the update that ``jac_to_grad`` writes directly (autojac): ``scale``
            times the loss-scaler's current scale under fp16. Defaults to ``scale``.
        world_size
            Number of processes; a skipped micro-batch still runs a zero backward when > 1 so that
            gradient synchronisation does not wait for it.
        label_counts
            ``iwmtl``: for each task, the number of examples of the batch that carry its label; the
            logged ``loss_<task>`` is then the sum of the task's column over that count (examples
            without the label have a zero loss placeholder).
        no_sync
            Context in which the forward pass does not prepare DDP's gradient all-reduce
            (``accelerator.no_sync(model)``); used by the global MTL step, which writes the same
            update on every process and needs no all-reduce of the gradients.
        shared_term
            Called after ``forward``: the split of ``iwrm`` losses into the examples' own losses and a term shared by
            them, or ``None``. The autogram engine then computes the Gramian from the split's per-example rows
            (:mod:`hf_jd.autogram.shared_term`) instead of the losses, which mix the examples.

        Returns
        -------
        StepResult
            The detached losses, the outputs, the weights used (``None`` for a skipped micro-batch or a
            non-Gramian aggregator) and whether the micro-batch was skipped.

        Raises
        ------
        NonFiniteLossError
            If a loss, the Gramian or the Jacobian is not finite and ``nonfinite="raise"``.
        RuntimeError
            If the losses depend on no covered parameter, or the model cannot be differentiated as needed
            (e.g. reentrant checkpointing with autojac).
        """
        self._label_counts = label_counts
        recompute = self.needs_weights(global_step)
        global_step_direct = recompute and self.ddp_gramian == "global" and world_size > 1
        sync_context = no_sync() if global_step_direct and no_sync is not None else contextlib.nullcontext()
        # The engine's hooks may reject the model during the forward pass (BatchNorm in training mode):
        # that error also names the trainer option that avoids it.
        hint = _autojac_hint(self.mode, global_step) if self.engine is not None else contextlib.nullcontext()
        with _engine_state(self.engine, recompute and not global_step_direct), sync_context, hint:
            losses, outputs = forward()
        split = shared_term() if shared_term is not None and self.mode == "iwrm" else None
        if not recompute and self.cached_weights is not None:
            weights = self._reusable_weights(losses)
            if self._skip_if_nonfinite(losses, global_step, backward, world_size):
                return StepResult(losses.detach(), outputs, None, True)
            backward((weights.to(losses.dtype) * losses).sum() * scale)
            self._record(losses, None, None)
            return StepResult(losses.detach(), outputs, weights, False)
        if self._skip_if_nonfinite(losses, global_step, backward, world_size):
            return StepResult(losses.detach(), outputs, None, True)
        if global_step_direct:
            return self._global(losses, outputs, backward, scale if grad_factor is None else grad_factor, global_step)
        if self.engine_kind == "autogram":
            factor = scale if grad_factor is None else grad_factor
            return self._autogram(losses, outputs, backward, scale, factor, global_step, world_size, split)
        return self._autojac(losses, outputs, backward, scale, grad_factor, global_step, world_size)

    def _autogram(
        self,
        losses: Tensor,
        outputs: Any,
        backward: BackwardFn,
        scale: float,
        grad_factor: float,
        global_step: int,
        world_size: int,
        split: SharedTerm | None = None,
    ) -> StepResult:
        """Gramian, weights, then the weighted gradient: ``backward((w * L).sum() * scale)`` (through
        ``accelerator.backward``), or with ``single_backward`` the engine's own ``wᵀ J`` written from
        the captured factors, times ``grad_factor`` (what ``accelerator.backward`` would have
        multiplied the loss by: ``scale``, accelerate's accumulation and the fp16 loss scale). With ``split``, the
        Gramian comes from its per-example rows."""
        check = self.check_gramian and not self._gramian_checked
        with _autojac_hint(self.mode, global_step):
            if split is None:
                gramian = self.engine.compute_gramian(losses, retain_graph=True if check else None)
            else:
                rows = split.rows()
                gramian = split.gramian(self.engine.compute_gramian(rows, retain_graph=True if check else None))
        if not self._all_finite(bool(torch.isfinite(gramian).all()), world_size):
            if self._handle_nonfinite("the Gramian of the losses' Jacobian", global_step, backward, world_size):
                return StepResult(losses.detach(), outputs, None, True)
        if check:
            # First JD step: verify ‖Jᵀw‖² = wᵀGw with one extra backward, so that a parameter used where
            # the engine cannot see it (outside its module's forward) raises instead of training wrongly. A batch
            # whose per-example gradients cancel to rounding cannot tell: checked again on the next step.
            with _autojac_hint(self.mode, global_step):
                self._gramian_checked = self.engine.check_gramian(losses, gramian, rtol=self.check_rtol)
        if gramian.dtype != torch.float64:
            gramian = gramian.float()
        with _rows_hint(self.mode):
            weights = self.weighting(gramian).detach()
        weights = weights.reshape(losses.shape)
        self.cached_weights = weights
        if not self._warned_zero_rows and self.mode != "mtl":
            flat_weights = weights.reshape(-1).to(device=gramian.device, dtype=gramian.dtype)
            self._warn_if_zero_rows_cancel(gramian.diagonal(), flat_weights @ gramian @ flat_weights, global_step)
        if self.single_backward:
            row_weights = weights if split is None else split.row_weights(weights)
            self.engine.backward(row_weights * grad_factor)
        else:
            backward((weights.to(losses.dtype) * losses).sum() * scale)
        self._record(losses, weights, gramian)
        return StepResult(losses.detach(), outputs, weights, False)

    def _global(
        self, losses: Tensor, outputs: Any, backward: BackwardFn, factor: float, global_step: int
    ) -> StepResult:
        """``mtl`` over several processes: all-reduce the task Jacobians, write ``wᵀ J`` (no DDP all-reduce)."""
        if self.weighting is None:
            raise RuntimeError("jd_ddp_gramian='global' needs a Gramian-based aggregator.")
        params = [*self._covered, *self._others]
        reduced = global_mtl_jacobian(losses, params, log=self.communication)  # the same on every process
        gramian = reduced.gramian(range(len(self._covered)))
        if not bool(torch.isfinite(gramian).all()):  # the same decision on every process
            if self._handle_nonfinite("the Gramian of the losses' Jacobian", global_step, backward, 1):
                return StepResult(losses.detach(), outputs, None, True)
        if gramian.dtype != torch.float64:
            gramian = gramian.float()
        weights = self.weighting(gramian).detach().reshape(losses.shape)
        self.cached_weights = weights
        reduced.add_weighted_to_grads(params, weights, factor)
        self._record(losses, weights, gramian)
        return StepResult(losses.detach(), outputs, weights, False)

    def _autojac(
        self,
        losses: Tensor,
        outputs: Any,
        backward: BackwardFn,
        scale: float,
        grad_factor: float | None,
        global_step: int,
        world_size: int,
    ) -> StepResult:
        from ..autojac import backward as jac_backward
        from ..autojac import jac_to_grad
        from ..autojac._utils import find_leaves

        flat = losses.reshape(-1)
        reached = {id(leaf) for leaf in find_leaves([flat])}
        params = [p for p in self._covered if id(p) in reached]
        others = [p for p in self._others if id(p) in reached]
        if not params:
            raise RuntimeError(
                "The losses do not depend on any parameter covered by the Jacobian (jd_modules: "
                f"{self.module_patterns or 'the whole model'})."
            )
        try:
            jac_backward(flat, inputs=params, retain_graph=bool(others))
        except RuntimeError as error:
            if "use_reentrant=True" not in str(error):
                raise
            raise RuntimeError(
                f"{error}\nWith JDTrainer: the autojac engine computes the Jacobian with torch.autograd.grad, which "
                "reentrant checkpointing rejects. Enable checkpointing non-reentrant: activation_checkpointing_kwargs="
                "{'use_reentrant': False} (gradient_checkpointing_kwargs before transformers 5; non-reentrant is "
                "transformers' default), or model.activation_checkpointing_enable(activation_checkpointing_kwargs="
                "{'use_reentrant': False})."
            ) from error
        jacobians = [p.jac for p in params]  # type: ignore[attr-defined]
        if not all(bool(torch.isfinite(j).all()) for j in jacobians):
            for p in params:
                del p.jac  # type: ignore[attr-defined]
            if self._handle_nonfinite("the Jacobian of the losses", global_step, backward, world_size):
                return StepResult(losses.detach(), outputs, None, True)
        gramian = None
        if self.log_stats:
            gramian = sum(j.reshape(j.shape[0], -1).float() @ j.reshape(j.shape[0], -1).float().T for j in jacobians)
        previous = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with _rows_hint(self.mode):
                weights = jac_to_grad(params, self.aggregator)
        except BaseException:
            # Leave the parameters as they were (a later step must not find this step's .jac).
            for p, old in zip(params, previous):
                p.grad = old
                if hasattr(p, "jac"):
                    del p.jac
            raise
        factor = scale if grad_factor is None else grad_factor
        if not self._warned_zero_rows and self.mode != "mtl":
            if gramian is not None:
                rows = gramian.diagonal()
            else:
                rows = sum(j.reshape(j.shape[0], -1).float().pow(2).sum(dim=1) for j in jacobians)
            update = sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None)
            self._warn_if_zero_rows_cancel(rows, torch.as_tensor(update, device=rows.device), global_step)
        for p, old in zip(params, previous):
            if p.grad is not None:
                update = p.grad * factor
                p.grad = update if old is None else old + update
            else:
                p.grad = old
        if weights is not None:
            weights = weights.detach().reshape(losses.shape)
            self.cached_weights = weights
            if others:
                backward((weights.to(losses.dtype) * losses).sum() * scale, inputs=others)
        self._record(losses, weights, gramian)
        return StepResult(losses.detach(), outputs, weights, False)

    # ------------------------------------------------------------------ helpers
    def _reusable_weights(self, losses: Tensor) -> Tensor:
        """The cached weights, adapted when a per-example batch has another size.

        With ``iwrm``/``iwmtl`` the weights belong to positions in the batch; when a batch has a
        different size (e.g. the last, smaller batch of an epoch) each example gets the mean cached
        weight of its task instead.
        """
        cached = self.cached_weights
        assert cached is not None
        cached = cached.to(losses.device)
        if cached.shape == losses.shape:
            return cached
        if self.mode == "mtl":
            raise RuntimeError(
                f"The number of task losses changed from {cached.shape[0]} to {losses.shape[0]} between steps."
            )
        mean = cached.mean(dim=0, keepdim=True)
        return mean.expand(losses.shape)

    def _skip_if_nonfinite(self, losses: Tensor, global_step: int, backward: BackwardFn, world_size: int) -> bool:
        finite = torch.isfinite(losses.detach())
        if self._all_finite(bool(finite.all()), world_size):
            return False
        what = self._describe_nonfinite(finite) if not bool(finite.all()) else "the losses of another process"
        return self._handle_nonfinite(what, global_step, backward, world_size)

    def _all_finite(self, finite: bool, world_size: int) -> bool:
        """``finite`` on every process (1-byte all-reduce): all skip or raise together, none waits in a collective."""
        return all_processes_true(finite, log=self.communication) if world_size > 1 else finite

    def _describe_nonfinite(self, finite: Tensor) -> str:
        if self.mode == "mtl":
            names = self.task_names or [str(k) for k in range(finite.numel())]
            bad = [names[k] for k in torch.nonzero(~finite).flatten().tolist()]
            return f"the loss of task(s) {bad}"
        if self.mode == "iwrm":
            bad = torch.nonzero(~finite).flatten().tolist()
            return f"the loss of example(s) {bad[:10]} of the batch"
        names = self.task_names or [str(k) for k in range(finite.shape[1])]
        bad_tasks = [names[k] for k in torch.nonzero(~finite.all(dim=0)).flatten().tolist()]
        bad_examples = torch.nonzero(~finite.all(dim=1)).flatten().tolist()
        return f"the loss of task(s) {bad_tasks} on example(s) {bad_examples[:10]} of the batch"

    def _handle_nonfinite(self, what: str, global_step: int, backward: BackwardFn, world_size: int) -> bool:
        if self.engine is not None:
            self.engine.reset()
        if self.nonfinite == "raise":
            raise NonFiniteLossError(
                f"Non-finite value (inf or nan) in {what} at training step {global_step + 1} (the logs' step; "
                f"state.global_step {global_step}). Check the data and labels (and lower the learning rate if the "
                "losses grew until they overflowed), or set jd_nonfinite='skip' to skip such micro-batches."
            )
        self.skipped_steps += 1
        if world_size > 1 and self._model is not None:
            # Every process must run a backward for the gradient synchronisation to complete.
            params = _trainable([self._model])
            backward(sum((p.reshape(-1)[:1] * 0.0).sum() for p in params))
        return True

    def _warn_if_zero_rows_cancel(
        self, squared_row_norms: Tensor, squared_update_norm: Tensor, global_step: int
    ) -> None:
        """Warn once when some rows of the Jacobian are zero (examples without any labelled target) and the
        aggregator's update of the micro-batch vanishes: MGDA's smallest point of the convex hull of the rows
        (and Krum's choice of a row) is then 0, whatever the other examples."""
        if self._warned_zero_rows:
            return
        zero = squared_row_norms == 0
        vanishes = squared_update_norm <= 1e-8 * squared_row_norms.max()
        if not bool(zero.any() & ~zero.all() & vanishes):  # one device synchronisation
            return
        self._warned_zero_rows = True
        rows = torch.nonzero(zero).flatten().tolist()
        if self.mode == "iwmtl" and self.task_names:
            tasks = len(self.task_names)
            where = f"(example, task) pair(s) {[(row // tasks, self.task_names[row % tasks]) for row in rows[:10]]}"
        else:
            where = f"example(s) {rows[:10]}"
        warnings.warn(
            f"At training step {global_step + 1} the update of {type(self.aggregator).__name__} for a micro-batch is "
            "zero, "
            f"and {where} of that batch have no labelled target (every label -100: loss 0, a zero row of the "
            "Jacobian). An aggregator that returns a point of the convex hull of the rows (MGDA's smallest one, "
            "Krum's choice of a row) returns 0 as soon as one row is zero, whatever the other examples. Give every "
            "example a labelled target (drop the unlabelled ones, or make the collator label at least one token "
            "per example), or use an aggregator that ignores zero rows, such as jd_aggregator='upgrad'. Warned once.",
            UserWarning,
            stacklevel=2,
        )

    def _record(self, losses: Tensor, weights: Tensor | None, gramian: Tensor | None) -> None:
        if not self.log_stats:
            return
        stats = loss_stats(losses, self.mode, self.task_names, self._label_counts)
        if weights is not None:
            stats.update(weight_stats(weights, self.mode, self.task_names))
        if gramian is not None:
            stats.update(gramian_stats(gramian))
        self.stats.add(stats)
