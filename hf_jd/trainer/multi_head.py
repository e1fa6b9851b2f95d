"""A shared backbone with named task heads, for multi-task Jacobian descent.

:class:`MultiHeadModel` wraps any ``AutoModel`` backbone (BERT, GPT-2, ...) and adds one small head per
task. Every head reads its targets from the input ``labels_<task>`` and the model returns one loss per task,
which is what Jacobian descent needs: the rows of the Jacobian are the gradients of these task losses
(``loss_reduction="mean"``, one loss per task) or of the per-example task losses (``loss_reduction="none"``,
one loss per example and task, i.e. instance-wise multi-task learning). See Quinton & Rey, "Jacobian Descent
For Multi-Objective Optimization", arXiv:2406.16232.

Head kinds
----------
``"classification"``
    ``num_labels`` classes (at least 2), cross-entropy on a pooled representation. Labels: int ``[B]``.
``"regression"``
    ``num_outputs`` real targets, mean squared error on the pooled representation. Labels: float ``[B]``
    (``num_outputs == 1``) or ``[B, num_outputs]``.
``"token_classification"``
    ``num_labels`` classes per token, cross-entropy on every token. Labels: int ``[B, T]``.
``"multilabel"``
    ``num_labels`` independent binary targets, binary cross-entropy with logits averaged over the labels.
    Labels: float ``[B, num_labels]`` with values in ``[0, 1]``.

Missing labels
--------------
In multi-dataset training each example only carries the label of its own task. A missing label is marked
by ``-100`` for classification and token classification, by ``NaN`` for regression targets and by ``NaN``
or ``-100`` for multilabel targets, element by element. The per-example loss of a task is the mean over
the valid targets of that example (tokens, outputs or labels); an example carries a task's label when it
has at least one valid target. With ``loss_reduction="mean"`` a task's loss is the mean of the per-example
losses over the examples that carry its label; **if no example of the batch carries it, the task's loss
is 0** (a zero that is still connected to the graph, so ``backward`` works and its gradient is zero).
With ``loss_reduction="none"`` the per-example loss of an example without the label is exactly 0, so its
row of the Jacobian is zero.

Note that for token classification this is the mean over examples of the per-example mean over tokens, which
equals the token-level mean of ``BertForTokenClassification`` when all examples have the same number of
labelled tokens. This choice keeps ``"mean"`` equal to the average of the ``"none"`` losses over the
examples that carry the label.
"""

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto import modeling_auto
from transformers.utils import logging

logger = logging.get_logger(__name__)

HeadKind = Literal["classification", "regression", "token_classification", "multilabel"]
Pooling = Literal["auto", "pooler", "first", "last", "mean"]

HEAD_KINDS: tuple[str, ...] = ("classification", "regression", "token_classification", "multilabel")
POOLINGS: tuple[str, ...] = ("auto", "pooler", "first", "last", "mean")
LOSS_REDUCTIONS: tuple[str, ...] = ("mean", "none")
LABEL_PREFIX = "labels_"

_SPEC_KEYS = {"kind", "num_labels", "num_outputs", "pooling", "dropout"}


def label_key(task: str) -> str:
    """Name of the input that carries the labels of ``task`` (``"labels_<task>"``).

    Parameters
    ----------
    task
        Name of the task.

    Returns
    -------
    str
        ``"labels_<task>"``.
    """
    return f"{LABEL_PREFIX}{task}"


