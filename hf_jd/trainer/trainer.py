"""`JDTrainer`: the Hugging Face Trainer with Jacobian descent as its training step.

Only what differs from :class:`transformers.Trainer` is overridden: the training step (a vector of
losses and an aggregated update instead of one loss), the data sampler for multi-task datasets, the
logs (merged JD statistics), the evaluation (per-task losses) and the checkpoint (aggregator state).
Reference: Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization", arXiv 2406.16232.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from collections.abc import Sized
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_detach
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput
from transformers.utils import is_sagemaker_mp_enabled, logging

from ..aggregation import Aggregator, check_fits_rows, get_aggregator
from ._collect import ComputeLosses, LossCollector, forward_accepts, forward_declares
from ._distributed import resolve_ddp_gramian
from ._stats import loss_stats
from ._step import JDStep, select_modules
from .arguments import JDTrainingArguments, _parse_kwargs
from .losses import unwrap_model
from .multi_head import MultiHeadModel

logger = logging.get_logger(__name__)

__all__ = ["JDTrainer", "JD_STATE_NAME"]

#: File holding the JD state (aggregator state, cached weights, skipped count) in each checkpoint.
JD_STATE_NAME = "jd_aggregator_state.pt"

_TASK_ID_COLUMN = "task_id"


class JDTrainer(Trainer):
    """:class:`transformers.Trainer` that trains by Jacobian descent (JD).

    Each micro-batch gives a vector of losses (per task, per example, or per example and task: see
    :class:`JDTrainingArguments` ``jd_mode``); an aggregator (``jd_aggregator``, e.g. UPGrad of
    Quinton & Rey, arXiv 2406.16232) turns their Jacobian into the update written to ``.grad``.
    Optimizer, scheduler, mixed precision, gradient accumulation, logging, evaluation and
    checkpoints are the Trainer's own.

    Parameters
    ----------
    model, args, **kwargs
        As for :class:`transformers.Trainer`; ``args`` must be :class:`JDTrainingArguments`
        (default: ``JDTrainingArguments(output_dir="tmp_trainer")``, i.e. IWRM with UPGrad).
    compute_losses
        Optional ``callable(model, inputs) -> (losses, outputs)`` returning the losses of the
        micro-batch in the shape of ``jd_mode`` (``[m]``, ``[B]`` or ``[B, m]``; a dict task → loss
        is stacked in ``jd_task_names`` order). It replaces the built-in collection, for training
        and evaluation. It receives a shallow copy of the batch, so ``inputs.pop("labels")`` is fine.

    Raises
    ------
    TypeError
        If ``args`` is not :class:`JDTrainingArguments` or ``compute_losses`` is not callable.
    ValueError
        If ``compute_loss_func`` is given, ``label_smoothing_factor != 0`` with losses other than the
        built-in per-example losses of ``iwrm``, the ``jd_*`` arguments are
        invalid, a ``jd_modules`` pattern matches no module, or the parallelism is not supported
        (DeepSpeed, FSDP, SageMaker model parallelism, ``DataParallel``, several processes with autojac).

    Notes
    -----
    - Losses. ``mtl``: the model output's ``losses`` (dict task → scalar, or tensor ``[m]``).
      ``iwrm``: the labels are removed from the inputs, the model runs without computing its loss,
      and :func:`hf_jd.trainer.losses.per_example_losses` gives one loss per example (question answering
      reads both ``start_positions`` and ``end_positions``; encoder-decoder
      models such as T5 and BART get the ``decoder_input_ids`` they would have built from the labels,
      unless the batch already holds them). ``iwmtl``: the
      model output's ``losses`` (dict task → ``[B]`` or tensor ``[B, m]``); models whose forward
      declares a ``loss_reduction`` parameter (such as ``MultiHeadModel``; ``**kwargs`` does not count)
      are called with ``loss_reduction="none"``.
    - Gradient accumulation. Each micro-batch is weighted on its own (its own Gramian and weights)
      and its update is divided by the number of accumulated micro-batches; the updates add up in
      ``.grad``. Losses are per-micro-batch means: ``num_items_in_batch`` is not used (set the class
      attribute ``loss_is_scaled_for_ga = True`` if ``compute_losses`` already normalises over the
      whole accumulated batch).
    - ``jd_update_weights_every = k``: the optimizer steps whose index is a multiple of ``k``
      compute the Gramian and the weights (every micro-batch its own); the other steps reuse the
      last weights with a plain weighted backward (no capture, no Gramian). With ``iwrm``/``iwmtl``
      the weights belong to positions in the batch; a batch of another size (the last, smaller
      batch of an epoch) gives each example the mean reused weight of its task.
    - The logged ``loss`` is the mean of the losses. With ``jd_log_weights``, the logs also hold
      ``jd/weight_*``, ``loss_<task>``, ``jd/conflicting_pairs`` and ``jd/min_cosine`` averaged over
      the logging interval, and always ``jd/skipped_steps`` (micro-batches skipped so far because of
      non-finite values, with ``jd_nonfinite="skip"``). With several processes these statistics are
      also averaged over the processes, like ``loss`` (one collective per logging step): ``loss_<task>``
      is then the mean of the processes' local task losses (for ``mtl`` with equal local batches, the
      task loss of the global batch); with ``jd_ddp_gramian="global"`` the weights and conflict
      statistics come from the global Gramian and are the same on every process; with ``"local"``
      they are each process's own, averaged over the processes as over accumulated micro-batches
      (see :meth:`hf_jd.trainer._stats.StatsAccumulator.pop_means`). ``jd/skipped_steps`` is the same
      on every process (they skip together).
    - ``eval_loss`` is the model's own loss when it returns one (``iwrm``: when its forward declares
      every label input, e.g. ``labels``), otherwise the mean of the losses training uses (the
      per-example losses with ``iwrm``, e.g. for ``label_names=["my_labels"]``). Evaluation reports
      ``eval_loss_<task>`` for multi-task models (each over the examples carrying the task's label);
      when some examples lack some task's label (merged datasets), ``eval_loss`` is the mean of these,
      independent of the evaluation batch size. The autogram hooks capture nothing outside the
      training step. A subclass's ``compute_loss`` override is used by evaluation only (a warning says
      so): training losses come from ``compute_losses`` or the model.
    - ``iwrm``/``iwmtl`` with one example per micro-batch (``per_device_train_batch_size=1``, or a
      packing collator such as ``DataCollatorWithFlattening``) warn once: the Jacobian then has one
      row per task only.
    - A training dataset with a ``task_id`` column is sampled by
      :class:`hf_jd.trainer.multitask_data.MultiTaskSampler`, which replaces
      ``train_sampling_strategy``; an iterable one is not task-balanced (both warned about).
    - Checkpoints hold ``jd_aggregator_state.pt`` (aggregator state such as a random generator,
      the cached weights of ``jd_update_weights_every``, the aggregator's name and class), and with
      several processes each one's own (``jd_aggregator_state_<process>.pt``); resuming restores it,
      so a resumed run gives the same weights as an uninterrupted one, and resuming with another
      ``jd_aggregator`` raises an error naming both (``jd_reset_aggregator_state=True`` switches).
    - ``torch_empty_cache_steps`` clears the device cache as the Trainer's own step does.
    - Several processes (``accelerate launch`` / ``torchrun``, DDP): with ``jd_ddp_gramian="global"``
      (default for ``mtl``) the task Jacobians are all-reduced and every process writes the update
      of one process on the global batch (no DDP gradient all-reduce on those steps); with
      ``"local"`` (default for ``iwrm``/``iwmtl``) each process weights its own examples and DDP
      averages the updates. ``jd/comm_bytes`` logs the bytes sent so far by this process to JD's own
      collectives of the training step (not counted: DDP's, and the logging's all-gather). See
      :mod:`hf_jd.trainer._distributed`.
    - ``torch_compile=True`` (or a compiled model) works: the step differentiates the compiled graph
      more than once, so AOTAutograd's buffer donation is turned off inside the training step.
    - ``label_smoothing_factor`` smooths the built-in per-example cross-entropies of ``jd_mode="iwrm"`` as the
      Trainer's ``LabelSmoother`` does; losses JD does not compute itself (the task losses of ``mtl``/``iwmtl``,
      ``compute_losses``) are rejected with it: smooth them where they are computed.
    - Not supported: DeepSpeed, FSDP, SageMaker model parallelism, ``torch.nn.DataParallel``
      (several GPUs in one process), ``compute_loss_func``, the LOMO/AdaLomo
      optimizers, reentrant gradient checkpointing, and multi-process training with the autojac
      engine.
    """

    # Losses are per-micro-batch means: divide by the number of accumulated micro-batches.
    loss_is_scaled_for_ga: bool | None = False

    def __init__(
        self,
        model: nn.Module | None = None,
        args: JDTrainingArguments | None = None,
        *trainer_args: Any,
        compute_losses: ComputeLosses | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if args is None:
            args = JDTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, JDTrainingArguments):
            raise TypeError(
                f"JDTrainer needs JDTrainingArguments (it holds the jd_* options), got {type(args).__name__}. "
                "Build the arguments with hf_jd.JDTrainingArguments(...)."
            )
        args._validate_jd_arguments()  # again: the fields may have been changed after construction
        if compute_losses is not None and not callable(compute_losses):
            raise TypeError(
                f"compute_losses must be callable (model, inputs) -> (losses, outputs), got {compute_losses!r}."
            )
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "JDTrainer does not use compute_loss_func (it reduces the outputs to one loss). Pass "
                "compute_losses=callable(model, inputs) -> (losses, outputs) instead."
            )
        if args.label_smoothing_factor != 0 and compute_losses is not None:
            # (jd_mode 'mtl' and 'iwmtl' are rejected by JDTrainingArguments)
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} cannot apply to the losses of compute_losses, "
                "which JDTrainer takes as they are: set label_smoothing_factor=0 and smooth them in compute_losses "
                "(e.g. F.cross_entropy(..., label_smoothing=0.1, reduction='none')). Without compute_losses, "
                "label_smoothing_factor applies to the built-in per-example losses of jd_mode='iwrm'."
            )
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.args: JDTrainingArguments
        self._check_parallelism()
        self.compute_losses: ComputeLosses | None = compute_losses
        # The label columns the user or the model's forward declares (not those JDTrainer infers below).
        self._declared_label_names = list(self.label_names or [])
        task_names = self.args.jd_task_names
        if not self.label_names and task_names and self.args.jd_mode in ("mtl", "iwmtl"):
            self.label_names = [f"labels_{name}" for name in task_names]
        self.jd_step = JDStep(
            self._build_aggregator(),
            mode=self.args.jd_mode,
            engine=self.args.jd_resolved_engine,
            task_names=task_names,
            update_weights_every=self.args.jd_update_weights_every,
            nonfinite=self.args.jd_nonfinite,
            log_stats=self.args.jd_log_weights,
            module_patterns=self.args.jd_modules,
            ddp_gramian=resolve_ddp_gramian(self.args.jd_ddp_gramian, self.args.jd_mode),
            single_backward=self.args.jd_single_backward,
            check_rtol=5e-2 if (self.args.bf16 or self.args.fp16) else 1e-3,
        )
        assert self.model is not None  # Trainer.__init__ raises without a model or model_init
        select_modules(self.model, self.args.jd_modules)  # fail early on a pattern that matches nothing
        # (the Trainer disables label smoothing for a multi-label classifier, with a warning: so does JD training)
        label_smoothing = args.label_smoothing_factor if self.label_smoother is not None else 0.0
        self._loss_collector = LossCollector(
            self.args.jd_mode, task_names, self.label_names, compute_losses, label_smoothing=label_smoothing
        )
        self._eval_task_losses: dict[str, list[float]] | None = None
        self._eval_labels_partial = False  # whether an evaluated batch lacked some task's label for some example
        self._warned_single_row = False
        self._warn_if_compute_loss_overridden()
        self._warn_about_task_sampling()
        self._check_task_names_of_model()
        self._warn_about_frozen_heads()

    def _warn_if_compute_loss_overridden(self) -> None:
        if type(self).compute_loss is JDTrainer.compute_loss:
            return
        warnings.warn(
            f"{type(self).__name__} overrides compute_loss, which JDTrainer uses for evaluation only: training "
            "differentiates the vector of per-example / per-task losses from `compute_losses=` (or from the model "
            "and its labels), never one reduced loss. To change the training losses (e.g. class weights), pass "
            "compute_losses=callable(model, inputs) -> (losses, outputs) to JDTrainer instead.",
            UserWarning,
            stacklevel=3,
        )

    def _check_task_names_of_model(self) -> None:
        """Raise for a :class:`MultiHeadModel` under ``jd_mode="iwrm"`` without ``compute_losses`` (its per-task logits
        have no per-example loss of one label column), and for ``jd_task_names`` naming a task it has no head for (the
        trainer would look for its label column and drop the others, and the model would get no labels); warn for tasks
        left out."""
        names = self.args.jd_task_names
        assert self.model is not None  # Trainer.__init__ raises without a model or model_init
        model = unwrap_model(self.model)  # (through torch.compile and PEFT)
        if self.compute_losses is None and isinstance(model, MultiHeadModel) and self.args.jd_mode == "iwrm":
            raise ValueError(
                f"The model is a MultiHeadModel (tasks {model.task_names}), whose logits are one tensor per task, but "
                "jd_mode='iwrm' (the default) computes one loss per example from a single 'labels' column. Set "
                "jd_mode='iwmtl' (one loss per example and task) or jd_mode='mtl' (one loss per task), or pass "
                "compute_losses= for losses of your own."
            )
        if not names or self.compute_losses is not None or not isinstance(model, MultiHeadModel):
            return
        if self.args.jd_mode not in ("mtl", "iwmtl"):
            return
        tasks = model.task_names
        unknown = [name for name in names if name not in tasks]
        if unknown:
            raise ValueError(
                f"jd_task_names {names} names {unknown}, but the MultiHeadModel has heads for the tasks {tasks} "
                f"only (JDTrainer would pass it the label columns {[f'labels_{n}' for n in names]}). Give "
                "jd_task_names from the model's tasks, or leave it unset to train them all."
            )
        left_out = [task for task in tasks if task not in names]
        if left_out and not self._declared_label_names:
            warnings.warn(
                f"jd_task_names {names} leaves out the MultiHeadModel's tasks {left_out}: their label columns "
                f"{[f'labels_{t}' for t in left_out]} are not passed to the model, and they are not trained. List "
                "them in jd_task_names to train them too.",
                UserWarning,
                stacklevel=3,
            )

    def _warn_about_frozen_heads(self) -> None:
        """Warn when a task head of a :class:`MultiHeadModel` that is trained has no trainable parameter (PEFT's
        ``get_peft_model`` freezes everything outside its adapters, the randomly initialised heads too)."""
        assert self.model is not None  # Trainer.__init__ raises without a model or model_init
        model = unwrap_model(self.model)
        if self.compute_losses is not None or not isinstance(model, MultiHeadModel):
            return
        names = self.args.jd_task_names if self.args.jd_mode in ("mtl", "iwmtl") else None
        trained = [task for task in (names or model.task_names) if task in model.heads]
        frozen = [task for task in trained if not any(p.requires_grad for p in model.heads[task].parameters())]
        if not frozen:
            return
        wrappers = (self.model, getattr(self.model, "base_model", None))
        peft = any("peft" in type(module).__module__ for module in wrappers)
        hint = (
            f"peft's get_peft_model freezes every parameter outside its adapters: list the heads in the adapter's "
            f"configuration, e.g. LoraConfig(..., modules_to_save={frozen})"
            if peft
            else "set requires_grad=True on their parameters to train them"
        )
        warnings.warn(
            f"The MultiHeadModel's heads of the tasks {frozen} have no trainable parameters, so they keep their "
            f"current (at first random) weights while the rest trains. If that is not what you want, {hint}.",
            UserWarning,
            stacklevel=3,
        )

    def _warn_about_task_sampling(self) -> None:
        """Say when the ``task_id`` column changes the sampling, or cannot (iterable datasets)."""
        dataset = self.train_dataset
        column_names = getattr(dataset, "column_names", None)
        if not column_names or _TASK_ID_COLUMN not in column_names:
            return
        if _is_iterable_dataset(dataset):
            warnings.warn(
                f"The training dataset has a {_TASK_ID_COLUMN!r} column but is an IterableDataset, so it is not "
                "sampled task by task (JDTrainer's task-balanced MultiTaskSampler needs a map-style dataset): "
                "batches hold the tasks in stream order. Interleave the tasks in the stream yourself, or use a "
                "map-style dataset.",
                UserWarning,
                stacklevel=3,
            )
        elif self.args.train_sampling_strategy != "random":
            warnings.warn(
                f"train_sampling_strategy={self.args.train_sampling_strategy!r} is ignored: the training dataset "
                f"has a {_TASK_ID_COLUMN!r} column, so JDTrainer samples it with its task-balanced MultiTaskSampler. "
                f"Remove the {_TASK_ID_COLUMN!r} column to use the Trainer's sampler.",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ set-up
    def _build_aggregator(self) -> Aggregator:
        # _validate_jd_arguments has parsed the kwargs into a dict already; parsing a dict again returns it.
        return get_aggregator(self.args.jd_aggregator, **_parse_kwargs(self.args.jd_aggregator_kwargs))

    def _check_parallelism(self) -> None:
        if is_sagemaker_mp_enabled():
            raise ValueError(
                "JDTrainer does not support SageMaker model parallelism (its forward/backward replaces the training "
                "step); train without it."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "JDTrainer does not support DeepSpeed or FSDP (the Jacobian needs unsharded parameters); "
                "disable them in the accelerate configuration."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"JDTrainer does not support torch.nn.DataParallel ({self.args.n_gpu} GPUs in one process). Launch "
                "one process per GPU with torchrun (DDP), or expose a single GPU with CUDA_VISIBLE_DEVICES."
            )
        if self.args.world_size > 1 and self.args.jd_resolved_engine == "autojac":
            raise ValueError(
                "Multi-process training is only supported with the autogram engine (its weighted backward goes "
                "through DDP's gradient synchronisation). Use a Gramian-based aggregator with jd_engine='autogram'."
            )

    @property
    def aggregator(self) -> Aggregator:
        """The aggregator of the Jacobian (holds the state saved in checkpoints)."""
        return self.jd_step.aggregator

    def _model_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Drop the ``task_id`` column (kept for the sampler) unless the model's forward takes it."""
        if _TASK_ID_COLUMN in inputs and not forward_accepts(self.accelerator.unwrap_model(model), _TASK_ID_COLUMN):
            inputs = {key: value for key, value in inputs.items() if key != _TASK_ID_COLUMN}
        return inputs

    def _set_signature_columns_if_needed(self) -> None:
        first_time = self._signature_columns is None
        super()._set_signature_columns_if_needed()
        columns = self._signature_columns
        if first_time and columns is not None:
            # "labels" too: the loss collector and `compute_losses` read it even when the model's forward
            # does not take it (a plain nn.Module), and the Trainer would drop the column.
            extra = [_TASK_ID_COLUMN, "labels", *self.label_names]
            extra += [f"labels_{name}" for name in self.args.jd_task_names or []]
            # A MultiHeadModel passes its **kwargs to the backbone: the backbone's inputs (a ViT's pixel_values, an
            # audio model's input_values) are columns of the model too.
            backbone = getattr(self.accelerator.unwrap_model(self.model), "backbone", None)
            if isinstance(backbone, nn.Module):
                with contextlib.suppress(TypeError, ValueError):  # (a forward without a readable signature)
                    extra += list(inspect.signature(backbone.forward).parameters)
            columns.extend([name for name in extra if name not in columns])

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        column_names = getattr(dataset, "column_names", None)
        if dataset is not None and column_names is not None and _TASK_ID_COLUMN in column_names:
            from .multitask_data import MultiTaskSampler

            task_ids = [int(task_id) for task_id in dataset[_TASK_ID_COLUMN]]
            # (data_seed, when set, orders the data, as in the Trainer's own sampler)
            seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
            return MultiTaskSampler(task_ids, batch_size=self._train_batch_size, seed=seed)
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------ training
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`transformers.Trainer.train`, after which the autogram engine's hooks are taken off the model.

        The engine is built on the first training step; leaving its hooks on the model after training would make every
        later forward pass (evaluation, ``generate``, a new trainer on the same model) call them. ``jd_step.engine``
        stays readable; a later ``train()`` builds a new engine.

        Parameters
        ----------
        *args, **kwargs
            Those of :meth:`transformers.Trainer.train`.

        Returns
        -------
        transformers.trainer_utils.TrainOutput
            What :meth:`transformers.Trainer.train` returns.
        """
        self._check_last_batch_rows()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.jd_step.detach()

    def _update_auto_batch_size(self, batch_size: int) -> None:
        """The Trainer's hook of ``auto_find_batch_size``, called at the start of each run of its training loop: when
        the loop runs again with a smaller batch after an out-of-memory error, the aggregator's state (sized on the
        rows of the batches already seen: GradVac's targets, Nash-MTL's weights) and the weights kept for
        ``jd_update_weights_every`` start over, and the last batch of an epoch is checked again for the new size.

        Parameters
        ----------
        batch_size
            The batch size of the loop about to run.
        """
        previous = self._train_batch_size
        super()._update_auto_batch_size(batch_size)
        if batch_size != previous:
            self.jd_step.aggregator.reset()
            self.jd_step.cached_weights = None
            self._check_last_batch_rows()

    def _check_last_batch_rows(self) -> None:
        """Raise before training when the last batch of an epoch, smaller than the others, would give the aggregator a
        number of rows it rejects (weights or a preference vector of fixed length, a state sized on the first batch,
        Krum's or TrimmedMean's minimum), instead of failing there, at the end of the first epoch."""
        args = self.args
        dataset = self.train_dataset
        if args.jd_mode == "mtl" or args.dataloader_drop_last or args.world_size > 1 or dataset is None:
            return
        column_names = getattr(dataset, "column_names", None) or []
        if _is_iterable_dataset(dataset) or _TASK_ID_COLUMN in column_names:
            return  # (no length, or batches of the task sampler)
        if not isinstance(dataset, Sized):
            return
        size = len(dataset)
        batch_size = self._train_batch_size
        last = size % batch_size
        batches = -(-size // batch_size)
        if last == 0 or (args.max_steps > 0 and args.max_steps * args.gradient_accumulation_steps < batches):
            return  # (no smaller batch, or training stops before it)
        tasks = 1
        if args.jd_mode == "iwmtl":
            if not args.jd_task_names:
                return
            tasks = len(args.jd_task_names)
        probe = copy.deepcopy(self.jd_step.aggregator)
        try:
            check_fits_rows(probe, batch_size * tasks)  # (a state set on the full batches, as in training)
        except Exception:  # noqa: BLE001 - the probe only looks for the last batch's failure
            return
        try:
            check_fits_rows(probe, last * tasks)
        except ValueError as error:
            raise ValueError(
                f"The training set has {size} examples, so with a batch size of {batch_size} the last batch of "
                f"each epoch has {last} examples, that is {last * tasks} rows of the Jacobian (jd_mode="
                f"{args.jd_mode!r}), which jd_aggregator={args.jd_aggregator!r} rejects: {error}\nSet "
                f"dataloader_drop_last=True, or a batch size that divides {size}."
            ) from error

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One micro-batch of Jacobian descent: forward, then the aggregated update added to ``.grad``.

        Parameters
        ----------
        model
            The model being trained (possibly wrapped by accelerate).
        inputs
            The micro-batch.
        num_items_in_batch
            Not used: the losses are per-micro-batch means (see the class notes).

        Returns
        -------
        Tensor
            The detached mean of the losses, divided by the number of accumulated micro-batches as the
            Trainer's own loss is.
        """
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context(), _compiled_backward_keeps_buffers():
            model.train()
            if self.args.jd_freeze_batch_norm:
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
            optimizer_train = getattr(self.optimizer, "train", None)  # schedule-free optimizers
            if callable(optimizer_train):
                optimizer_train()
            inputs = self._model_inputs(model, self._prepare_inputs(inputs))
            unwrapped = self.accelerator.unwrap_model(model)
            self.jd_step.setup(unwrapped)

            scale = 1.0
            if not self.loss_is_scaled_for_ga:
                micro_batches = getattr(
                    self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
                )
                scale = 1.0 / micro_batches

            global_counts = self._global_label_counts(unwrapped, inputs)

            def forward(batch: dict[str, Any] = inputs) -> tuple[Tensor, Any]:
                with self.compute_loss_context_manager():
                    losses, outputs = self._loss_collector(model, unwrapped, batch)
                if global_counts is not None:
                    losses = losses * self._label_count_scale(global_counts, losses)
                return losses, outputs

            label_counts = self._label_counts(inputs)
            result = self.jd_step.run(
                forward,
                self.accelerator.backward,
                scale=scale,
                global_step=self.state.global_step,
                grad_factor=scale * self._direct_grad_factor(),
                world_size=self.args.world_size,
                label_counts=label_counts,
                no_sync=lambda: self.accelerator.no_sync(model),
                shared_term=lambda: self._loss_collector.shared_term,
            )
            self._warn_if_single_row(result.losses, inputs)
            del forward, inputs  # the batch is no longer referenced (forward holds it as its default)
            self._loss_collector.shared_term = None  # (nor the graph of its losses)
            # As Trainer.training_step does (it is replaced here): free the accelerator's cached memory.
            empty_cache_steps = self.args.torch_empty_cache_steps
            if empty_cache_steps is not None and self.state.global_step % empty_cache_steps == 0:
                clear_device_cache()
                if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                    torch.mps.clear_graph_cache()
            if result.skipped:
                # Not finite on some process: every process skipped it, and reports it as not finite, so that the
                # Trainer's logging (logging_nan_inf_filter) treats the step alike on all of them.
                return torch.full((), float("nan"), device=result.losses.device)
            return (self._logged_loss(result.losses, label_counts) * scale).detach()

    def _logged_loss(self, losses: Tensor, label_counts: list[int] | None) -> Tensor:
        """The training ``loss``: the mean of the losses, except in ``iwmtl`` with per-task label counts, where it is
        the mean of the logged ``loss_<task>`` (the placeholders 0 of examples without a task's label would
        otherwise pull it down, e.g. to a third with three tasks from three datasets, below ``eval_loss``)."""
        if label_counts is None or not self.args.jd_task_names:
            return losses.detach().float().mean()
        per_task = loss_stats(losses, "iwmtl", self.args.jd_task_names, label_counts)
        if not per_task:
            return losses.detach().float().mean()
        return torch.stack(list(per_task.values())).mean()

    def _warn_if_single_row(self, losses: Tensor, inputs: dict[str, Any]) -> None:
        """Warn once when a per-example mode gets one example per micro-batch (no per-example Jacobian descent)."""
        if self._warned_single_row or self.args.jd_mode == "mtl" or losses.dim() == 0 or losses.shape[0] != 1:
            return
        packed = _holds_packed_sequences(inputs)
        batch_size = getattr(self, "_train_batch_size", self.args.per_device_train_batch_size)  # auto_find_batch_size
        if not packed and batch_size != 1:
            return  # e.g. the last, smaller batch of an epoch
        self._warned_single_row = True
        what = (
            "so the Jacobian has a single row: the step is a plain gradient step, without Jacobian descent"
            if self.args.jd_mode == "iwrm"
            else "so the rows of the Jacobian are only the tasks (as with jd_mode='mtl')"
        )
        cause = (
            "its sequences were packed into one row (e.g. by DataCollatorWithFlattening)"
            if packed
            else "per_device_train_batch_size=1"
        )
        accumulation = ""
        steps = self.args.gradient_accumulation_steps
        if not packed and steps > 1:
            accumulation = (
                f" gradient_accumulation_steps={steps} does not merge the micro-batches into one Jacobian (each is "
                f"weighted on its own): for a Jacobian over {steps} examples, set per_device_train_batch_size={steps} "
                "and gradient_accumulation_steps=1."
            )
        warnings.warn(
            f"jd_mode={self.args.jd_mode!r} gets one example per micro-batch because {cause}, {what}. Use a "
            "collator that keeps one row per example (not DataCollatorWithFlattening) and "
            "per_device_train_batch_size > 1, or pass compute_losses= returning one loss per packed sequence."
            + accumulation,
            UserWarning,
            stacklevel=2,
        )

    def _global_label_counts(self, unwrapped: nn.Module, inputs: dict[str, Any]) -> list[int] | None:
        """The label counts by which the task losses of this step must be weighted over the processes, or ``None``:
        a :class:`MultiHeadModel` (whose task loss is the mean over the examples that carry the task's label) in
        ``mtl`` with the global Gramian on several processes, the batch holding every ``labels_<task>``."""
        applies = (
            self.args.jd_mode == "mtl"
            and self.args.world_size > 1
            and self.compute_losses is None
            and self.jd_step.ddp_gramian == "global"
            and isinstance(unwrapped, MultiHeadModel)
        )
        return _task_label_counts(inputs, self.args.jd_task_names) if applies else None

    def _label_count_scale(self, counts: list[int], losses: Tensor) -> Tensor:
        """``P n_p / N`` per task, for ``n_p`` the examples of this process's batch that carry the task's label, ``N``
        their sum over the ``P`` processes (1 where no process has any): the global step averages the processes'
        task losses, which this turns into the mean over all the labelled examples of the global batch, as one
        process computes it on that batch (each process's mean counted equally, a process without any label of a
        task halved the task's loss and gradient)."""
        local = torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(local.clone(), reduction="sum")
        scale = torch.where(total > 0, local * self.args.world_size / total.clamp(min=1), torch.ones_like(local))
        return scale.to(device=losses.device, dtype=losses.dtype)

    def _label_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        """``iwmtl`` with ``labels_<task>`` inputs: how many examples carry each task's label."""
        return _task_label_counts(inputs, self.args.jd_task_names) if self.args.jd_mode == "iwmtl" else None

    def _direct_grad_factor(self) -> float:
        """What ``accelerator.backward`` multiplies a loss by (fp16 loss scale, accelerate's own accumulation)."""
        factor = 1.0 / max(1, int(getattr(self.accelerator, "gradient_accumulation_steps", 1)))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # Gradients written directly (autojac, single backward) bypass accelerator.backward, whose
            # scaler.scale(loss) creates the scaler's scale tensor on first use; create it here, so that
            # the optimizer step can unscale them.
            scaler.scale(torch.ones((), device=self.args.device))
            factor *= float(scaler.get_scale())
        return factor

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the JD statistics averaged over the logging interval into the training logs.

        Parameters
        ----------
        logs
            The logs to record; training logs (with ``loss``) get the ``jd/*`` and ``loss_<task>`` entries.
        start_time
            As for :meth:`transformers.Trainer.log`.
        """
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            if self.args.world_size > 1 and self.jd_step.log_stats:
                # Averaged over the processes like `loss`, in one collective: every process logs at the
                # same steps (the Trainer's _maybe_log_save_evaluate gathers `loss` just before).
                logs.update(self.jd_step.stats.pop_means(across_processes=True))
            elif self.jd_step.stats:
                logs.update(self.jd_step.stats.pop_means())
            logs["jd/skipped_steps"] = float(self.jd_step.skipped_steps)
            if self.args.world_size > 1:
                logs["jd/comm_bytes"] = float(self.jd_step.communication.payload_bytes)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The evaluation loss (training uses :meth:`training_step`); records per-task losses.

        Parameters
        ----------
        model
            The model being evaluated.
        inputs
            The batch.
        return_outputs
            Whether to return the model outputs too.
        num_items_in_batch
            Not used: the loss of a batch is its mean, also on several processes.

        Returns
        -------
        Tensor or tuple of (Tensor, Any)
            The scalar loss (see ``eval_loss`` in the class notes), with the outputs if ``return_outputs``.

        Raises
        ------
        ValueError
            If a multi-task model's output carries no ``losses``.
        """
        inputs = self._model_inputs(model, inputs)
        with self.jd_step.engine_disabled():
            if self.compute_losses is None and self.args.jd_mode == "iwrm":
                if self._model_takes_labels(model, inputs):
                    # The model's own mean loss of the batch. (With a token count, the Trainer multiplies the loss by
                    # the number of processes, which doubles it on 2 processes for the models that accept the count
                    # but do not divide by it, as BERT's classifiers.)
                    return super().compute_loss(model, inputs, return_outputs, None)
                # The labels reach the model only through **kwargs (or not at all): evaluate the mean of the
                # per-example losses that training uses.
                losses, outputs = self._loss_collector(
                    model, self.accelerator.unwrap_model(model), inputs, training=False
                )
                loss = losses.mean()
                return (loss, outputs) if return_outputs else loss
            loss, outputs, task_losses = self._eval_task_step(model, inputs)
            batch_size = _batch_size(inputs)
            kept = self._examples_kept(batch_size)
            if kept < batch_size:
                # The last batch of a multi-process evaluation, padded with examples from the start of the data
                # (accelerate's even batches), which the Trainer drops from its metrics: the task losses are those
                # of the real examples alone.
                inputs = _first_examples(inputs, kept, batch_size)
                task_losses = self._eval_task_step(model, inputs)[2] if kept else {}
        self._record_eval_task_losses(task_losses, inputs)
        return (loss, outputs) if return_outputs else loss

    def _eval_task_step(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, Any, dict[str, Tensor]]:
        """Multi-task evaluation of a batch: the loss, the outputs and each task's mean loss."""
        if self.compute_losses is not None:
            losses, outputs = self._loss_collector(model, self.accelerator.unwrap_model(model), inputs, training=False)
            return losses.mean(), outputs, self._task_means(losses, self._label_counts(inputs))
        outputs = model(**inputs)
        task_losses = self._task_means(self._output_losses(outputs), self._label_counts(inputs))
        model_loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
        loss = torch.stack(list(task_losses.values())).mean() if model_loss is None else model_loss
        return loss, outputs, task_losses

    def _examples_kept(self, batch_size: int) -> int:
        """How many examples of this process's batch count in a multi-process evaluation: all but those that pad the
        last batch (accelerate repeats the first examples so that every process has a full batch; its
        ``gather_for_metrics`` keeps the first ``remainder`` of the gathered batch, which holds the processes'
        batches in order)."""
        state = self.accelerator.gradient_state
        if self.args.world_size <= 1 or not state.end_of_dataloader or state.remainder <= 0:
            return batch_size
        return max(0, min(batch_size, state.remainder - self.args.process_index * batch_size))

    def _model_takes_labels(self, model: nn.Module, inputs: dict[str, Any]) -> bool:
        """``iwrm``: whether the model computes its own loss, i.e. its forward declares every label input present."""
        present = [name for name in self._loss_collector.label_names if inputs.get(name) is not None]
        unwrapped = self.accelerator.unwrap_model(model)
        compiled = getattr(unwrapped, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(compiled, nn.Module):
            unwrapped = compiled
        get_base_model = getattr(unwrapped, "get_base_model", None)  # PEFT: the wrapped model's signature
        if callable(get_base_model):
            unwrapped = get_base_model()
        return not present or all(forward_declares(unwrapped, name) for name in present)

    @staticmethod
    def _output_losses(outputs: Any) -> Any:
        losses = outputs.get("losses") if isinstance(outputs, dict) else getattr(outputs, "losses", None)
        if losses is None:
            raise ValueError(
                "The model output carries no `losses`, which multi-task evaluation needs (dict task -> loss). "
                "Return them from the model or pass compute_losses= to JDTrainer."
            )
        return losses

    def _task_means(self, losses: Any, label_counts: list[int] | None = None) -> dict[str, Tensor]:
        """Per-task mean losses from a dict task → loss or a tensor ``[m]``/``[B]``/``[B, m]``.

        ``iwmtl`` with ``label_counts`` (examples carrying each task's label): a task's per-example losses
        are summed and divided by its count, as for the training log ``loss_<task>`` (examples without
        the label hold a zero placeholder that must not dilute the mean).
        """
        names = self.args.jd_task_names
        counts = dict(zip(names, label_counts)) if names and label_counts is not None else {}

        def mean(name: str, value: Tensor) -> Tensor:
            value = value.detach().float()
            if value.dim() >= 1 and value.numel() > 1 and counts.get(name):
                return value.sum() / counts[name]
            return value.mean()

        if isinstance(losses, dict):
            return {name: mean(name, value) for name, value in losses.items()}
        losses = losses.detach().float()
        if not names or self.args.jd_mode == "iwrm":
            return {}
        if self.args.jd_mode == "mtl":
            return {name: value for name, value in zip(names, losses.reshape(-1))}
        columns = losses.reshape(-1, len(names))
        return {name: mean(name, columns[:, index]) for index, name in enumerate(names)}

    def _record_eval_task_losses(self, task_losses: dict[str, Tensor], inputs: dict[str, Any]) -> None:
        """Accumulate each task's mean loss, weighted by the number of examples that carry its label."""
        if self._eval_task_losses is None or not task_losses:
            return
        batch_size = _batch_size(inputs)
        for name, value in task_losses.items():
            count = _labelled_examples(inputs.get(f"labels_{name}"), batch_size)
            self._eval_labels_partial |= count < batch_size
            if count == 0:
                continue  # no example of this task in the batch: its loss there is a placeholder
            total = self._eval_task_losses.setdefault(name, [0.0, 0.0])
            total[0] += float(value) * count
            total[1] += count

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Any, Any]:
        """With ``compute_losses``, evaluate through it (the model may not take the label columns).

        Without it, or on a batch without any of the label inputs that ``label_names`` or the model's
        ``forward`` declares (``predict`` on a test set), this is the Trainer's own ``prediction_step``.
        With it, the loss is the mean of the losses that ``compute_losses`` returns, the predictions are its
        outputs (tensors, minus ``ignore_keys`` and the ``"loss"`` entry) and the labels are the
        ``label_names`` inputs, if any.

        Parameters
        ----------
        model
            The model being evaluated.
        inputs
            The batch.
        prediction_loss_only
            Whether to return the loss only (predictions and labels ``None``).
        ignore_keys
            Keys of a dict output left out of the predictions.

        Returns
        -------
        tuple of (Tensor or None, Any, Any)
            The loss, the predictions and the labels.
        """
        declared = self._declared_label_names
        if self.compute_losses is None or (declared and all(inputs.get(name) is None for name in declared)):
            # (without labels, e.g. predict() on a test set, the Trainer's own step runs the model and gives no loss)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        # The labels are read before the forward pass, as the Trainer's own prediction_step does.
        labels = None
        if self.label_names and all(inputs.get(name) is not None for name in self.label_names):
            labels = nested_detach(tuple(inputs[name] for name in self.label_names))
            if len(labels) == 1:
                labels = labels[0]
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        ignored = {*(ignore_keys or ()), "loss"}  # (the batch loss is not a prediction, as in the Trainer)
        if isinstance(outputs, dict):
            outputs = tuple(value for key, value in outputs.items() if key not in ignored and isinstance(value, Tensor))
        logits = nested_detach(outputs) if outputs is not None else None
        if isinstance(logits, tuple) and len(logits) == 1:
            logits = logits[0]
        return loss, logits, labels

    def evaluation_loop(
        self,
        dataloader: torch.utils.data.DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The Trainer's loop, engine disabled, plus ``<prefix>_loss_<task>`` for multi-task models.

        Parameters
        ----------
        dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            As for :meth:`transformers.Trainer.evaluation_loop`.

        Returns
        -------
        EvalLoopOutput
            The Trainer's output; its metrics also hold the example-weighted mean loss of each task.
        """
        self._eval_task_losses = {}
        self._eval_labels_partial = False
        try:
            with self.jd_step.engine_disabled():
                output = super().evaluation_loop(
                    dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
                )
            totals = self._eval_task_losses
        finally:
            self._eval_task_losses = None
        if self.args.world_size > 1 and self.args.jd_task_names:
            totals = self._sum_over_processes(totals, self.args.jd_task_names)
        if totals and output.metrics is not None:
            task_means = {name: total / max(count, 1.0) for name, (total, count) in totals.items()}
            for name, value in task_means.items():
                output.metrics[f"{metric_key_prefix}_loss_{name}"] = value
            if f"{metric_key_prefix}_loss" in output.metrics and self._eval_labels_partial:
                # Some examples lack some task's label (merged datasets): the mean of the task losses, each over the
                # examples that carry its label. The Trainer's average of per-batch losses would depend on which
                # tasks each batch holds, hence on the evaluation batch size. (With every label present the two
                # agree, and the Trainer's own value is kept.)
                output.metrics[f"{metric_key_prefix}_loss"] = sum(task_means.values()) / len(task_means)
        return output

    def _sum_over_processes(self, totals: dict[str, list[float]], names: list[str]) -> dict[str, list[float]]:
        """Per-task ``[loss total, example count]`` summed over the processes (each evaluated its share)."""
        local = torch.tensor(
            [totals.get(name, [0.0, 0.0]) for name in names], dtype=torch.float64, device=self.accelerator.device
        )
        summed = self.accelerator.reduce(local, reduction="sum").cpu().tolist()
        return {name: values for name, values in zip(names, summed) if values[1] > 0}

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
        state = self.jd_step.state_dict()
        state["aggregator_name"] = self.args.jd_aggregator
        state["aggregator_class"] = type(self.aggregator).__name__
        if self.args.should_save and os.path.isdir(folder):
            torch.save(state, os.path.join(folder, JD_STATE_NAME))
        if self.args.world_size > 1:
            # Each process's own state too, as the Trainer saves each one's random state: with per-process weights
            # (jd_ddp_gramian='local') the aggregators' states differ (GradVac's targets, reused weights).
            os.makedirs(folder, exist_ok=True)
            torch.save(state, os.path.join(folder, _process_state_name(self.args.process_index)))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, JD_STATE_NAME)
        own = os.path.join(resume_from_checkpoint, _process_state_name(self.args.process_index))
        if self.args.world_size > 1 and os.path.isfile(own):
            path = own
        if self.args.jd_reset_aggregator_state:
            logger.info("jd_reset_aggregator_state=True: the aggregator starts from its initial state.")
            return
        if os.path.isfile(path):
            # Our own file: it may hold aggregator states that are not plain tensors.
            state = torch.load(path, map_location="cpu", weights_only=False)
            self._check_saved_aggregator(state, path)
            self.jd_step.load_state_dict(state)
        elif self.aggregator.is_stateful:
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {JD_STATE_NAME}, but aggregator {self.args.jd_aggregator!r} is "
                "stateful, so resuming would not continue the same run. Resume from a checkpoint saved by JDTrainer, "
                "or set jd_reset_aggregator_state=True to start the aggregator from its initial state."
            )

    def _check_saved_aggregator(self, state: dict[str, Any], path: str) -> None:
        """Raise when the checkpoint was saved with another aggregator (files saved before the name was kept pass)."""
        saved_name = state.get("aggregator_name")
        saved_class = state.get("aggregator_class")
        current_class = type(self.aggregator).__name__
        if saved_name is None and saved_class is None:
            return
        if saved_name == self.args.jd_aggregator and (saved_class is None or saved_class == current_class):
            return
        raise ValueError(
            f"The checkpoint {path} was saved with jd_aggregator={saved_name!r} ({saved_class}), but this run uses "
            f"jd_aggregator={self.args.jd_aggregator!r} ({current_class}). Resume with jd_aggregator={saved_name!r}, "
            "or, to switch aggregators on purpose, set jd_reset_aggregator_state=True (the aggregator then starts "
            "from its initial state)."
        )


def _process_state_name(process_index: int) -> str:
    """The file of one process's aggregator state in a checkpoint of a multi-process run."""
    return JD_STATE_NAME.replace(".pt", f"_{process_index}.pt")


def _is_iterable_dataset(dataset: Any) -> bool:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return True
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


def _holds_packed_sequences(inputs: dict[str, Any]) -> bool:
    """Whether a one-row batch holds several sequences packed together (``DataCollatorWithFlattening``):
    its ``position_ids`` restart, or its ``cu_seq_lens_q`` / ``seq_idx`` name several sequences."""
    positions = inputs.get("position_ids")
    if isinstance(positions, Tensor) and positions.dim() >= 1 and positions.shape[-1] > 1:
        if bool((positions[..., 1:] <= positions[..., :-1]).any()):
            return True
    boundaries = inputs.get("cu_seq_lens_q")
    if isinstance(boundaries, Tensor) and boundaries.numel() > 2:
        return True
    sequence_index = inputs.get("seq_idx")
    return isinstance(sequence_index, Tensor) and int(sequence_index.unique().numel()) > 1


def _compiled_backward_keeps_buffers() -> contextlib.AbstractContextManager[Any]:
    """Context in which ``torch.compile`` (``torch_compile=True`` or a compiled model) keeps the saved buffers.

    By default AOTAutograd "donates" the buffers saved for the backward pass, so a compiled backward may run
    only once (``retain_graph=False``). A JD step differentiates the same graph more than once (the Gramian
    or the Jacobian, then the weighted backward), so donation is disabled while the step traces and runs.
    """
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # a torch without AOTAutograd has no donated buffers either
        return contextlib.nullcontext()
    if not hasattr(functorch_config, "donated_buffer"):
        return contextlib.nullcontext()
    return functorch_config.patch(donated_buffer=False)


def _batch_size(inputs: dict[str, Any]) -> int:
    """The batch size of a batch: the first dimension of its first tensor with one."""
    return next((v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0), 1)


def _first_examples(inputs: dict[str, Any], count: int, batch_size: int) -> dict[str, Any]:
    """The batch cut to its first ``count`` examples (tensors of ``batch_size`` rows; the rest as they are)."""
    return {
        key: value[:count] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size else value
        for key, value in inputs.items()
    }


def _task_label_counts(inputs: dict[str, Any], names: list[str] | None) -> list[int] | None:
    """How many examples of the batch carry each task's label, when the batch has a ``labels_<task>`` tensor for every
    task; else ``None``."""
    if not names:
        return None
    labels = [inputs.get(f"labels_{name}") for name in names]
    tensors = [label for label in labels if isinstance(label, Tensor) and label.dim() > 0]
    if len(tensors) != len(labels):
        return None
    return [_labelled_examples(label, label.shape[0]) for label in tensors]


def _labelled_examples(labels: Any, batch_size: int) -> int:
    """Number of examples whose label is present (not -100 for integers, not NaN for floats)."""
    if not isinstance(labels, Tensor) or labels.dim() == 0:
        return batch_size
    valid = ~torch.isnan(labels) if labels.is_floating_point() else labels != -100
    return int(valid.reshape(labels.shape[0], -1).any(dim=1).sum())
