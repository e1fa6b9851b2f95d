"""Per-example losses of the standard Hugging Face task models.

Instance-wise risk minimisation (IWRM) with Jacobian descent treats the loss of every example of the batch as
one objective (Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization", arXiv:2406.16232).
The Hugging Face task models only return the batch mean, so :func:`per_example_losses` recomputes the loss of
each example from the logits, with exactly the conventions of the models' own losses:

* sequence (and image, audio, video) classification: ``config.problem_type`` decides, and when it is unset,
  it is inferred like the models do: ``num_labels == 1`` -> regression (MSE), integer labels ->
  single-label cross-entropy, otherwise multi-label binary cross-entropy (averaged over the labels);
* multiple choice: cross-entropy of the ``[B, C]`` choice scores against the right choice;
* extractive question answering: the mean of the start and end cross-entropies, positions outside the
  sequence being clamped and ignored as the models do (the labels are the pair ``start_positions``,
  ``end_positions``);
* token classification: mean cross-entropy over the tokens of the example whose label is not ``-100``;
* causal language modelling: logits at position ``t`` predict the label at ``t + 1`` (at ``t`` for XLNet
  and CPM-Ant, as in their losses); mean over the non-ignored shifted labels of the example; a mixture of
  experts run with ``output_router_logits=True`` adds its load-balancing loss times
  ``router_aux_loss_coef`` to every example's loss, as its own loss adds it to the batch mean;
* masked and sequence-to-sequence language modelling (text or speech to text, e.g. Whisper): mean over
  the tokens whose label is not ``-100``;
* CTC speech recognition (``Wav2Vec2ForCTC`` and the like): the connectionist temporal classification loss of the
  example's transcript (labels ``>= 0``) over its valid frames, divided by the transcript's length when
  ``config.ctc_loss_reduction == "mean"`` and times the batch size when it is ``"sum"``, so that the mean over the
  examples is the model's loss in both cases.

An example without any valid label gets the loss 0 (its row of the Jacobian is zero). When every example has
the same number of valid targets, the mean of the per-example losses equals the model's own loss.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.auto import modeling_auto

from ..autogram.shared_term import SharedTerm, split_shared_term

ModelKind = Literal[
    "sequence_classification",
    "multiple_choice",
    "question_answering",
    "token_classification",
    "causal_lm",
    "masked_lm",
    "seq2seq_lm",
    "ctc",
]
MODEL_KINDS: tuple[str, ...] = (
    "sequence_classification",
    "multiple_choice",
    "question_answering",
    "token_classification",
    "causal_lm",
    "masked_lm",
    "seq2seq_lm",
    "ctc",
)
IGNORE_INDEX = -100

_MAPPINGS: dict[str, tuple[str, ...]] = {
    "sequence_classification": (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
        "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
    ),
    "multiple_choice": ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",),
    "question_answering": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",),
    "token_classification": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",),
    # (image- and audio-to-text models: decoder-only ones take the causal LM's shifted loss; encoder-decoder ones, such
    # as VisionEncoderDecoderModel, the seq2seq loss, by the rule on config.is_encoder_decoder)
    "causal_lm": (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    ),
    "masked_lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES",),
    "seq2seq_lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    "ctc": ("MODEL_FOR_CTC_MAPPING_NAMES",),
}
_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "sequence_classification"),
    ("ForImageClassification", "sequence_classification"),
    ("ForAudioClassification", "sequence_classification"),
    ("ForVideoClassification", "sequence_classification"),
    ("ForMultipleChoice", "multiple_choice"),
    ("ForQuestionAnswering", "question_answering"),
    ("ForTokenClassification", "token_classification"),
    ("ForCausalLM", "causal_lm"),
    ("ForMaskedLM", "masked_lm"),
    ("ForCTC", "ctc"),
)


@functools.cache
def _class_names(mapping_name: str) -> frozenset[str]:
    names: set[str] = set()
    for value in getattr(modeling_auto, mapping_name, {}).values():
        names.update((value,) if isinstance(value, str) else value)
    return frozenset(names)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the task model inside DDP/DataParallel (``.module``), ``torch.compile`` and PEFT wrappers.

    Parameters
    ----------
    model
        A model, possibly wrapped (several wrappers may be nested, e.g. DDP around a compiled PEFT model).

    Returns
    -------
    nn.Module
        The innermost model; ``model`` itself when it is not wrapped.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
    return model


def detect_model_kind(model: nn.Module) -> str:
    """Find which standard loss a Hugging Face task model computes.

    The class name is looked up in the transformers auto-model mappings
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and the like), then the names of its base classes (for user
    subclasses of e.g. ``BertForSequenceClassification``), then ``model.config.architectures``; class-name
    suffixes (``...ForCausalLM``, ``...ForTokenClassification``, ...) are the last resort for each name.
    Encoder-decoder models (``config.is_encoder_decoder``) with a language-modelling head are
    ``"seq2seq_lm"``.

    Parameters
    ----------
    model
        The model, possibly wrapped (DDP, ``torch.compile``, PEFT).

    Returns
    -------
    str
        One of :data:`MODEL_KINDS`.

    Raises
    ------
    ValueError
        When the kind is unknown or ambiguous.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    candidates = [cls.__name__ for cls in type(model).__mro__ if issubclass(cls, nn.Module) and cls is not nn.Module]
    candidates += [name for name in (getattr(config, "architectures", None) or []) if name not in candidates]
    for name in candidates:
        kinds = {kind for kind, mappings in _MAPPINGS.items() if any(name in _class_names(m) for m in mappings)}
        if not kinds:
            kinds = {kind for suffix, kind in _SUFFIXES if name.endswith(suffix)}
        if "seq2seq_lm" in kinds or (kinds & {"causal_lm", "masked_lm"} and is_encoder_decoder):
            kinds = {"seq2seq_lm"} if is_encoder_decoder else kinds - {"seq2seq_lm"}
        if len(kinds) == 1:
            return kinds.pop()
        if len(kinds) > 1:
            raise ValueError(
                f"Cannot tell which loss {name} computes: it is registered as {sorted(kinds)}. Pass a "
                "`compute_losses(model, inputs) -> (losses, outputs)` callable to JDTrainer (or, when calling "
                "per_example_losses yourself, kind=...)."
            )
    raise ValueError(
        f"per_example_losses does not know the loss of {type(model).__name__}: supported are the standard "
        f"Hugging Face task models of kinds {list(MODEL_KINDS)} (and image- or audio-to-text models that compute "
        "one of these losses). Pass a `compute_losses(model, inputs) -> (losses, outputs)` callable to JDTrainer "
        "that returns one loss per example (or, when calling per_example_losses yourself, kind=...)."
    )


