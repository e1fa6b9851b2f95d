"""Collect the vector of losses of one micro-batch for each Jacobian-descent mode.

The result always has the shape the mode defines: ``[m]`` for ``mtl``, ``[B]`` for ``iwrm`` and
``[B, m]`` for ``iwmtl``; it is cast to float32 (losses computed under bf16/fp16 autocast keep
their graph, only the values are promoted) so that the Gramian and the weights are float32
(float64 losses stay float64).
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..autogram.shared_term import SharedTerm

__all__ = ["LossCollector", "ComputeLosses", "forward_accepts", "forward_declares", "takes_loss_reduction"]

ComputeLosses = Callable[[nn.Module, dict[str, Any]], tuple[Tensor, Any]]


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name`` (explicitly or through ``**kwargs``).

    Parameters
    ----------
    model
        The model.
    name
        The keyword argument.

    Returns
    -------
    bool
        ``True`` also when the signature cannot be read.
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def forward_declares(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` names ``name`` as an explicit parameter (``**kwargs`` does not count).

    Parameters
    ----------
    model
        The model.
    name
        The parameter name.

    Returns
    -------
    bool
        ``False`` also when the signature cannot be read, or ``name`` is positional-only.
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get(name)
    return parameter is not None and parameter.kind not in (
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
        inspect.Parameter.POSITIONAL_ONLY,
    )


def takes_loss_reduction(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a PEFT wrapper holds) asks for ``loss_reduction``.

    True for a :class:`hf_jd.trainer.MultiHeadModel` and for a forward that declares ``loss_reduction``;
    a forward that only has ``**kwargs`` (which may validate or pass them on) does not get it. PEFT
    wrappers and ``torch.compile``'s ``OptimizedModule`` are looked through.

    Parameters
    ----------
    model
        The model, possibly wrapped.

    Returns
    -------
    bool
        Whether to call it with ``loss_reduction="none"`` for per-example task losses.
    """
    from .multi_head import MultiHeadModel

    seen: set[int] = set()
    current: Any = model
    while isinstance(current, nn.Module) and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MultiHeadModel) or forward_declares(current, "loss_reduction"):
            return True
        compiled = getattr(current, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(compiled, nn.Module):
            current = compiled
            continue
        get_base_model = getattr(current, "get_base_model", None)  # PEFT's PeftModel
        current = get_base_model() if callable(get_base_model) else None
    return False


def _output_field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _task_labels_hint(inputs: Mapping[str, Any], unwrapped: nn.Module) -> str:
    """For an iwrm error: the advice to use a multi-task mode when the batch holds ``labels_<task>`` inputs or the model
    is a :class:`MultiHeadModel` (whose task labels the Trainer drops, its forward not declaring them); else ``""``."""
    from .multi_head import MultiHeadModel

    task_labels = sorted(name for name in inputs if name.startswith("labels_"))
    if not task_labels and isinstance(unwrapped, MultiHeadModel):
        task_labels = unwrapped.label_names
    if not task_labels:
        return ""
    return (
        f" The model or batch has task labels {task_labels}: for a multi-task model (e.g. MultiHeadModel) use "
        "jd_mode='iwmtl' (one loss per example and task) or 'mtl' (one per task), with jd_task_names."
    )


def _decoder_inputs_from_labels(model: nn.Module, inputs: dict[str, Any], labels: Any) -> dict[str, Any]:
    """Give an encoder-decoder language model the decoder inputs it would have built from the removed labels.

    Sequence-to-sequence models (T5, BART, ...) derive ``decoder_input_ids`` from ``labels`` (shifted
    right) only when ``labels`` is passed; IWRM removes the labels, so the shift is done here with the
    model's own ``prepare_decoder_input_ids_from_labels``. Inputs that already hold
    ``decoder_input_ids`` or ``decoder_inputs_embeds`` are left unchanged.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not isinstance(labels, Tensor):
        return inputs
    if inputs.get("decoder_input_ids") is not None or inputs.get("decoder_inputs_embeds") is not None:
        return inputs
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        decoder_input_ids = prepare(labels=labels)
    else:
        decoder_input_ids = _shift_with_model_function(model, labels)
    inputs = {**inputs, "decoder_input_ids": decoder_input_ids}
    if "use_cache" not in inputs and forward_accepts(model, "use_cache"):
        inputs["use_cache"] = False  # as the model does when it receives labels (no key/value cache in training)
    return inputs


def _shift_with_model_function(model: nn.Module, labels: Tensor) -> Tensor:
    """``decoder_input_ids`` from ``labels`` with the ``shift_tokens_right`` of the model's own modeling
    module (what e.g. Whisper's and Speech2Text's forward do with labels), for models without
    ``prepare_decoder_input_ids_from_labels``."""
    config = getattr(model, "config", None)
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    for cls in type(model).__mro__:
        shift = getattr(sys.modules.get(cls.__module__), "shift_tokens_right", None)
        if callable(shift) and start is not None and pad is not None:
            return shift(labels, pad, start)
    raise ValueError(
        f"jd_mode='iwrm' removes the labels before the forward pass, but the encoder-decoder model "
        f"{type(model).__name__} has no prepare_decoder_input_ids_from_labels, and no shift_tokens_right with "
        "config.decoder_start_token_id and config.pad_token_id, to build decoder_input_ids from them. Add a "
        "decoder_input_ids column to the dataset, or pass `compute_losses=` to JDTrainer."
    )


class LossCollector:
    """Runs the forward pass of one micro-batch and returns ``(losses, outputs)``.

    Parameters
    ----------
    mode
        ``"mtl"``, ``"iwrm"`` or ``"iwmtl"``.
    task_names
        Task names in row order (``mtl``/``iwmtl``).
    label_names
        Input keys holding labels (``iwrm``: they are removed before the forward so that the model
        does not compute its own reduced loss, then passed to ``per_example_losses``).
    compute_losses
        Optional user function ``(model, inputs) -> (losses, outputs)`` that replaces the built-in
        collection; its losses are checked against the mode's shape all the same.
    label_smoothing
        ``iwrm``: the label smoothing of the per-example cross-entropies (see ``per_example_losses``).
    """

    def __init__(
        self,
        mode: str,
        task_names: Sequence[str] | None,
        label_names: Sequence[str],
        compute_losses: ComputeLosses | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        self.mode = mode
        self.task_names = list(task_names) if task_names else None
        self.label_names = list(label_names) or ["labels"]
        self.compute_losses = compute_losses
        self.label_smoothing = label_smoothing
        # The split of the last call's iwrm losses into the examples' own losses and a term shared by them (a mixture
        # of experts' load-balancing loss), or None: the JD step gives the engine its per-example rows instead.
        self.shared_term: SharedTerm | None = None

    def __call__(
        self, model: nn.Module, unwrapped: nn.Module, inputs: dict[str, Any], *, training: bool = True
    ) -> tuple[Tensor, Any]:
        """Forward ``inputs`` through ``model`` (``unwrapped`` is used for signature/config look-ups).

        With ``training=False`` (evaluation, under ``torch.no_grad``) the losses need not require grad.
        """
        self.shared_term = None
        if self.compute_losses is not None:
            source = "compute_losses"
            # A shallow copy (of the same mapping type, e.g. a BatchEncoding): the usual recipe
            # `labels = inputs.pop("labels")` must not take the labels away from the caller (prediction
            # labels, the per-task label counts of evaluation).
            result = self.compute_losses(model, copy.copy(inputs))
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    f"compute_losses must return a tuple (losses, outputs), got {type(result).__name__}."
                )
            losses, outputs = result
        elif self.mode == "iwrm":
            source = "per_example_losses"
            losses, outputs = self._iwrm(model, unwrapped, inputs)
        else:
            source = "the model output `losses`"
            if self.mode == "iwmtl" and takes_loss_reduction(unwrapped):
                inputs = {**inputs, "loss_reduction": "none"}
            outputs = model(**inputs)
            losses = _output_field(outputs, "losses")
            if losses is None:
                expected = (
                    "dict task -> scalar (or a tensor [m])" if self.mode == "mtl" else "dict task -> [B] (or [B, m])"
                )
                raise ValueError(
                    f"jd_mode={self.mode!r} needs the model output to carry `losses` ({expected}), but "
                    f"{type(outputs).__name__} has none. Return them from the model (MultiHeadModel does) or pass "
                    "`compute_losses=` to JDTrainer."
                )
        if isinstance(losses, Mapping):
            losses = self._stack_task_dict(losses, source)
        return self._check(losses, source, training), outputs

    # ------------------------------------------------------------------ modes
    def _iwrm(self, model: nn.Module, unwrapped: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, Any]:
        from .losses import (
            QA_LABEL_NAMES,
            ctc_logit_lengths,
            detect_model_kind,
            per_example_losses_and_router_term,
            router_loss_split,
        )

        present = [name for name in self.label_names if inputs.get(name) is not None]
        if not present:
            raise ValueError(
                "jd_mode='iwrm' computes one loss per example from the labels, but the batch has no "
                f"{self.label_names or ['labels']} entry. Add labels to the dataset or pass `compute_losses=`. "
                "A label column of another name needs label_names=[its name] in the arguments (the Trainer drops "
                "the columns that the model's forward does not take, label_names excepted)."
                + _task_labels_hint(inputs, unwrapped)
            )
        labels: Any = inputs[present[0]]
        if len(present) > 1:
            if sorted(present) != sorted(QA_LABEL_NAMES) or detect_model_kind(unwrapped) != "question_answering":
                raise ValueError(
                    f"jd_mode='iwrm' supports models with one label input (or start_positions and end_positions "
                    f"for question answering), got {present}. Pass `compute_losses=` to JDTrainer to compute "
                    "per-example losses for this model." + _task_labels_hint(inputs, unwrapped)
                )
            labels = {name: inputs[name] for name in QA_LABEL_NAMES}
        model_inputs = {key: value for key, value in inputs.items() if key not in self.label_names}
        kind = detect_model_kind(unwrapped)
        if kind == "seq2seq_lm":
            # (other encoder-decoder heads, e.g. BART's or T5's sequence classification, build their decoder inputs
            # from input_ids themselves; their labels are no decoder tokens)
            model_inputs = _decoder_inputs_from_labels(unwrapped, model_inputs, labels)
        outputs = model(**model_inputs)
        lengths = ctc_logit_lengths(unwrapped, model_inputs) if kind == "ctc" else None
        losses, router_term = per_example_losses_and_router_term(
            unwrapped, outputs, labels, kind=kind, label_smoothing=self.label_smoothing, logit_lengths=lengths
        )
        if router_term is None:
            return losses, outputs
        self.shared_term = router_loss_split(outputs, losses, router_term)
        return losses + router_term, outputs

    def _stack_task_dict(self, losses: Mapping[str, Tensor], source: str) -> Tensor:
        names = self.task_names
        if names is None:
            raise ValueError(f"{source} is a dict of task losses; set jd_task_names to give their order.")
        missing = [name for name in names if name not in losses]
        extra = [name for name in losses if name not in names]
        if missing or extra:
            raise ValueError(
                f"{source} has tasks {list(losses)} but jd_task_names is {names} "
                f"(missing: {missing}, unexpected: {extra}). Make them match."
            )
        values = [losses[name] for name in names]
        for name, value in zip(names, values):
            if not isinstance(value, Tensor):
                raise TypeError(f"{source}[{name!r}] must be a tensor, got {type(value).__name__}.")
        if self.mode == "mtl":
            bad = [name for name, value in zip(names, values) if value.numel() != 1]
            if bad:
                raise ValueError(
                    f"jd_mode='mtl' expects one scalar loss per task, but {source} has non-scalar losses for "
                    f"{bad} (shapes {[tuple(losses[n].shape) for n in bad]}). Use jd_mode='iwmtl' for per-example "
                    "task losses."
                )
            return torch.stack([value.reshape(()) for value in values])
        shapes = {tuple(value.shape) for value in values}
        if len(shapes) != 1 or any(value.dim() != 1 for value in values):
            raise ValueError(
                f"jd_mode='iwmtl' expects one loss per example for every task (each of shape [B]), got shapes "
                f"{ {n: tuple(losses[n].shape) for n in names} } from {source}."
            )
        return torch.stack(values, dim=1)

    def _check(self, losses: Any, source: str, training: bool) -> Tensor:
        if not isinstance(losses, Tensor):
            raise TypeError(f"{source} must give the losses as a tensor, got {type(losses).__name__}.")
        if training and not losses.requires_grad:
            raise ValueError(
                f"The losses from {source} do not require grad, so no Jacobian exists. Compute them from the "
                "model's outputs inside the forward pass (not under torch.no_grad())."
            )
        m = len(self.task_names) if self.task_names else None
        if self.mode == "mtl":
            ok = losses.dim() == 1 and (m is None or losses.shape[0] == m)
            expected = f"[m] with m = {m} tasks" if m else "[m]"
        elif self.mode == "iwrm":
            ok = losses.dim() == 1
            expected = "[B] (one loss per example)"
        else:
            ok = losses.dim() == 2 and (m is None or losses.shape[1] == m)
            expected = f"[B, m] with m = {m} tasks" if m else "[B, m]"
        if not ok:
            raise ValueError(
                f"jd_mode={self.mode!r} expects losses of shape {expected}, got {tuple(losses.shape)} from {source}."
            )
        if losses.numel() == 0:
            raise ValueError(f"The losses from {source} are empty (shape {tuple(losses.shape)}).")
        if losses.dtype in (torch.float16, torch.bfloat16):
            losses = losses.float()
        return losses
