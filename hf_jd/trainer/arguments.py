"""`JDTrainingArguments`: the Trainer's arguments plus the Jacobian-descent options.

Every ``jd_*`` field is an ordinary dataclass field with ``metadata["help"]``, so
``HfArgumentParser((JDTrainingArguments,))`` exposes it on the command line exactly like any other
Trainer flag (``--jd_aggregator mgda --jd_aggregator_kwargs '{"epsilon": 1e-4}'``), and the object
serialises (``to_dict``, ``to_json_string``, ``torch.save`` as ``training_args.bin``) like any
:class:`transformers.TrainingArguments`.
"""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import TrainingArguments

from ..aggregation import Aggregator, available_aggregators, check_fits_rows, get_aggregator, is_gramian_based
from ._distributed import resolve_ddp_gramian

__all__ = ["JDTrainingArguments", "JD_MODES", "JD_ENGINES", "JD_NONFINITE", "JD_DDP_GRAMIAN"]

JD_MODES = ("mtl", "iwrm", "iwmtl")
JD_ENGINES = ("auto", "autogram", "autojac")
JD_NONFINITE = ("raise", "skip")
JD_DDP_GRAMIAN = ("auto", "global", "local")

#: Optimizers that update the parameters inside the backward pass (transformers' ``OptimizerNames`` values).
_FUSED_BACKWARD_OPTIMIZERS = ("lomo", "adalomo")


def _did_you_mean(value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest valid name (case, ``-`` and ``_`` aside), or ``""``."""
    if not isinstance(value, str):
        return ""

    def key(text: str) -> str:
        return text.strip().lower().replace("-", "").replace("_", "")

    keyed = {key(choice): choice for choice in choices}
    close = difflib.get_close_matches(key(value), list(keyed), n=1, cutoff=0.6)
    return f" Did you mean {keyed[close[0]]!r}?" if close else ""


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:  # (any case, as aggregator names)
        return value.strip().lower()
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{name}={value!r} is not valid: choose one of {', '.join(map(repr, choices))}."
            + _did_you_mean(value, choices)
        )
    return value


def _parse_kwargs(value: Any) -> dict[str, Any]:
    """Turn ``jd_aggregator_kwargs`` (None, a dict or a JSON object string) into a dict."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"jd_aggregator_kwargs must be a JSON object such as '{{\"norm_eps\": 1e-4}}', got {text!r} "
                f"({error.msg})."
            ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"jd_aggregator_kwargs must be a dict (or a JSON object string), got {type(value).__name__}."
        )
    bad_keys = [key for key in value if not isinstance(key, str)]
    if bad_keys:
        raise ValueError(f"jd_aggregator_kwargs keys must be strings, got {bad_keys!r}.")
    return {key: _json_friendly(item) for key, item in value.items()}