def _check_not_encoder_decoder(config: PreTrainedConfig) -> None:
    """Raise for an encoder-decoder backbone (T5, BART): its decoder needs decoder inputs the heads do not give."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"The backbone configuration ({type(config).__name__}) is an encoder-decoder: AutoModel builds both "
            "halves, and the decoder needs decoder inputs that MultiHeadModel does not pass. Use its encoder as the "
            "backbone, e.g. MultiHeadModel.from_backbone(T5EncoderModel(config), heads)."
        )


def backbone_class_name(backbone: nn.Module) -> str:
    """The name under which :class:`MultiHeadConfig` saves the class of a backbone.

    A class of ``transformers`` is saved by its name (``"T5EncoderModel"``), any other class as
    ``"module:QualifiedName"``, so that :meth:`MultiHeadModel.from_pretrained` rebuilds the same class.
    """
    cls = type(backbone)
    import transformers

    if getattr(transformers, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_backbone_class(name: str) -> type[PreTrainedModel]:
    """The backbone class saved as ``name`` by :func:`backbone_class_name`.

    Raises
    ------
    ValueError
        If the class cannot be imported or is not a ``PreTrainedModel``; the message says to pass the
        backbone itself (``MultiHeadModel.from_pretrained(path, backbone=...)``).
    """
    module_name, _, qualname = name.rpartition(":") if ":" in name else ("transformers", ":", name)
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"The saved backbone class {name!r} cannot be imported ({error}). Import the module that defines it "
            "first, or build the backbone yourself and pass it: MultiHeadModel.from_pretrained(path, backbone=...)."
        ) from error
    if not (isinstance(found, type) and issubclass(found, PreTrainedModel)):
        raise ValueError(f"The saved backbone class {name!r} is not a transformers PreTrainedModel.")
    return found


def backbone_init_kwargs(backbone: nn.Module) -> dict[str, Any]:
    """Constructor arguments of ``backbone`` beyond its configuration that change its parameters.

    Only arguments that can be read back from the built model are recorded: ``add_pooling_layer``
    (BERT-like models built without their pooler) and ``use_mask_token`` (ViT-like models).
    """
    accepted = inspect.signature(type(backbone).__init__).parameters
    kwargs: dict[str, Any] = {}
    if "add_pooling_layer" in accepted:
        kwargs["add_pooling_layer"] = getattr(backbone, "pooler", None) is not None
    if "use_mask_token" in accepted:
        embeddings = getattr(backbone, "embeddings", None)
        kwargs["use_mask_token"] = getattr(embeddings, "mask_token", None) is not None
    return kwargs


def _model_types_of(mapping_name: str) -> set[str]:
    return set(getattr(modeling_auto, mapping_name, {}))


def default_pooling(backbone: PreTrainedModel) -> str:
    """What ``pooling="auto"`` pools when the backbone returns no ``pooler_output``.

    ``"last"`` (the last position the attention mask keeps) for decoder-only backbones, whose positions
    only see the ones before them (GPT-2, LLaMA, Mamba, and any model with causal attention); ``"mean"``
    over the frames for audio backbones (inputs ``input_values`` or ``input_features``), as the
    ``transformers`` audio classifiers do; ``"first"`` (the ``[CLS]`` token) otherwise.
    """
    if getattr(backbone, "main_input_name", None) in ("input_values", "input_features"):
        return "mean"
    if any(getattr(module, "is_causal", None) is True for module in backbone.modules()):
        return "last"
    model_type = getattr(backbone.config, "model_type", None)
    causal = model_type in _model_types_of("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if causal and model_type not in _model_types_of("MODEL_FOR_MASKED_LM_MAPPING_NAMES"):
        return "last"
    return "first"


def normalize_head_spec(task: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one head specification and fill in its defaults.

    Parameters
    ----------
    task
        Name of the task; it must be a non-empty identifier without dots (it becomes a module name and the
        suffix of the ``labels_<task>`` input).
    spec
        Mapping with ``"kind"`` (one of :data:`HEAD_KINDS`) and, depending on the kind, ``"num_labels"``
        (classification, token classification, multilabel) or ``"num_outputs"`` (regression, default 1).
        Optional: ``"pooling"`` (one of :data:`POOLINGS`, default ``"auto"``: the backbone's pooler output
        when it has one, otherwise what :func:`default_pooling` chooses for the backbone: the last kept
        position for decoder-only models, the mean for audio models, the first token for the others) and
        ``"dropout"`` (default: the backbone's classifier or hidden dropout).

    Returns
    -------
    dict
        The complete specification (``kind``, ``num_labels`` or ``num_outputs``, ``pooling``, ``dropout``).

    Raises
    ------
    ValueError, TypeError
        When the name or any field is invalid; the message says what to change.
    """
    if not isinstance(task, str) or not task.isidentifier():
        raise ValueError(
            f"Task name {task!r} is invalid: use a non-empty Python identifier (letters, digits, underscores), "
            f"because the labels are read from the input '{LABEL_PREFIX}<task>' and the head is a submodule."
        )
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"The head of task {task!r} must be a dict like {{'kind': 'classification', 'num_labels': 3}}, "
            f"got {type(spec).__name__}."
        )
    if hasattr(nn.ModuleDict, task) or hasattr(nn.ModuleDict(), task):  # (also instance attributes: training, ...)
        raise ValueError(f"Task name {task!r} clashes with an attribute of torch.nn.ModuleDict; choose another name.")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(
            f"The head of task {task!r} has unknown keys {sorted(unknown)}; allowed keys are {sorted(_SPEC_KEYS)}."
        )
    kind = spec.get("kind")
    if kind not in HEAD_KINDS:
        raise ValueError(f"The head of task {task!r} has kind {kind!r}; use one of {list(HEAD_KINDS)}.")
    out: dict[str, Any] = {"kind": kind}
    if kind == "regression":
        if "num_labels" in spec:
            raise ValueError(f"The regression head of task {task!r} takes 'num_outputs', not 'num_labels'.")
        num_outputs = spec.get("num_outputs", 1)
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(
                f"The regression head of task {task!r} needs an integer num_outputs >= 1, got {num_outputs!r}."
            )
        out["num_outputs"] = num_outputs
    else:
        if "num_outputs" in spec:
            raise ValueError(f"The {kind} head of task {task!r} takes 'num_labels', not 'num_outputs'.")
        if "num_labels" not in spec:
            raise ValueError(f"The {kind} head of task {task!r} needs 'num_labels' (the number of classes or labels).")
        num_labels = spec["num_labels"]
        minimum = 1 if kind == "multilabel" else 2
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < minimum:
            raise ValueError(
                f"The {kind} head of task {task!r} needs an integer num_labels >= {minimum}, got {num_labels!r}"
                + (" (for a single output use kind='regression' or 'multilabel')." if kind != "multilabel" else ".")
            )
        out["num_labels"] = num_labels
    pooling = spec.get("pooling", "auto")
    if pooling not in POOLINGS:
        raise ValueError(f"The head of task {task!r} has pooling {pooling!r}; use one of {list(POOLINGS)}.")
    if kind == "token_classification" and pooling != "auto":
        raise ValueError(f"The token_classification head of task {task!r} does not pool; remove 'pooling'.")
    out["pooling"] = pooling
    dropout = spec.get("dropout")
    bad_dropout = isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1
    if dropout is not None and bad_dropout:
        raise ValueError(f"The head of task {task!r} needs a dropout in [0, 1) or None, got {dropout!r}.")
    out["dropout"] = None if dropout is None else float(dropout)
    return out