def _logits_of(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and outputs.get("logits") is not None:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise ValueError(
        "per_example_losses needs the model outputs to carry `logits` (a ModelOutput or dict with 'logits', "
        f"or a tuple whose first item is the logits); got {type(outputs).__name__}."
    )


def _token_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the non-ignored tokens of each example (0 when there is none)."""
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"Token-level losses need logits [B, T, V] and labels [B, T]; got logits {list(logits.shape)} and "
            f"labels {list(labels.shape)}."
        )
    labels = labels.long()
    vocab = logits.shape[-1]
    # ignore_index gives exactly 0 for ignored tokens, and reshape is a view of contiguous logits (no copy).
    losses = F.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none",
        label_smoothing=label_smoothing,
    ).reshape(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(dim=-1)
    return losses.sum(dim=-1) / counts.clamp(min=1)


def _masked_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Cross-entropy of each row of ``[B, C]`` logits against its class index; 0 for a row labelled -100."""
    valid = labels != IGNORE_INDEX
    losses = F.cross_entropy(logits, torch.where(valid, labels, 0), reduction="none", label_smoothing=label_smoothing)
    return torch.where(valid, losses, torch.zeros_like(losses))


def _problem_type(config: Any, labels: Tensor) -> str:
    problem_type = getattr(config, "problem_type", None)
    if problem_type is not None:
        return problem_type
    num_labels = getattr(config, "num_labels", None)
    if num_labels == 1:
        problem_type = "regression"
    elif labels.dtype in (torch.long, torch.int):
        problem_type = "single_label_classification"
    else:
        problem_type = "multi_label_classification"
    if config is not None and hasattr(config, "problem_type"):
        # Recorded, as the models' own loss does: a saved model then keeps it (pipelines read it).
        config.problem_type = problem_type
    return problem_type


def _sequence_classification_losses(
    config: Any, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    batch = logits.shape[0]
    logits = logits.reshape(batch, -1)
    problem_type = _problem_type(config, labels)
    if label_smoothing and problem_type != "single_label_classification":
        raise ValueError(
            f"Label smoothing applies to single-label classification, not to {problem_type} (the Trainer's "
            "LabelSmoother cannot smooth it either): set label_smoothing_factor=0."
        )
    if problem_type == "single_label_classification":
        labels = labels.reshape(-1).long()
        if labels.shape[0] != batch:
            raise ValueError(
                f"Single-label classification needs one label per example, got labels {list(labels.shape)}."
            )
        return _masked_cross_entropy(logits, labels, label_smoothing)
    labels = labels.reshape(batch, -1).to(logits.dtype)
    if labels.shape != logits.shape:
        raise ValueError(
            f"{problem_type} needs labels of shape {list(logits.shape)} (one per output), got {list(labels.shape)}."
        )
    if problem_type == "regression":
        return ((logits - labels) ** 2).mean(dim=-1)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=-1)
    raise ValueError(
        f"Unknown config.problem_type {problem_type!r}; use 'regression', 'single_label_classification' or "
        "'multi_label_classification'."
    )


def _multiple_choice_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of the ``[B, C]`` choice scores against the index of the right choice (0 for an
    example labelled -100)."""
    batch = logits.shape[0]
    logits = logits.reshape(batch, -1)
    labels = labels.reshape(-1).long()
    if labels.shape[0] != batch:
        raise ValueError(f"Multiple choice needs one label (the right choice) per example, got {list(labels.shape)}.")
    return _masked_cross_entropy(logits, labels, label_smoothing)


#: The label inputs of extractive question answering, in the order of a ``[B, 2]`` labels tensor.
QA_LABEL_NAMES: tuple[str, str] = ("start_positions", "end_positions")


def _question_answering_positions(labels: Any) -> tuple[Tensor, Tensor]:
    """``(start_positions, end_positions)`` from a pair, a mapping with those keys or a ``[B, 2]`` tensor."""
    if isinstance(labels, Mapping) and all(isinstance(labels.get(name), Tensor) for name in QA_LABEL_NAMES):
        return labels[QA_LABEL_NAMES[0]], labels[QA_LABEL_NAMES[1]]
    if isinstance(labels, (tuple, list)) and len(labels) == 2 and all(isinstance(item, Tensor) for item in labels):
        return labels[0], labels[1]
    if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[1] == 2:
        return labels[:, 0], labels[:, 1]
    described = f"a tensor of shape {list(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
    raise ValueError(
        "Question answering needs both start_positions and end_positions: pass labels=(start_positions, "
        f"end_positions), a mapping with those keys or a [B, 2] tensor; got {described}. With JDTrainer, keep both "
        "columns in the dataset (and in label_names, which the Trainer sets to them by default)."
    )


def _span_logits(outputs: Any) -> tuple[Tensor, Tensor]:
    if isinstance(outputs, Mapping):
        start, end = outputs.get("start_logits"), outputs.get("end_logits")
    elif isinstance(outputs, (tuple, list)) and len(outputs) >= 2:
        start, end = outputs[0], outputs[1]
    else:
        start, end = getattr(outputs, "start_logits", None), getattr(outputs, "end_logits", None)
    if not (isinstance(start, Tensor) and isinstance(end, Tensor)):
        raise ValueError(
            "Question-answering losses need the model outputs to carry `start_logits` and `end_logits` (a "
            "ModelOutput or dict with those keys, or a tuple (start_logits, end_logits)); got "
            f"{type(outputs).__name__}. For such a model pass a `compute_losses(model, inputs) -> (losses, outputs)` "
            "callable to JDTrainer."
        )
    return start, end


def _question_answering_losses(outputs: Any, labels: Any) -> Tensor:
    """Per example, the mean of its start and end cross-entropies over the positions inside the sequence.

    As in the models' loss, positions are clamped to ``[0, T]`` and ``T`` (beyond the sequence) is ignored;
    when both are valid this is the model's own loss on that example alone. An example with neither gets 0.
    """
    starts, ends = _question_answering_positions(labels)
    start_logits, end_logits = _span_logits(outputs)
    batch = start_logits.shape[0]
    start_logits, end_logits = start_logits.reshape(batch, -1).float(), end_logits.reshape(batch, -1).float()
    length = start_logits.shape[1]
    total = torch.zeros(batch, device=start_logits.device)
    count = torch.zeros(batch, device=start_logits.device)
    for logits, positions in ((start_logits, starts), (end_logits, ends)):
        positions = positions.to(logits.device).reshape(-1).long()
        if positions.shape[0] != batch:
            raise ValueError(
                f"Question answering needs one start and one end position per example, got positions of shape "
                f"{list(positions.shape)} for a batch of {batch}."
            )
        positions = positions.clamp(0, length)
        valid = positions != length
        losses = F.cross_entropy(logits, torch.where(valid, positions, 0), reduction="none")
        total = total + torch.where(valid, losses, torch.zeros_like(losses))
        count = count + valid.float()
    return total / count.clamp(min=1)


# Causal LMs whose own loss compares position t's logits with the label at t (no shift): XLNet's permutation LM and
# CPM-Ant (found by reading the loss code of every model of transformers' causal-LM mapping).
_UNSHIFTED_CAUSAL_LMS = frozenset({"XLNetLMHeadModel", "CpmAntForCausalLM"})


def _predicts_its_own_position(model: nn.Module) -> bool:
    """Whether a causal LM's loss takes the labels unshifted (see :data:`_UNSHIFTED_CAUSAL_LMS`)."""
    return any(cls.__name__ in _UNSHIFTED_CAUSAL_LMS for cls in type(unwrap_model(model)).__mro__)


def _router_loss(model: nn.Module, outputs: Any) -> Tensor | None:
    """The load-balancing term a mixture-of-experts causal LM adds to its loss (``coefficient * aux_loss``, returned
    when ``output_router_logits=True``), or ``None`` when the outputs hold no ``aux_loss``.

    The term is one number for the whole batch (it balances the routing of all its tokens): every example's loss
    gets it, so that the mean of the per-example losses is the model's loss again.
    """
    aux_loss = outputs.get("aux_loss") if isinstance(outputs, Mapping) else getattr(outputs, "aux_loss", None)
    if not isinstance(aux_loss, Tensor):
        return None
    unwrapped = unwrap_model(model)
    config = getattr(unwrapped, "config", None)
    text_config = getattr(config, "text_config", None)
    for owner, name in (
        (unwrapped, "router_aux_loss_coef"),
        (unwrapped, "aux_loss_coef"),  # (JetMoE)
        (config, "router_aux_loss_coef"),
        (text_config, "router_aux_loss_coef"),
    ):
        coefficient = getattr(owner, name, None)
        if isinstance(coefficient, (int, float)):
            return coefficient * aux_loss
    raise ValueError(
        f"{type(unwrapped).__name__} returned a router aux_loss (output_router_logits=True), which its own loss adds "
        "with a coefficient, but hf_jd found no router_aux_loss_coef on the model or its config. Pass "
        "`compute_losses=` to JDTrainer to add it yourself, or set output_router_logits=False."
    )


def ctc_logit_lengths(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor | None:
    """Number of valid frames of each example's CTC logits, from the ``attention_mask`` of the model's inputs (the
    samples' mask, mapped to frames by the model's own ``_get_feat_extract_output_lengths``, as its loss does).

    Parameters
    ----------
    model
        The CTC model, possibly wrapped.
    inputs
        The model's inputs.

    Returns
    -------
    Tensor or None
        ``[B]`` frame counts, or ``None`` without an attention mask (every frame is valid).

    Raises
    ------
    ValueError
        When the inputs have an attention mask that the model gives no way to map to frames.
    """
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    unwrapped = unwrap_model(model)
    lengths_of = getattr(unwrapped, "_get_feat_extract_output_lengths", None)
    if not callable(lengths_of):
        raise ValueError(
            f"{type(unwrapped).__name__} has no _get_feat_extract_output_lengths to map the attention mask of its "
            "inputs to valid frames of its CTC logits. Pass `compute_losses=` to JDTrainer, computing "
            "F.ctc_loss(..., reduction='none') with the model's input lengths."
        )
    return lengths_of(mask.sum(-1)).to(torch.long)


def _ctc_losses(model: nn.Module, logits: Tensor, labels: Tensor, logit_lengths: Tensor | None) -> Tensor:
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"A CTC model needs logits [B, frames, V] and labels [B, L]; got logits {list(logits.shape)} and labels "
            f"{list(labels.shape)}."
        )
    config = getattr(unwrap_model(model), "config", None)
    vocab = logits.shape[-1]
    if labels.numel() and int(labels.max()) >= vocab:
        raise ValueError(f"CTC labels must be below the vocabulary size {vocab}, got {int(labels.max())}.")
    blank = getattr(config, "pad_token_id", None)
    reduction = getattr(config, "ctc_loss_reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"config.ctc_loss_reduction must be 'mean' or 'sum', got {reduction!r}.")
    batch, frames = logits.shape[:2]
    if logit_lengths is None:
        logit_lengths = torch.full((batch,), frames, dtype=torch.long, device=logits.device)
    valid = labels >= 0
    target_lengths = valid.sum(-1)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):  # (as the models' loss: cuDNN's CTC has other constraints)
        losses = F.ctc_loss(
            log_probs,
            labels.masked_select(valid),
            logit_lengths.to(device=logits.device, dtype=torch.long),
            target_lengths,
            blank=0 if blank is None else int(blank),
            reduction="none",
            zero_infinity=bool(getattr(config, "ctc_zero_infinity", False)),
        )
    if reduction == "mean":  # (torch's mean: each loss over its transcript's length, then the batch mean)
        return losses / target_lengths.clamp(min=1)
    return losses * batch


def per_example_losses(
    model: nn.Module,
    outputs: Any,
    labels: Any,
    kind: str | None = None,
    label_smoothing: float = 0.0,
    logit_lengths: Tensor | None = None,
) -> Tensor:
    """Loss of every example of the batch, computed from the outputs of a Hugging Face task model.

    Parameters
    ----------
    model
        The task model that produced ``outputs`` (e.g. ``BertForSequenceClassification``,
        ``GPT2LMHeadModel``); wrappers (DDP, ``torch.compile``, PEFT) are looked through. Its kind is found
        with :func:`detect_model_kind` unless ``kind`` is given.
    outputs
        What the model returned when called **without** labels: a ``ModelOutput``/dict with ``logits``, or
        a tuple whose first item is the logits.
    labels
        The labels the model would have taken (``[B]`` or ``[B, num_labels]`` for sequence classification,
        ``[B]`` choice indices for multiple choice, ``[B, T]`` for token-level tasks, ``-100`` marking
        ignored positions). Labels are not shifted for
        causal LMs: the shift happens here, as in the models (except XLNet and CPM-Ant, whose losses take
        the labels as given). Question answering takes the pair
        ``(start_positions, end_positions)`` (or a mapping with those keys, or a ``[B, 2]`` tensor).
    kind
        Force the loss: one of :data:`MODEL_KINDS`.
    label_smoothing
        Label smoothing ``ε`` of the cross-entropies (the Trainer's ``label_smoothing_factor``): each token's or
        example's loss is ``(1 - ε)`` times its negative log-likelihood plus ``ε`` times the mean over the classes
        of ``-log p``, as the Trainer's ``LabelSmoother`` computes it (which also shifts causal LMs' labels).
        Classification, multiple choice and token-level models only.
    logit_lengths
        CTC only: the number of valid frames of each example's logits (:func:`ctc_logit_lengths`); by default all.

    Returns
    -------
    Tensor
        ``[B]`` float32 losses, connected to the graph of ``outputs``. An example without any valid label
        has the loss 0.

    Raises
    ------
    ValueError
        Unknown model kind (pass ``compute_losses`` to JDTrainer), or logits/labels of the wrong shape.
    """
    own, router_term = per_example_losses_and_router_term(model, outputs, labels, kind, label_smoothing, logit_lengths)
    return own if router_term is None else own + router_term


def per_example_losses_and_router_term(
    model: nn.Module,
    outputs: Any,
    labels: Any,
    kind: str | None = None,
    label_smoothing: float = 0.0,
    logit_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`per_example_losses` as the examples' own losses and the load-balancing term a mixture-of-experts causal
    LM adds to each of them (``None`` for other models, or without ``output_router_logits``)."""
    if kind is None:
        kind = detect_model_kind(model)
    elif kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {list(MODEL_KINDS)}, got {kind!r}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if kind == "question_answering":
        if label_smoothing:
            raise ValueError(
                "Label smoothing does not apply to question answering (the Trainer's LabelSmoother cannot smooth "
                "start and end positions either): set label_smoothing_factor=0."
            )
        return _question_answering_losses(outputs, labels), None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    logits = _logits_of(outputs).float()
    labels = labels.to(logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels have batch size {labels.shape[0]} but the logits have {logits.shape[0]}.")
    if kind == "ctc":
        if label_smoothing:
            raise ValueError("Label smoothing does not apply to the CTC loss: set label_smoothing_factor=0.")
        return _ctc_losses(model, logits, labels, logit_lengths), None
    if kind == "sequence_classification":
        config = getattr(unwrap_model(model), "config", None)
        return _sequence_classification_losses(config, logits, labels, label_smoothing), None
    if kind == "multiple_choice":
        return _multiple_choice_losses(logits, labels, label_smoothing), None
    if kind == "causal_lm":
        if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"A causal LM needs logits [B, T, V] and labels [B, T]; got logits {list(logits.shape)} and "
                f"labels {list(labels.shape)}."
            )
        if not _predicts_its_own_position(model):
            # Position t predicts the label at t + 1; the last position predicts nothing (as in ForCausalLMLoss).
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        losses = _token_losses(logits, labels, label_smoothing)
        router_loss = _router_loss(model, outputs)
        return losses, None if router_loss is None else router_loss.to(losses)
    return _token_losses(logits, labels, label_smoothing), None


def router_loss_split(outputs: Any, own: Tensor, term: Tensor) -> SharedTerm | None:
    """The split of the per-example losses ``own + term`` of a mixture-of-experts causal LM, with ``term`` its
    load-balancing loss times its coefficient, by the router logits through which alone that term depends on the
    parameters (see :mod:`hf_jd.autogram.shared_term`), or ``None`` when it depends on them otherwise.

    Parameters
    ----------
    outputs
        The model's outputs (with ``router_logits``).
    own, term
        What :func:`per_example_losses_and_router_term` returned for them.

    Returns
    -------
    SharedTerm or None
        The split, or ``None``.
    """
    logits = outputs.get("router_logits") if isinstance(outputs, Mapping) else getattr(outputs, "router_logits", None)
    return split_shared_term(own, term, [logits])