def _json_friendly(value: Any) -> Any:
    """Tensors and NumPy arrays/scalars (also inside lists, tuples and dicts) as plain Python lists/numbers.

    The arguments are serialised with ``to_json_string`` (TensorBoard/W&B callbacks, ``trainer_state``) and
    the aggregators accept sequences wherever they accept tensors (e.g. ``pref_vector``).
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _json_friendly(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_friendly(item) for item in value]
    return value


def _split_commas(text: str) -> list[str]:
    """Split at the commas that are not inside an fnmatch bracket (``layer.[0,1]`` stays whole)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _parse_names(name: str, value: Any) -> list[str] | None:
    """Accept None, a list of strings or a comma-separated string; return a list or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return _split_commas(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}.")
    # Comma-separated items are split in lists too: the command line `--jd_task_names a,b` gives ['a,b'].
    return [part for item in value for part in _split_commas(item)]


@dataclass
class JDTrainingArguments(TrainingArguments):
    """:class:`transformers.TrainingArguments` with the options of Jacobian descent (JD).

    JD (Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization", arXiv 2406.16232)
    replaces the gradient of one scalar loss by an aggregation of the Jacobian of a vector of
    losses. All JD options start with ``jd_``; the rest is the Trainer's own configuration.

    Invalid combinations raise ``ValueError`` when the object is built (``__post_init__``) with a
    message that says what to change.

    Notes
    -----
    ``jd_mode`` selects what the rows of the Jacobian are:

    - ``"mtl"``: one loss per task (the model output carries ``losses``; shape ``[m]``).
    - ``"iwrm"``: instance-wise risk minimisation, one loss per example (shape ``[B]``).
    - ``"iwmtl"``: one loss per (example, task) pair (shape ``[B, m]``).
    """

    jd_mode: str = field(
        default="iwrm",
        metadata={
            "help": "What the rows of the Jacobian are: 'mtl' (one loss per task, the model returns `losses`), "
            "'iwrm' (one loss per example, from the standard outputs of a HF task model) or 'iwmtl' (one loss per "
            "example and task, shape [B, m]).",
            "choices": list(JD_MODES),
        },
    )
    jd_aggregator: str = field(
        default="upgrad",
        metadata={
            "help": f"Name of the aggregator of the Jacobian. One of: {', '.join(available_aggregators())}; or a name "
            "given to an aggregator of your own with hf_jd.aggregation.register_aggregator."
        },
    )
    jd_aggregator_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the aggregator's constructor, as a dict or a JSON object string, "
            'e.g. \'{"norm_eps": 1e-4}\'. Tensors and NumPy arrays in it are stored as lists (JSON-serialisable).'
        },
    )
    jd_engine: str = field(
        default="auto",
        metadata={
            "help": "How the step is computed: 'autogram' (Gramian of the Jacobian during the backward pass, "
            "then a weighted backward; Gramian-based aggregators only), 'autojac' (explicit Jacobian) or 'auto' "
            "(autogram if the aggregator is Gramian-based, else autojac).",
            "choices": list(JD_ENGINES),
        },
    )
    jd_task_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the tasks, in the order of the Jacobian's rows (required for jd_mode 'mtl' and "
            "'iwmtl'). Used to read the `losses` dict of the model output and to name logged metrics. Comma-separated "
            "names are split ('a,b' gives ['a', 'b'])."
        },
    )
    jd_update_weights_every: int = field(
        default=1,
        metadata={
            "help": "Recompute the aggregation weights every k optimizer steps and reuse them in between with a "
            "plain weighted backward (no Jacobian, no Gramian). Needs a Gramian-based aggregator when k > 1. The "
            "weights reused are those of the last micro-batch that computed them (with gradient accumulation, every "
            "micro-batch of a reuse step gets that one's weights, position by position)."
        },
    )
    jd_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names or fnmatch patterns of the submodules whose parameters the Jacobian covers (default: "
            "the whole model). The other trainable parameters get the weighted gradient. Comma-separated names are "
            "split."
        },
    )
    jd_nonfinite: str = field(
        default="raise",
        metadata={
            "help": "What to do when a loss (or the Gramian / Jacobian) is inf or nan: 'raise' an error naming the "
            "task and step, or 'skip' the micro-batch (zero contribution, counted in `jd/skipped_steps`).",
            "choices": list(JD_NONFINITE),
        },
    )
    jd_log_weights: bool = field(
        default=True,
        metadata={
            "help": "Log the aggregation weights, per-task losses and conflict statistics of the Gramian "
            "(`jd/weight_*`, `loss_<task>`, `jd/conflicting_pairs`, `jd/min_cosine`)."
        },
    )
    jd_ddp_gramian: str = field(
        default="auto",
        metadata={
            "help": "Multi-process (DDP) training: 'global' computes the Gramian of the task losses averaged over "
            "all processes (the step of one process on the global batch; jd_mode 'mtl' only), 'local' lets each "
            "process weight its own batch and DDP average the updates, 'auto' is 'global' for 'mtl' and 'local' "
            "otherwise. With one process it makes no difference.",
            "choices": list(JD_DDP_GRAMIAN),
        },
    )

    jd_single_backward: bool = field(
        default=False,
        metadata={
            "help": "autogram only: write the weighted gradient from the per-layer factors the Gramian pass "
            "captured (layer inputs and output gradients), bypassing the second backward pass through the network "
            "(and accelerate's backward: the loss-scale and accumulation factors are applied by hand). Faster (e.g. "
            "1.09-1.32x a plain step instead of 1.43-1.78x when training LoRA adapters on an H200); holds every "
            "layer's output gradients until the update, so it may use more memory."
        },
    )

    jd_freeze_batch_norm: bool = field(
        default=False,
        metadata={
            "help": "Keep every batch norm of the model in evaluation mode while training (running statistics "
            "frozen and used to normalise), as when fine-tuning a convolutional backbone: the per-example losses of "
            "iwrm/iwmtl are then independent, which the autogram engine needs (a batch norm in training mode mixes "
            "the examples and is rejected), and its closed form applies."
        },
    )

    jd_reset_aggregator_state: bool = field(
        default=False,
        metadata={
            "help": "When resuming from a checkpoint, start the aggregator from its initial state instead of the "
            "one saved in the checkpoint: to switch aggregators on purpose, or to resume a checkpoint saved without "
            "JDTrainer with a stateful aggregator (pcgrad, gradvac, nash_mtl, graddrop, random)."
        },
    )

    def __post_init__(self) -> None:
        self._validate_jd_arguments()
        super().__post_init__()

    # ------------------------------------------------------------------ validation
    def _validate_jd_arguments(self) -> None:
        # Unsupported back-ends first: DeepSpeed/FSDP set-up in the parent __post_init__ would
        # otherwise fail later with a less clear message (or import missing packages).
        if self.deepspeed:
            raise ValueError(
                "JDTrainer does not support DeepSpeed: the Jacobian/Gramian of the losses needs the full, "
                "unsharded parameters. Remove `deepspeed` from the training arguments."
            )
        if self.fsdp:
            raise ValueError(
                "JDTrainer does not support FSDP: the Jacobian/Gramian of the losses needs the full, "
                "unsharded parameters. Remove `fsdp` from the training arguments (use DDP instead)."
            )

        self.jd_mode = _check_choice("jd_mode", self.jd_mode, JD_MODES)
        self.jd_engine = _check_choice("jd_engine", self.jd_engine, JD_ENGINES)
        self.jd_nonfinite = _check_choice("jd_nonfinite", self.jd_nonfinite, JD_NONFINITE)
        self.jd_ddp_gramian = _check_choice("jd_ddp_gramian", self.jd_ddp_gramian, JD_DDP_GRAMIAN)
        resolve_ddp_gramian(self.jd_ddp_gramian, self.jd_mode)  # 'global' with iwrm/iwmtl is not implemented

        if not isinstance(self.jd_aggregator, str):
            raise ValueError(
                f"jd_aggregator must be a string name, got {type(self.jd_aggregator).__name__} (the arguments are "
                "saved and parsed as text). Give a built-in aggregator's name with its constructor's arguments as "
                "jd_aggregator_kwargs (e.g. jd_aggregator='upgrad', jd_aggregator_kwargs={'reg_eps': 1e-3}), or "
                "give a class of your own a name first with hf_jd.aggregation.register_aggregator(name, "
                "aggregator_class) or register_aggregator(name, weighting=weighting_class)."
            )
        name = self.jd_aggregator.strip().lower().replace("-", "_")
        if name not in available_aggregators():
            suggestion = _did_you_mean(self.jd_aggregator, available_aggregators())
            raise ValueError(
                f"Unknown jd_aggregator {self.jd_aggregator!r}.{suggestion} Valid names are: "
                f"{', '.join(available_aggregators())}. (An aggregator of your own takes a name with "
                "hf_jd.aggregation.register_aggregator, before the arguments are built.)"
            )
        self.jd_aggregator = name
        self.jd_aggregator_kwargs = _parse_kwargs(self.jd_aggregator_kwargs)
        try:
            with torch.random.fork_rng(devices=[]):  # (a seedless aggregator draws its seed: not the user's stream)
                aggregator = get_aggregator(name, **self.jd_aggregator_kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"jd_aggregator_kwargs={self.jd_aggregator_kwargs!r} are not valid for aggregator {name!r}: "
                f"{str(error).rstrip('.')}. Fix `jd_aggregator_kwargs`."
            ) from error

        if self.label_smoothing_factor != 0 and self.jd_mode != "iwrm":
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} cannot apply to the task losses of "
                f"jd_mode={self.jd_mode!r}, which the model computes and JDTrainer takes as they are: set "
                "label_smoothing_factor=0 and smooth them where they are computed (e.g. "
                "F.cross_entropy(..., label_smoothing=0.1, reduction='none') in the heads). With jd_mode='iwrm' and "
                "the built-in per-example losses, label_smoothing_factor applies to them."
            )

        gramian_based = is_gramian_based(name)
        if self.jd_engine == "autogram" and not gramian_based:
            raise ValueError(
                f"jd_engine='autogram' needs a Gramian-based aggregator, but {name!r} is not one. Use "
                "jd_engine='autojac' (or 'auto'), or a Gramian-based aggregator such as 'upgrad'."
            )

        # ``activation_checkpointing`` is the newer name of ``gradient_checkpointing`` (older
        # transformers releases have only the latter).
        checkpointing = getattr(self, "activation_checkpointing", False) or self.gradient_checkpointing
        if checkpointing and self._checkpointing_is_reentrant():
            raise ValueError(
                "Reentrant gradient checkpointing (use_reentrant=True in gradient_checkpointing_kwargs / "
                "activation_checkpointing_kwargs) does not work with Jacobian descent: the Jacobian is computed "
                "with torch.autograd.grad, which reentrant checkpointing rejects. Use "
                "activation_checkpointing_kwargs / gradient_checkpointing_kwargs={'use_reentrant': False} "
                "(transformers' default), which works with both engines."
            )

        optimizer = str(getattr(self.optim, "value", self.optim)).lower()
        if optimizer in _FUSED_BACKWARD_OPTIMIZERS:
            raise ValueError(
                f"optim={optimizer!r} is not supported by JDTrainer: LOMO/AdaLomo update the parameters inside the "
                "backward pass, while Jacobian descent differentiates the losses more than once and writes the "
                "aggregated update to .grad first. Choose an optimizer that reads .grad, e.g. optim='adamw_torch'."
            )

        self.jd_task_names = _parse_names("jd_task_names", self.jd_task_names)
        if self.jd_task_names is not None:
            duplicates = sorted({n for n in self.jd_task_names if self.jd_task_names.count(n) > 1})
            if duplicates:
                raise ValueError(f"jd_task_names has duplicates: {duplicates}. Give each task one unique name.")
        if self.jd_mode in ("mtl", "iwmtl") and not self.jd_task_names:
            raise ValueError(
                f"jd_mode={self.jd_mode!r} needs jd_task_names (the tasks in the order of the Jacobian's rows), "
                "e.g. jd_task_names=['a', 'b'] or `--jd_task_names a b`."
            )
        self._check_aggregator_fits_rows(name, aggregator)
        if self.jd_mode == "iwrm" and self.jd_task_names:
            warnings.warn(
                f"jd_task_names={self.jd_task_names} is ignored with jd_mode='iwrm' (one loss per example). For "
                "one loss per example and task use jd_mode='iwmtl'; for task losses, jd_mode='mtl'.",
                UserWarning,
                stacklevel=3,
            )

        if isinstance(self.jd_update_weights_every, bool) or not isinstance(self.jd_update_weights_every, int):
            raise ValueError(
                f"jd_update_weights_every must be an integer >= 1, got {self.jd_update_weights_every!r}."
            )
        if self.jd_update_weights_every < 1:
            raise ValueError(
                f"jd_update_weights_every must be >= 1 (1 = recompute the weights at every step), got "
                f"{self.jd_update_weights_every}."
            )
        if self.jd_update_weights_every > 1 and not gramian_based:
            raise ValueError(
                f"jd_update_weights_every={self.jd_update_weights_every} reuses the aggregation weights, but "
                f"aggregator {name!r} is not Gramian-based and has no weights. Use jd_update_weights_every=1 or a "
                "Gramian-based aggregator."
            )

        self.jd_modules = _parse_names("jd_modules", self.jd_modules)
        if self.jd_modules is not None and len(self.jd_modules) == 0:
            raise ValueError("jd_modules is empty: give at least one module name or pattern, or leave it unset.")
        if not isinstance(self.jd_single_backward, bool):
            raise ValueError(f"jd_single_backward must be a bool, got {self.jd_single_backward!r}.")
        if self.jd_single_backward and self.jd_resolved_engine != "autogram":
            raise ValueError(
                f"jd_single_backward=True needs the autogram engine, but the engine is {self.jd_resolved_engine!r} "
                f"(jd_engine={self.jd_engine!r}, aggregator {name!r}). Use a Gramian-based aggregator with "
                "jd_engine='autogram' or 'auto', or set jd_single_backward=False."
            )
        if not isinstance(self.jd_log_weights, bool):
            raise ValueError(f"jd_log_weights must be a bool, got {self.jd_log_weights!r}.")
        if not isinstance(self.jd_freeze_batch_norm, bool):
            raise ValueError(f"jd_freeze_batch_norm must be a bool, got {self.jd_freeze_batch_norm!r}.")
        if not isinstance(self.jd_reset_aggregator_state, bool):
            raise ValueError(f"jd_reset_aggregator_state must be a bool, got {self.jd_reset_aggregator_state!r}.")

    # ------------------------------------------------------------------ helpers
    def _check_aggregator_fits_rows(self, name: str, aggregator: Aggregator) -> None:
        """An aggregator whose arguments need another number of rows than the Jacobian of a step has (constant
        weights, a preference vector, Krum's ``n_byzantine``) fails now, not at the first step: one row per task
        (``mtl``), per example of a full batch (``iwrm``) or both (``iwmtl``). Checked on a random Jacobian, without
        touching the global random state; not with ``auto_find_batch_size`` (the batch size may change). ``aggregator``
        is the one built to check the arguments, used only here."""
        tasks = len(self.jd_task_names or ())
        batch = self.per_device_train_batch_size
        if self.jd_mode != "mtl" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            return  # (the Trainer reports a bad batch size)
        if self.jd_mode == "mtl" and tasks:
            rows, what = tasks, f"the {tasks} tasks of jd_task_names {self.jd_task_names} (one row each)"
        elif self.jd_mode == "iwrm" and not self.auto_find_batch_size:
            rows, what = batch, f"the {batch} examples of a batch (per_device_train_batch_size, one row each)"
        elif self.jd_mode == "iwmtl" and tasks and not self.auto_find_batch_size:
            rows = batch * tasks
            what = f"the {batch} examples x {tasks} tasks of a batch (per_device_train_batch_size, jd_task_names)"
        else:
            return
        try:
            check_fits_rows(aggregator, rows)
        except ValueError as error:
            raise ValueError(
                f"jd_aggregator={name!r} with jd_aggregator_kwargs={self.jd_aggregator_kwargs!r} does not fit "
                f"{what} with jd_mode={self.jd_mode!r}: {error}"
            ) from error

    def _checkpointing_is_reentrant(self) -> bool:
        """Whether the checkpointing kwargs ask for ``use_reentrant=True`` (given as a dict or a JSON string)."""
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            kwargs = getattr(self, name, None)
            if isinstance(kwargs, str) and kwargs.strip().startswith("{"):
                try:
                    kwargs = json.loads(kwargs)
                except json.JSONDecodeError:
                    continue  # the Trainer's own parsing reports it
            if isinstance(kwargs, dict) and kwargs.get("use_reentrant") in (True, "true", "True"):
                return True
        return False

    @property
    def jd_resolved_engine(self) -> str:
        """The engine actually used: ``"autogram"`` or ``"autojac"`` (``"auto"`` resolved)."""
        if self.jd_engine != "auto":
            return self.jd_engine
        return "autogram" if is_gramian_based(self.jd_aggregator) else "autojac"