@strict
class MultiHeadConfig(PreTrainedConfig):
    r"""Configuration of a :class:`MultiHeadModel`: a backbone configuration and the task heads.

    Parameters
    ----------
    backbone_config
        Configuration of the ``AutoModel`` backbone, as a ``PreTrainedConfig`` or as a dict with a
        ``"model_type"`` key (as in a saved ``config.json``).
    heads
        Ordered mapping task name -> head specification, e.g.
        ``{"sentiment": {"kind": "classification", "num_labels": 2}, "score": {"kind": "regression"}}``.
        See :func:`normalize_head_spec` for the fields. The order is the order of the task losses.
    task_names
        Order of the tasks; default: the order of ``heads``. It is saved, because ``config.json`` sorts
        the keys of ``heads``.
    initializer_range
        Standard deviation of the normal initialisation of the heads; ``None`` takes the backbone's
        ``initializer_range`` (or 0.02).
    backbone_class
        The backbone's class, set when the model is built (see :func:`backbone_class_name`), so that
        loading rebuilds the same class (e.g. ``T5EncoderModel`` rather than what ``AutoModel`` builds);
        ``None`` builds ``AutoModel.from_config(backbone_config)``.
    backbone_kwargs
        Constructor arguments of the backbone beyond its configuration, set when the model is built (see
        :func:`backbone_init_kwargs`), e.g. ``{"add_pooling_layer": False}``.
    """

    model_type = "hf_jd_multi_head"
    # The Trainer's predictions are the logits dict; the per-task losses are not predictions.
    keys_to_ignore_at_inference = ["losses"]
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    backbone_config: PreTrainedConfig | dict | None = None
    heads: dict | None = None
    task_names: list[str] | None = None
    initializer_range: float | None = None
    backbone_class: str | None = None
    backbone_kwargs: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        heads = {} if self.heads is None else self.heads
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a dict task name -> head specification, got {type(heads).__name__}.")
        normalized = {task: normalize_head_spec(task, spec) for task, spec in heads.items()}
        # The JSON file sorts keys, so the order of the tasks (the order of the losses) is kept in task_names.
        if self.task_names is None:
            self.task_names = list(normalized)
        elif sorted(self.task_names) != sorted(normalized) or len(set(self.task_names)) != len(self.task_names):
            raise ValueError(
                f"task_names {self.task_names} must list each task of heads {sorted(normalized)} exactly once."
            )
        self.heads = {task: normalized[task] for task in self.task_names}
        super().__post_init__(**kwargs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The backbone's text configuration (so that e.g. ``resize_token_embeddings`` updates the backbone).

        Parameters
        ----------
        decoder, encoder
            As for :meth:`transformers.PreTrainedConfig.get_text_config`.

        Returns
        -------
        PreTrainedConfig
            The backbone configuration's text configuration; this configuration's own when the backbone
            configuration is not built yet (a dict or ``None``).
        """
        if isinstance(self.backbone_config, PreTrainedConfig):
            return self.backbone_config.get_text_config(decoder=decoder, encoder=encoder)
        return super().get_text_config(decoder=decoder, encoder=encoder)


@dataclass
class MultiHeadOutput(ModelOutput):
    """Output of :class:`MultiHeadModel`.

    Attributes
    ----------
    loss
        Mean of the task losses (``"mean"`` reduction) over the tasks whose labels were given and carried by
        at least one example of the batch; 0 when labels were given but no example carries any; ``None``
        when no labels were given.
    losses
        Dict task -> loss, ordered like the heads, for every task whose ``labels_<task>`` was given: scalars
        with ``loss_reduction="mean"``, tensors ``[B]`` with ``"none"``; ``None`` when no labels were given.
    logits
        Dict task -> logits: ``[B, num_labels]`` / ``[B, num_outputs]`` for pooled heads,
        ``[B, T, num_labels]`` for token classification.
    hidden_states, attentions
        Passed through from the backbone when requested.
    """

    loss: Tensor | None = None
    losses: dict[str, Tensor] | None = None
    logits: dict[str, Tensor] | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


def _transformers_kwargs_names() -> frozenset[str]:
    """Keyword arguments that transformers backbones accept through ``**kwargs`` (``TransformersKwargs``)."""
    try:
        from transformers.utils.generic import TransformersKwargs

        names = set(TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the transformers version
        names = {"output_attentions", "output_hidden_states"}
    # A backbone has no loss: the Trainer's token count is not for it.
    names.discard("num_items_in_batch")
    return frozenset(names)


_BACKBONE_KWARGS = _transformers_kwargs_names()


class MultiHeadModel(PreTrainedModel):
    """A shared ``AutoModel`` backbone with one head per task; returns one loss per task.

    Build it from a backbone configuration or model with :meth:`from_backbone` (or the constructor
    ``MultiHeadModel(backbone_config_or_model, heads)``), or from a :class:`MultiHeadConfig`. It saves and
    loads with ``save_pretrained`` / ``from_pretrained`` and works in the ``transformers.Trainer``: set
    ``label_names=model.label_names`` in the training arguments so that the ``labels_<task>`` columns are
    kept and evaluation reports a loss. The backbone's inputs other than the text ones named in :meth:`forward`
    (``pixel_values`` of a vision backbone, ``input_values`` of an audio one) reach it through ``**kwargs``, which
    the plain Trainer's ``remove_unused_columns`` does not see: set ``remove_unused_columns=False`` there
    (:class:`~hf_jd.JDTrainer` keeps the backbone's input columns itself).

    Parameters
    ----------
    config
        A :class:`MultiHeadConfig`; or, for convenience, a backbone ``PreTrainedConfig`` or
        ``PreTrainedModel``, in which case ``heads`` is required.
    heads
        Task name -> head specification (only when ``config`` is not a :class:`MultiHeadConfig`).
    backbone
        An already built backbone to use instead of ``AutoModel.from_config(config.backbone_config)``.

    Raises
    ------
    TypeError
        If ``config`` is neither a :class:`MultiHeadConfig`, a ``PreTrainedConfig`` nor a ``PreTrainedModel``
        (a model name: use :meth:`from_backbone`), or ``backbone`` is not a ``PreTrainedModel``.
    ValueError
        If ``heads`` is missing (or given twice), the backbone is given twice, the configuration has no
        backbone configuration or no head, or the hidden size of the backbone cannot be found.

    Examples
    --------
    >>> import torch
    >>> from transformers import BertConfig
    >>> bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                   vocab_size=100, max_position_embeddings=64)
    >>> model = MultiHeadModel.from_backbone(bert, {"topic": {"kind": "classification", "num_labels": 4},
    ...                                              "score": {"kind": "regression"}})
    >>> input_ids = torch.randint(1, 100, (3, 8))
    >>> mask = torch.ones_like(input_ids)
    >>> topic = torch.tensor([0, 3, -100])  # -100: the third example has no topic label
    >>> score = torch.tensor([0.5, float("nan"), 1.0])  # NaN: the second one has no score
    >>> out = model(input_ids, attention_mask=mask, labels_topic=topic, labels_score=score)
    >>> sorted(out.losses), out.losses["topic"].shape
    (['score', 'topic'], torch.Size([]))
    >>> out.logits["topic"].shape
    torch.Size([3, 4])
    """

    config_class = MultiHeadConfig
    config: MultiHeadConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The backbone checks its own attention implementation when it is built.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # Task losses are plain means: the Trainer must scale them for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(
        self,
        config: "MultiHeadConfig | PreTrainedConfig | PreTrainedModel",
        heads: Mapping[str, Mapping[str, Any]] | None = None,
        backbone: PreTrainedModel | None = None,
    ) -> None:
        if isinstance(config, PreTrainedModel):
            if backbone is not None:
                raise ValueError("Pass the backbone model either as the first argument or as `backbone`, not both.")
            backbone, config = config, config.config
        if isinstance(config, MultiHeadConfig):
            if heads is not None:
                raise ValueError("`heads` is already part of the MultiHeadConfig; do not pass it again.")
        elif isinstance(config, PreTrainedConfig):
            if heads is None:
                raise ValueError(
                    "MultiHeadModel(backbone_config, heads) needs `heads` (task name -> head specification)."
                )
            config = MultiHeadConfig(backbone_config=config, heads=dict(heads))
        elif isinstance(config, str):
            raise TypeError(
                "MultiHeadModel does not load a backbone by name in its constructor; use "
                f"MultiHeadModel.from_backbone({config!r}, heads) instead."
            )
        else:
            raise TypeError(
                "MultiHeadModel expects a MultiHeadConfig, a backbone PreTrainedConfig or a backbone "
                f"PreTrainedModel, got {type(config).__name__}."
            )
        if config.backbone_config is None:
            raise ValueError("MultiHeadConfig.backbone_config is None: give the configuration of the backbone.")
        if not config.heads:
            raise ValueError("MultiHeadConfig.heads is empty: give at least one task head.")
        if backbone is not None:
            if not isinstance(backbone, PreTrainedModel):
                raise TypeError(f"backbone must be a transformers PreTrainedModel, got {type(backbone).__name__}.")
            config.backbone_config = backbone.config
        super().__init__(config)

        if backbone is None:
            backbone = self._build_backbone(config)
        self.backbone = backbone
        # The backbone's main input (``pixel_values`` of a vision backbone, ``input_values`` of an audio one), which the
        # Trainer reads for ``include_for_metrics=["inputs"]`` and ``include_num_input_tokens_seen``.
        self.main_input_name = getattr(backbone, "main_input_name", None) or "input_ids"
        # Keep a single backbone configuration object, so that changes (e.g. resized embeddings) are saved.
        self.config.backbone_config = self.backbone.config
        # Saved, so that loading rebuilds the same backbone (class, pooler) and not what AutoModel would build.
        self.config.backbone_class = backbone_class_name(self.backbone)
        self.config.backbone_kwargs = backbone_init_kwargs(self.backbone)
        self._auto_pooling = default_pooling(self.backbone)

        hidden_size = self._hidden_size()
        self.heads = nn.ModuleDict()
        for task in self.task_names:
            spec = self._head_specs[task]
            out_features = spec["num_outputs"] if spec["kind"] == "regression" else spec["num_labels"]
            self.heads[task] = nn.Sequential(nn.Dropout(self._dropout(spec)), nn.Linear(hidden_size, out_features))

        forward_params = inspect.signature(self.backbone.forward).parameters
        self._backbone_params = frozenset(
            name
            for name, p in forward_params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        self._backbone_var_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward_params.values())
        self.post_init()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_backbone(
        cls,
        backbone: "PreTrainedModel | PreTrainedConfig | str | Mapping[str, Any]",
        heads: Mapping[str, Mapping[str, Any]],
        **backbone_kwargs: Any,
    ) -> "MultiHeadModel":
        """Build a multi-head model around a backbone.

        Parameters
        ----------
        backbone
            A built ``PreTrainedModel`` (used as is, weights kept), a ``PreTrainedConfig`` or a config dict
            with ``"model_type"`` (a randomly initialised ``AutoModel.from_config``), or a model name or
            local directory (``AutoModel.from_pretrained(backbone, **backbone_kwargs)``; this is the only case
            that may download from the Hugging Face Hub).
        heads
            Task name -> head specification, see :func:`normalize_head_spec`.
        **backbone_kwargs
            Passed to ``AutoModel.from_pretrained`` when ``backbone`` is a name.

        Returns
        -------
        MultiHeadModel

        Raises
        ------
        TypeError
            If ``backbone`` has another type, or ``backbone_kwargs`` are given with a backbone that is not a name.
        ValueError
            If a config dict has no ``"model_type"`` key, or a head specification is invalid.
        """
        if isinstance(backbone, str):
            backbone = AutoModel.from_pretrained(backbone, **backbone_kwargs)
        elif backbone_kwargs:
            raise TypeError(
                f"Extra keyword arguments {sorted(backbone_kwargs)} are only used when the backbone is a name."
            )
        if isinstance(backbone, Mapping):
            spec = dict(backbone)
            if "model_type" not in spec:
                raise ValueError("A backbone config dict needs a 'model_type' key (e.g. 'bert').")
            backbone = AutoConfig.for_model(spec.pop("model_type"), **spec)
        if isinstance(backbone, PreTrainedModel):
            if backbone.base_model is not backbone:
                raise ValueError(
                    f"The backbone {type(backbone).__name__} is a task model with a head of its own, whose first "
                    "output is not the hidden states the task heads read: pass its base model "
                    f"(`model.base_model`, a {type(backbone.base_model).__name__}) instead."
                )
            _check_not_encoder_decoder(backbone.config)
            config = MultiHeadConfig(backbone_config=backbone.config, heads=dict(heads))
            return cls(config, backbone=backbone)
        if isinstance(backbone, PreTrainedConfig):
            _check_not_encoder_decoder(backbone)
            return cls(MultiHeadConfig(backbone_config=backbone, heads=dict(heads)))
        raise TypeError(
            "from_backbone expects a PreTrainedModel, a PreTrainedConfig, a config dict or a model name, "
            f"got {type(backbone).__name__}."
        )

    @staticmethod
    def _build_backbone(config: MultiHeadConfig) -> PreTrainedModel:
        kwargs = dict(config.backbone_kwargs or {})
        if config.backbone_class is None:
            return AutoModel.from_config(config.backbone_config, **kwargs)
        backbone_class = resolve_backbone_class(config.backbone_class)
        return backbone_class._from_config(config.backbone_config, **kwargs)

    def _hidden_size(self) -> int:
        backbone_config = self.backbone.config
        for name in ("hidden_size", "d_model", "n_embd", "dim"):
            value = getattr(backbone_config, name, None)
            if isinstance(value, int):
                return value
        raise ValueError(
            f"Cannot find the hidden size of the backbone config {type(backbone_config).__name__} "
            "(looked for hidden_size, d_model, n_embd, dim)."
        )

    def _dropout(self, spec: Mapping[str, Any]) -> float:
        if spec["dropout"] is not None:
            return spec["dropout"]
        backbone_config = self.backbone.config
        for name in ("classifier_dropout", "hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "dropout"):
            value = getattr(backbone_config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return 0.1

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = self.config.initializer_range
            if std is None:
                std = getattr(self.config.backbone_config, "initializer_range", None) or 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's input embeddings.

        Returns
        -------
        nn.Module
            ``self.backbone.get_input_embeddings()``.
        """
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the backbone's input embeddings.

        Parameters
        ----------
        value
            The new embedding module.
        """
        self.backbone.set_input_embeddings(value)

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks, in the order of the heads (and of the losses)."""
        return list(self.config.task_names or [])  # set by MultiHeadConfig.__post_init__, never None here

    @property
    def label_names(self) -> list[str]:
        """The label inputs, ``["labels_<task>", ...]``: pass them as ``TrainingArguments.label_names``."""
        return [label_key(task) for task in self.task_names]

    @property
    def _head_specs(self) -> dict[str, dict[str, Any]]:
        """Task name -> normalised head specification (set by ``MultiHeadConfig.__post_init__``)."""
        return self.config.heads or {}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        task_id: Tensor | None = None,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> MultiHeadOutput:
        """Run the backbone once, every head on its output, and the task losses of the given labels.

        Parameters
        ----------
        input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
            Backbone inputs; those the backbone's ``forward`` does not accept (e.g. ``token_type_ids`` for
            DistilBERT) are dropped.
        task_id
            Accepted and ignored (it is the column used by :class:`~hf_jd.trainer.multitask_data.MultiTaskSampler`).
        loss_reduction
            ``"mean"``: one scalar loss per task; ``"none"``: one loss per example and task (``[B]``).
        **kwargs
            ``labels_<task>`` for any subset of the tasks, and further backbone inputs (e.g.
            ``output_hidden_states``).

        Returns
        -------
        MultiHeadOutput

        Raises
        ------
        ValueError
            If ``loss_reduction`` is unknown, ``labels`` is passed (instead of ``labels_<task>``), a
            ``labels_<task>`` names no task of the model, or labels have the wrong shape or values
            (see :func:`head_losses`).
        """
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {list(LOSS_REDUCTIONS)}, got {loss_reduction!r}.")
        labels = self._pop_labels(kwargs)
        backbone_inputs = self._backbone_inputs(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
                "position_ids": position_ids,
                "inputs_embeds": inputs_embeds,
                **kwargs,
            }
        )
        outputs = self.backbone(**backbone_inputs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        pooler_output = getattr(outputs, "pooler_output", None)
        attention_mask = self._mask_of_positions(attention_mask, hidden)

        logits: dict[str, Tensor] = {}
        for task in self.task_names:
            spec = self._head_specs[task]
            if spec["kind"] == "token_classification":
                features = hidden
            else:
                pooling = spec["pooling"]
                if pooling == "auto":
                    pooling = "pooler" if pooler_output is not None else self._auto_pooling
                features = self._pool(hidden, pooler_output, attention_mask, pooling, task)
            logits[task] = self.heads[task](features)

        loss = None
        losses = None
        if labels:
            per_example: dict[str, Tensor] = {}
            carried: dict[str, Tensor] = {}
            for task in self.task_names:
                if task in labels:
                    per_example[task], carried[task] = head_losses(
                        self._head_specs[task], logits[task], labels[task], task
                    )
            means = {
                task: per_example[task].sum() / carried[task].sum().clamp(min=1) for task in per_example
            }
            present = torch.stack([carried[task].any() for task in per_example]).to(torch.float32)
            stacked = torch.stack([means[task] for task in per_example])
            loss = (stacked * present).sum() / present.sum().clamp(min=1)
            losses = means if loss_reduction == "mean" else per_example

        return MultiHeadOutput(
            loss=loss,
            losses=losses,
            logits=logits,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def _pop_labels(self, kwargs: dict[str, Any]) -> dict[str, Tensor]:
        if kwargs.get("labels") is not None:
            raise ValueError(
                "MultiHeadModel got `labels`: pass the labels of each task as "
                f"{', '.join(self.label_names)} (e.g. build the data with build_multitask_dataset)."
            )
        kwargs.pop("labels", None)
        labels: dict[str, Tensor] = {}
        for key in [k for k in kwargs if k.startswith(LABEL_PREFIX)]:
            task = key[len(LABEL_PREFIX) :]
            value = kwargs.pop(key)
            if task not in self._head_specs:
                raise ValueError(f"Got {key!r} but the model has no task {task!r}; its tasks are {self.task_names}.")
            if value is not None:
                if not isinstance(value, Tensor):
                    value = torch.as_tensor(value)
                labels[task] = value
        return labels

    def _backbone_inputs(self, candidates: dict[str, Any]) -> dict[str, Any]:
        extra_names = _BACKBONE_KWARGS if self._backbone_var_kwargs else frozenset()
        inputs: dict[str, Any] = {}
        dropped = []
        for name, value in candidates.items():
            if value is None:
                continue
            if name in self._backbone_params or name in extra_names:
                inputs[name] = value
            else:
                dropped.append(name)
        if dropped:
            logger.warning_once(
                f"MultiHeadModel: the backbone {type(self.backbone).__name__}.forward does not accept "
                f"{sorted(dropped)}; these inputs are ignored."
            )
        return inputs

    def _mask_of_positions(self, attention_mask: Tensor | None, hidden: Tensor) -> Tensor | None:
        """The attention mask over the backbone's output positions: audio backbones (Wav2Vec2, HuBERT) take a mask
        over the input samples and output fewer frames, whose mask their ``_get_feature_vector_attention_mask``
        gives."""
        if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] == hidden.shape[1]:
            return attention_mask
        to_frames = getattr(self.backbone, "_get_feature_vector_attention_mask", None)
        if callable(to_frames):
            return to_frames(hidden.shape[1], attention_mask)
        raise ValueError(
            f"The attention mask has {attention_mask.shape[1]} positions but the backbone outputs {hidden.shape[1]}: "
            "'mean' and 'last' pooling and token heads need a mask over the output positions. Use pooling 'first' "
            "or 'pooler', or pass a mask of the outputs' length."
        )

    @staticmethod
    def _pool(
        hidden: Tensor, pooler_output: Tensor | None, attention_mask: Tensor | None, pooling: str, task: str
    ) -> Tensor:
        if pooling == "pooler" and pooler_output is not None:
            return pooler_output
        if pooling == "pooler":
            raise ValueError(
                f"Task {task!r} uses pooling='pooler' but the backbone returns no pooler_output; "
                "use 'first', 'last' or 'mean'."
            )
        if pooling == "first":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden[:, -1] if pooling == "last" else hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype)
        if pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        # "last": the last position whose attention mask is 1 (works for left and right padding).
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def head_losses(spec: Mapping[str, Any], logits: Tensor, labels: Tensor, task: str = "task") -> tuple[Tensor, Tensor]:
    """Per-example losses of one head, with missing labels masked.

    Parameters
    ----------
    spec
        A normalised head specification (see :func:`normalize_head_spec`).
    logits
        The head's logits.
    labels
        The targets; missing ones are ``-100`` (classification, token classification), ``NaN``
        (regression) or ``NaN``/``-100`` (multilabel).
    task
        Task name, for error messages.

    Returns
    -------
    losses : Tensor
        ``[B]`` float32 per-example losses, exactly 0 for examples without a valid target.
    carried : Tensor
        ``[B]`` bool, whether each example has at least one valid target.

    Raises
    ------
    ValueError
        If the labels do not have the batch size or the shape of the logits, class indices are out of
        ``[0, num_labels)`` (other than ``-100``), or multilabel targets are outside ``[0, 1]``.
    """
    kind = spec["kind"]
    logits = logits.float()
    batch = logits.shape[0]
    if labels.shape[0] != batch:
        raise ValueError(f"labels_{task} has batch size {labels.shape[0]} but the inputs have {batch}.")
    labels = labels.to(logits.device)
    if kind in ("classification", "token_classification"):
        expected = (batch,) if kind == "classification" else tuple(logits.shape[:2])
        if labels.dim() == len(expected) + 1 and labels.shape[-1] == 1:
            labels = labels.squeeze(-1)
        if tuple(labels.shape) != expected:
            raise ValueError(f"labels_{task} ({kind}) must have shape {list(expected)}, got {list(labels.shape)}.")
        if labels.is_floating_point():
            labels = torch.nan_to_num(labels, nan=-100.0)
        labels = labels.long()
        valid = labels != -100
        num_labels = logits.shape[-1]
        if bool((((labels < 0) & valid) | (labels >= num_labels)).any()):
            raise ValueError(
                f"labels_{task} must hold class indices in [0, {num_labels}) or -100 for a missing label, "
                f"got values in [{int(labels.min())}, {int(labels.max())}]."
            )
        safe = torch.where(valid, labels, 0)
        token_losses = F.cross_entropy(logits.reshape(-1, num_labels), safe.reshape(-1), reduction="none")
        elementwise = token_losses.reshape(labels.shape)
        if kind == "classification":
            elementwise, valid = elementwise.unsqueeze(-1), valid.unsqueeze(-1)
    else:
        expected = tuple(logits.shape)
        if labels.dim() == 1 and expected[1] == 1:
            labels = labels.unsqueeze(-1)
        if tuple(labels.shape) != expected:
            raise ValueError(f"labels_{task} ({kind}) must have shape {list(expected)}, got {list(labels.shape)}.")
        labels = labels.to(torch.float32)
        # Regression targets may take any real value, so only NaN marks them missing; multilabel
        # targets lie in [0, 1], so -100 (the usual ignore value) is accepted too.
        valid = ~torch.isnan(labels)
        if kind == "multilabel":
            valid &= labels != -100
        safe = torch.where(valid, labels, 0.0)
        if kind == "regression":
            elementwise = (logits - safe) ** 2
        else:
            if bool(((safe < 0) | (safe > 1)).any()):
                raise ValueError(f"labels_{task} (multilabel) must be in [0, 1], or NaN/-100 for a missing label.")
            elementwise = F.binary_cross_entropy_with_logits(logits, safe, reduction="none")
    counts = valid.sum(dim=-1)
    summed = torch.where(valid, elementwise, torch.zeros_like(elementwise)).sum(dim=-1)
    carried = counts > 0
    losses = torch.where(carried, summed / counts.clamp(min=1), torch.zeros_like(summed))
    return losses, carried


AutoConfig.register(MultiHeadConfig.model_type, MultiHeadConfig, exist_ok=True)
AutoModel.register(MultiHeadConfig, MultiHeadModel, exist_ok=True)

__all__ = [
    "HEAD_KINDS",
    "LOSS_REDUCTIONS",
    "POOLINGS",
    "MultiHeadConfig",
    "MultiHeadModel",
    "MultiHeadOutput",
    "head_losses",
    "label_key",
    "normalize_head_spec",
]
