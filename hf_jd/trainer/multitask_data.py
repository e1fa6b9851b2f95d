"""Multi-dataset training data: one dataset per task, merged, and batches that hold every task.

Multi-task Jacobian descent (Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization",
arXiv:2406.16232) aggregates the gradients of **all** task losses at every step. When each task has its own
dataset, a batch drawn at random may miss a task: its loss is then 0 with a zero gradient, and the
aggregator sees a degenerate Jacobian (a zero row), which e.g. makes UPGrad or MGDA return a zero update.
The tools here avoid that:

* :func:`build_multitask_dataset` concatenates the per-task datasets into one with a ``labels_<task>``
  column per task (the labels of the other tasks are marked missing: ``-100`` for classes and tokens,
  ``NaN`` for real-valued targets) and an integer ``task_id`` column; this is the input format of
  :class:`~hf_jd.trainer.multi_head.MultiHeadModel`.
* :class:`MultiTaskSampler` orders the examples so that every consecutive block of ``batch_size`` indices
  (one batch of a ``DataLoader``) holds at least one example of every task.
* :class:`MultiTaskDataCollator` pads the inputs and the token-level label columns of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets as hf_datasets
import numpy as np
import torch
from torch.utils.data import Sampler

LABEL_KINDS: tuple[str, ...] = ("classification", "regression", "token_classification", "multilabel")
TASK_ID_COLUMN = "task_id"
LABEL_PREFIX = "labels_"
# Class label of an example (or token) without one.
IGNORE_LABEL = -100
_INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"}
_FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16"}


def _value_dtype(feature: Any) -> str | None:
    if isinstance(feature, hf_datasets.ClassLabel):
        return "int64"
    if isinstance(feature, hf_datasets.Value):
        return feature.dtype
    return None


def _inner_feature(feature: Any) -> Any | None:
    for cls_name in ("List", "LargeList", "Sequence"):
        cls = getattr(hf_datasets, cls_name, None)
        if cls is not None and isinstance(feature, cls):
            return feature.feature
    if isinstance(feature, list) and len(feature) == 1:
        return feature[0]
    return None


def infer_label_kind(feature: Any, task: str = "task") -> str:
    """Guess the kind of a label column from its ``datasets`` feature.

    Integer (or ``ClassLabel``) scalars are ``"classification"``, float scalars ``"regression"``, lists of
    integers ``"token_classification"``. Lists of floats are ambiguous (multilabel or multi-output
    regression) and raise: pass ``label_kinds`` then.

    Parameters
    ----------
    feature
        The ``datasets`` feature of the label column (e.g. ``dataset.features["label"]``).
    task
        Name of the task, for error messages.

    Returns
    -------
    str
        ``"classification"``, ``"regression"`` or ``"token_classification"``.

    Raises
    ------
    ValueError
        If the labels are lists of floats (ambiguous) or the feature has no integer or float values.
    """
    dtype = _value_dtype(feature)
    if dtype in _INT_DTYPES:
        return "classification"
    if dtype in _FLOAT_DTYPES:
        return "regression"
    inner = _inner_feature(feature)
    inner_dtype = _value_dtype(inner) if inner is not None else None
    if inner_dtype in _INT_DTYPES:
        return "token_classification"
    if inner_dtype in _FLOAT_DTYPES:
        raise ValueError(
            f"The labels of task {task!r} are lists of floats: pass label_kinds={{{task!r}: 'multilabel'}} or "
            f"{{{task!r}: 'regression'}}."
        )
    raise ValueError(
        f"Cannot infer the label kind of task {task!r} from its feature {feature!r}; pass label_kinds with one of "
        f"{list(LABEL_KINDS)}."
    )


def _label_feature(kind: str) -> Any:
    if kind == "classification":
        return hf_datasets.Value("int64")
    if kind == "token_classification":
        return hf_datasets.List(hf_datasets.Value("int64"))
    return None  # set per task: scalar or list of float32


def build_multitask_dataset(
    datasets: Mapping[str, hf_datasets.Dataset],
    label_column: str | Mapping[str, str] = "label",
    label_kinds: Mapping[str, str] | None = None,
    length_column: str = "input_ids",
) -> hf_datasets.Dataset:
    """Concatenate one dataset per task into a multi-task dataset.

    Parameters
    ----------
    datasets
        Ordered mapping task name -> ``datasets.Dataset``. All datasets must have the same feature columns
        (e.g. tokenised ``input_ids``/``attention_mask``) besides their label column. The task ids are the
        positions in this mapping (0, 1, ...), which is also the order of the heads of a
        :class:`~hf_jd.trainer.multi_head.MultiHeadModel` built with the same task names.
    label_column
        Name of the label column, the same for all tasks or a mapping task -> name.
    label_kinds
        Task -> ``"classification"`` (int label), ``"regression"`` (float or list of floats),
        ``"token_classification"`` (list of ints, one per token) or ``"multilabel"`` (list of floats in
        [0, 1]). Tasks left out are inferred from their features (see :func:`infer_label_kind`).
    length_column
        A sequence column whose length is the number of tokens; token-classification labels of the other
        tasks are filled with that many ``-100``.

    Returns
    -------
    datasets.Dataset
        The rows of all tasks, in task order, with the feature columns, one ``labels_<task>`` column per task
        (``int64`` for classes, ``float32`` for real values; missing: ``-100`` or ``NaN``) and an ``int64``
        ``task_id`` column.

    Raises
    ------
    ValueError, TypeError
        Empty input, an empty or non-``Dataset`` value, bad task names, a missing label column, unknown label
        kinds, or datasets whose feature columns differ.
    """
    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("build_multitask_dataset needs a non-empty mapping task name -> datasets.Dataset.")
    tasks = list(datasets)
    label_kinds = dict(label_kinds or {})
    unknown_tasks = set(label_kinds) - set(tasks)
    if unknown_tasks:
        raise ValueError(f"label_kinds names tasks {sorted(unknown_tasks)} that are not in the datasets ({tasks}).")
    label_columns = (
        {task: label_column for task in tasks} if isinstance(label_column, str) else dict(label_column)
    )
    reference_columns: list[str] | None = None
    kinds: dict[str, str] = {}
    widths: dict[str, int | None] = {}
    for task in tasks:
        dataset = datasets[task]
        if not isinstance(task, str) or not task.isidentifier():
            raise ValueError(f"Task name {task!r} is invalid: use a Python identifier (it becomes 'labels_<task>').")
        if not isinstance(dataset, hf_datasets.Dataset):
            raise TypeError(f"The data of task {task!r} must be a datasets.Dataset, got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise ValueError(f"The dataset of task {task!r} is empty.")
        column = label_columns.get(task)
        if column is None:
            raise ValueError(
                f"label_column gives no label column for task {task!r} (it names {sorted(label_columns)}): add "
                f"{task!r} to the mapping."
            )
        if column not in dataset.column_names:
            raise ValueError(
                f"The dataset of task {task!r} has no label column {column!r}; its columns are "
                f"{dataset.column_names}. Set label_column."
            )
        columns = [c for c in dataset.column_names if c != column]
        clashes = [c for c in columns if c.startswith(LABEL_PREFIX) or c == TASK_ID_COLUMN]
        if clashes:
            raise ValueError(f"The dataset of task {task!r} already has columns {clashes}; rename or remove them.")
        if reference_columns is None:
            reference_columns = columns
        elif set(columns) != set(reference_columns):
            raise ValueError(
                f"The datasets must have the same feature columns: task {tasks[0]!r} has {sorted(reference_columns)}, "
                f"task {task!r} has {sorted(columns)}. Remove the extra columns (dataset.remove_columns)."
            )
        kind = label_kinds.get(task) or infer_label_kind(dataset.features[column], task)
        if kind not in LABEL_KINDS:
            raise ValueError(f"Label kind {kind!r} of task {task!r} is unknown; use one of {list(LABEL_KINDS)}.")
        kinds[task] = kind
        widths[task] = _label_width(dataset, column, kind, task)
    assert reference_columns is not None
    if any(kind == "token_classification" for kind in kinds.values()) and length_column not in reference_columns:
        raise ValueError(
            f"Token-classification labels need a sequence column to size the missing labels; {length_column!r} "
            f"is not among {sorted(reference_columns)}. Set length_column."
        )

    label_features = {task: _target_feature(kinds[task], widths[task]) for task in tasks}
    features = None
    parts = []
    for task_id, task in enumerate(tasks):
        own = f"{LABEL_PREFIX}{task}"
        # Re-adding the column with its feature converts it without a (noisy, slower) dataset cast.
        values = list(datasets[task][label_columns[task]])
        if kinds[task] in ("classification", "token_classification"):
            values = _checked_class_indices(values, task, kinds[task])
        if kinds[task] == "token_classification" and length_column in datasets[task].column_names:
            _check_token_label_lengths(values, datasets[task][length_column], task, length_column)
        if kinds[task] == "multilabel":
            _check_multilabel_targets(values, task)
        dataset = datasets[task].remove_columns(label_columns[task])
        try:
            dataset = dataset.add_column(own, values, feature=label_features[task])
        except (ValueError, TypeError, ArithmeticError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(
                f"The labels of task {task!r} do not fit the label kind {kinds[task]!r} "
                f"({label_features[task]}): {error}. Fix the labels or label_kinds."
            ) from error
        size = len(dataset)
        for other in tasks:
            if other != task:
                missing = _missing_labels(kinds[other], widths[other], dataset, length_column, size)
                dataset = dataset.add_column(f"{LABEL_PREFIX}{other}", missing, feature=label_features[other])
        dataset = dataset.add_column(TASK_ID_COLUMN, [task_id] * size, feature=hf_datasets.Value("int64"))
        dataset = dataset.select_columns([*reference_columns, *(f"{LABEL_PREFIX}{t}" for t in tasks), TASK_ID_COLUMN])
        if features is None:
            features = dataset.features
        elif dataset.features != features:  # e.g. int32 vs int64 token ids: align on the first task
            dataset = dataset.cast(features)
        parts.append(dataset)
    return hf_datasets.concatenate_datasets(parts)


def _label_width(dataset: hf_datasets.Dataset, column: str, kind: str, task: str) -> int | None:
    """Number of values per label for list-valued regression/multilabel targets (None for scalars)."""
    if kind not in ("regression", "multilabel"):
        return None
    first = dataset[0][column]
    if isinstance(first, (list, tuple)):
        widths = {len(row) for row in dataset[column]}
        if len(widths) != 1:
            raise ValueError(
                f"The {kind} targets of task {task!r} must all have the same length, got lengths {sorted(widths)}."
            )
        return len(first)
    if kind == "multilabel":
        raise ValueError(f"Multilabel targets of task {task!r} must be lists of floats, got {type(first).__name__}.")
    return None


def _checked_class_indices(values: list[Any], task: str, kind: str) -> list[Any]:
    """Class labels, checked: integers (pyarrow would silently truncate 0.5 to 0) that are class indices (``>= 0``) or
    ``-100`` (ignored), one per example for classification and one list per example for token classification.
    Booleans become 0 and 1."""
    if kind == "token_classification":
        scalar = next((row for row in values if not isinstance(row, (list, tuple))), None)
        if scalar is not None:
            raise ValueError(
                f"The labels of task {task!r} do not fit the label kind 'token_classification': it needs one list of "
                f"class indices per example, got {type(scalar).__name__} {scalar!r}. Fix the labels or label_kinds."
            )
    flat = [x for row in values for x in row] if kind == "token_classification" else values
    array = np.asarray(flat)
    if array.size and np.issubdtype(array.dtype, np.bool_):
        if kind == "token_classification":
            return [[int(x) for x in row] for row in values]
        return array.astype(int).tolist()
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.mod(array, 1) == 0):
            raise ValueError(
                f"The labels of task {task!r} do not fit the label kind {kind!r}: class indices must be integers "
                "(-100 for an ignored label). Fix the labels or label_kinds."
            )
    negative = (array < 0) & (array != IGNORE_LABEL) if array.size else np.zeros(0, dtype=bool)
    if negative.any():
        raise ValueError(
            f"The labels of task {task!r} hold the negative class index {int(array[negative][0])}: class indices are "
            f"0, 1, ... and {IGNORE_LABEL} marks an ignored label."
        )
    return values


def _target_feature(kind: str, width: int | None) -> Any:
    feature = _label_feature(kind)
    if feature is not None:
        return feature
    if width is None:
        return hf_datasets.Value("float32")
    return hf_datasets.List(hf_datasets.Value("float32"), length=width)


def _check_token_label_lengths(values: list[Any], sequences: list[Any], task: str, length_column: str) -> None:
    """Each example's token labels must be as long as its sequence (else they fail later, in the collator or the
    loss)."""
    for index, (labels, sequence) in enumerate(zip(values, sequences)):
        if len(labels) != len(sequence):
            raise ValueError(
                f"Example {index} of task {task!r} has {len(labels)} token labels for {len(sequence)} positions of "
                f"{length_column!r}: give one label per position ({IGNORE_LABEL} for positions without one)."
            )


def _check_multilabel_targets(values: list[Any], task: str) -> None:
    """Multilabel targets are probabilities in [0, 1], or missing (NaN or -100)."""
    array = np.asarray(values, dtype=np.float64)
    valid = np.isnan(array) | (array == IGNORE_LABEL) | ((array >= 0) & (array <= 1))
    if not valid.all():
        raise ValueError(
            f"The multilabel targets of task {task!r} must be in [0, 1] (NaN or {IGNORE_LABEL} when missing), got "
            f"{array[~valid][0]:g}."
        )


def _missing_labels(kind: str, width: int | None, dataset: hf_datasets.Dataset, length_column: str, size: int) -> list:
    if kind == "classification":
        return [-100] * size
    if kind == "token_classification":
        return [[-100] * len(row) for row in dataset[length_column]]
    if width is None:
        return [float("nan")] * size
    return [[float("nan")] * width for _ in range(size)]


class MultiTaskSampler(Sampler[int]):
    """Stratified sampler: every consecutive block of ``batch_size`` indices holds every task.

    Jacobian descent aggregates the gradients of all task losses at every step, so every batch must carry
    a label of every task. Each epoch, the examples of each task are shuffled; every batch receives one
    example of every task, and the remaining ``batch_size - num_tasks`` places of the batches are shared
    among the tasks in proportion to their sizes. The number of batches is the smallest that lets every
    example appear at least once per epoch; a task with fewer examples than batches is over-sampled (its
    examples are reshuffled and reused), so an epoch may be longer than the dataset. The order is
    deterministic given ``seed`` and the epoch (set with :meth:`set_epoch`; the Trainer does so).

    Use it with a ``DataLoader`` whose ``batch_size`` equals this ``batch_size`` (and ``drop_last`` either
    way: the length is a multiple of ``batch_size``). In the Trainer, that is the per-process batch size
    (``Trainer._train_batch_size``): with several processes, accelerate hands out whole batches to the
    processes, so every process still sees every task in every batch.

    Parameters
    ----------
    task_ids
        Task of every example of the dataset (e.g. ``dataset["task_id"]``), non-negative integers.
    batch_size
        Size of the batches the indices are grouped into; at least the number of tasks.
    seed
        Seed of the shuffling.
    num_tasks
        If given, the task ids must be in ``range(num_tasks)`` and every task must have examples.

    Raises
    ------
    ValueError
        If ``task_ids`` is empty, not 1-D or not non-negative integers, ``batch_size`` is not a positive
        integer or is smaller than the number of tasks, or the ids do not match ``num_tasks``.
    TypeError
        If ``seed`` is not an int.
    """

    def __init__(
        self,
        task_ids: Sequence[int] | torch.Tensor | np.ndarray,
        batch_size: int,
        seed: int = 0,
        num_tasks: int | None = None,
    ) -> None:
        ids = np.asarray(task_ids.tolist() if isinstance(task_ids, torch.Tensor) else list(task_ids))
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("MultiTaskSampler needs a non-empty 1-D sequence of task ids.")
        if not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
            raise ValueError(f"Task ids must be non-negative integers, got dtype {ids.dtype} with min {ids.min()}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        tasks = sorted(int(t) for t in np.unique(ids))
        if num_tasks is not None:
            missing = sorted(set(range(num_tasks)) - set(tasks))
            extra = [t for t in tasks if t >= num_tasks]
            if missing or extra:
                raise ValueError(
                    f"Expected task ids 0..{num_tasks - 1} each with examples; missing {missing}, out of range {extra}."
                )
        if batch_size < len(tasks):
            raise ValueError(
                f"batch_size={batch_size} is smaller than the number of tasks ({len(tasks)}): a batch cannot hold "
                f"every task. Use a batch size of at least {len(tasks)}."
            )
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.tasks = tasks
        self._indices = [np.flatnonzero(ids == t) for t in tasks]
        sizes = [len(idx) for idx in self._indices]
        self.num_batches = _num_batches(sizes, batch_size)
        self._slots = _slots_per_task(sizes, self.num_batches, batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which selects the shuffling (with the seed).

        Parameters
        ----------
        epoch
            Index of the epoch.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        num_tasks = len(self.tasks)
        streams = [
            _stream(indices, slots, generator) for indices, slots in zip(self._indices, self._slots, strict=True)
        ]
        # One example of every task per batch; the extra places, shuffled, fill the batches in order.
        extra_owner = np.concatenate(
            [np.full(slots - self.num_batches, k, dtype=np.int64) for k, slots in enumerate(self._slots)]
        )
        extra_owner = extra_owner[torch.randperm(len(extra_owner), generator=generator).numpy()]
        extra_per_batch = self.batch_size - num_tasks
        cursors = [0] * num_tasks
        for batch in range(self.num_batches):
            owners = np.concatenate(
                [np.arange(num_tasks), extra_owner[batch * extra_per_batch : (batch + 1) * extra_per_batch]]
            )
            owners = owners[torch.randperm(len(owners), generator=generator).numpy()]
            for owner in owners:
                yield int(streams[owner][cursors[owner]])
                cursors[owner] += 1


def _num_batches(sizes: Sequence[int], batch_size: int) -> int:
    """Smallest number of batches b with sum_t max(n_t, b) <= b * batch_size (every example fits)."""
    low = max(1, math.ceil(sum(sizes) / batch_size))
    high = max(sizes)
    if low >= high:
        return low
    while low < high:  # the condition is monotone in b: binary search
        mid = (low + high) // 2
        if sum(max(n, mid) for n in sizes) <= mid * batch_size:
            high = mid
        else:
            low = mid + 1
    return low


def _slots_per_task(sizes: Sequence[int], num_batches: int, batch_size: int) -> list[int]:
    """Places per task in an epoch: at least max(n_t, num_batches); the spare places go by size."""
    slots = [max(n, num_batches) for n in sizes]
    spare = num_batches * batch_size - sum(slots)
    if spare > 0:
        total = sum(sizes)
        shares = [spare * n / total for n in sizes]
        extra = [math.floor(s) for s in shares]
        remainders = sorted(range(len(sizes)), key=lambda k: (extra[k] - shares[k], k))
        for k in remainders[: spare - sum(extra)]:
            extra[k] += 1
        slots = [s + e for s, e in zip(slots, extra, strict=True)]
    return slots


def _stream(indices: np.ndarray, length: int, generator: torch.Generator) -> np.ndarray:
    """``length`` indices: successive random permutations of ``indices`` (each example once per pass)."""
    passes = math.ceil(length / len(indices))
    order = [indices[torch.randperm(len(indices), generator=generator).numpy()] for _ in range(passes)]
    return np.concatenate(order)[:length]


class MultiTaskDataCollator:
    """Collate multi-task examples: pad sequences and stack labels, keeping ``NaN`` and ``-100``.

    Every list-valued feature of the batch is padded on the right (or the left) to the longest one:
    ``input_ids`` with the pad token id, ``attention_mask``/``token_type_ids``/other inputs with 0, and
    ``labels_<task>`` lists with ``-100``. Fixed-width float label lists (multilabel or multi-output
    regression) have equal lengths and are only stacked. Scalars are stacked as they are; float labels
    become ``float32`` tensors (``NaN`` kept), integer ones ``int64``.

    Parameters
    ----------
    pad_token_id
        Padding value of ``input_ids``; taken from ``tokenizer`` when one is given.
    tokenizer
        Optional tokenizer supplying ``pad_token_id`` and ``padding_side``.
    padding_side
        ``"right"`` or ``"left"`` (default: the tokenizer's, else ``"right"``).
    pad_to_multiple_of
        Round the padded length up to a multiple of this.
    label_pad_value
        Padding value of token-level label lists.

    Raises
    ------
    ValueError
        If no pad token id is given (directly or by the tokenizer), ``padding_side`` is not ``"left"`` or
        ``"right"``, or ``pad_to_multiple_of`` is not positive.
    """

    def __init__(
        self,
        pad_token_id: int | None = None,
        tokenizer: Any | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        label_pad_value: int = -100,
    ) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("MultiTaskDataCollator needs pad_token_id (or a tokenizer with a pad token).")
        if padding_side is None:
            padding_side = getattr(tokenizer, "padding_side", "right") if tokenizer is not None else "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}.")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_value = label_pad_value

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate a batch of examples.

        Parameters
        ----------
        features
            The examples, each a mapping column -> value; all have the same keys.

        Returns
        -------
        dict[str, torch.Tensor]
            One tensor per key, padded (lists) or stacked (scalars).

        Raises
        ------
        ValueError
            If the batch is empty, an example lacks a key of the first, or float label lists differ in length.
        TypeError
            If the values of a key cannot be made a numeric tensor.
        """
        if not features:
            raise ValueError("MultiTaskDataCollator got an empty batch.")
        keys = list(features[0])
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            if any(key not in f for f in features):
                raise ValueError(f"Key {key!r} is missing from some examples of the batch.")
            values = [f[key] for f in features]
            if isinstance(values[0], torch.Tensor):
                values = [v.tolist() for v in values]
            if isinstance(values[0], (list, tuple, np.ndarray)):
                batch[key] = self._pad(key, [list(np.asarray(v).tolist()) for v in values])
            else:
                batch[key] = _to_tensor(values)
        return batch

    def _pad(self, key: str, rows: list[list[Any]]) -> torch.Tensor:
        length = max(len(r) for r in rows)
        is_label = key.startswith(LABEL_PREFIX) or key == "labels"
        if is_label and any(isinstance(x, float) for r in rows for x in r):
            # Real-valued targets (multilabel, multi-output regression): a fixed width, stacked as is.
            if any(len(r) != length for r in rows):
                raise ValueError(f"The float label lists of {key!r} have different lengths; they cannot be padded.")
            return _to_tensor(rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        if is_label:
            value: Any = self.label_pad_value
        elif key == "input_ids":
            value = self.pad_token_id
        else:
            value = 0
        padded = []
        for row in rows:
            fill = [value] * (length - len(row))
            padded.append(row + fill if self.padding_side == "right" else fill + row)
        return _to_tensor(padded)


def _to_tensor(values: list[Any]) -> torch.Tensor:
    array = np.asarray(values)
    if np.issubdtype(array.dtype, np.floating):
        return torch.as_tensor(array, dtype=torch.float32)
    if np.issubdtype(array.dtype, np.bool_):
        return torch.as_tensor(array)
    if np.issubdtype(array.dtype, np.integer):
        return torch.as_tensor(array, dtype=torch.int64)
    raise TypeError(f"Cannot collate values of dtype {array.dtype} into a tensor.")


__all__ = [
    "LABEL_KINDS",
    "TASK_ID_COLUMN",
    "MultiTaskDataCollator",
    "MultiTaskSampler",
    "build_multitask_dataset",
    "infer_label_kind",
]
