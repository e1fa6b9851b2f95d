"""Tests of hf_jd.trainer.multitask_data: merged datasets, the stratified sampler and the collator."""

import itertools
import math
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hf_jd.trainer.multitask_data import (
    MultiTaskDataCollator,
    MultiTaskSampler,
    build_multitask_dataset,
    infer_label_kind,
)

NAN = float("nan")


def task_datasets() -> dict[str, datasets.Dataset]:
    topic = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [8, 9]], "attention_mask": [[1, 1, 1], [1, 1]], "label": [0, 2]},
        features=datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int64")),
                "attention_mask": datasets.List(datasets.Value("int64")),
                "label": datasets.ClassLabel(names=["a", "b", "c"]),
            }
        ),
    )
    score = datasets.Dataset.from_dict(
        {
            "input_ids": [[5], [6, 7], [8, 9, 10, 11]],
            "attention_mask": [[1], [1, 1], [1, 1, 1, 1]],
            "label": [0.5, 1.5, -2.0],
        }
    )
    ner = datasets.Dataset.from_dict({"attention_mask": [[1, 1]], "input_ids": [[3, 4]], "label": [[1, -100]]})
    tags = datasets.Dataset.from_dict({"input_ids": [[3, 2]], "attention_mask": [[1, 1]], "label": [[1.0, 0.0, 1.0]]})
    return {"topic": topic, "score": score, "ner": ner, "tags": tags}


def build() -> datasets.Dataset:
    return build_multitask_dataset(task_datasets(), label_kinds={"tags": "multilabel"})


def test_merged_dataset_columns_types_and_fill_values():
    ds = build()
    assert ds.column_names == [
        "input_ids", "attention_mask", "labels_topic", "labels_score", "labels_ner", "labels_tags", "task_id"
    ]
    assert ds.features["labels_topic"] == datasets.Value("int64")
    assert ds.features["labels_score"] == datasets.Value("float32")
    assert ds.features["task_id"] == datasets.Value("int64")
    assert ds["task_id"] == [0, 0, 1, 1, 1, 2, 3]
    assert ds["labels_topic"] == [0, 2, -100, -100, -100, -100, -100]
    scores = ds["labels_score"]
    assert [math.isnan(x) for x in scores] == [True, True, False, False, False, True, True]
    assert scores[2:5] == [0.5, 1.5, -2.0]
    # token labels of other tasks: one -100 per token of the example
    assert ds["labels_ner"] == [[-100] * 3, [-100] * 2, [-100], [-100] * 2, [-100] * 4, [1, -100], [-100] * 2]
    assert ds[6]["labels_tags"] == [1.0, 0.0, 1.0]
    assert all(math.isnan(v) for v in ds[0]["labels_tags"]) and len(ds[0]["labels_tags"]) == 3
    # feature columns are kept row by row, in task order
    assert ds["input_ids"] == [[5, 6, 7], [8, 9], [5], [6, 7], [8, 9, 10, 11], [3, 4], [3, 2]]


def test_label_column_per_task_and_multi_output_regression():
    a = datasets.Dataset.from_dict({"input_ids": [[1], [2]], "y": [[0.5, 1.0], [2.0, 3.0]]})
    b = datasets.Dataset.from_dict({"input_ids": [[3]], "cls": [1]})
    ds = build_multitask_dataset({"a": a, "b": b}, label_column={"a": "y", "b": "cls"}, label_kinds={"a": "regression"})
    assert ds[0]["labels_a"] == [0.5, 1.0] and ds[0]["labels_b"] == -100
    assert all(math.isnan(v) for v in ds[2]["labels_a"]) and ds[2]["labels_b"] == 1


def test_infer_label_kind():
    assert infer_label_kind(datasets.Value("int32")) == "classification"
    assert infer_label_kind(datasets.ClassLabel(names=["x", "y"])) == "classification"
    assert infer_label_kind(datasets.Value("float64")) == "regression"
    assert infer_label_kind(datasets.List(datasets.Value("int64"))) == "token_classification"
    with pytest.raises(ValueError, match="label_kinds"):
        infer_label_kind(datasets.List(datasets.Value("float32")), "t")
    with pytest.raises(ValueError, match="label_kinds"):
        infer_label_kind(datasets.Value("string"), "t")


def test_build_errors():
    parts = task_datasets()
    with pytest.raises(ValueError, match="non-empty mapping"):
        build_multitask_dataset({})
    with pytest.raises(TypeError, match="datasets.Dataset"):
        build_multitask_dataset({"a": [1, 2]})
    with pytest.raises(ValueError, match="no label column 'target'"):
        build_multitask_dataset({"topic": parts["topic"]}, label_column="target")
    extra = parts["score"].add_column("text", ["x", "y", "z"])
    with pytest.raises(ValueError, match="same feature columns"):
        build_multitask_dataset({"topic": parts["topic"], "score": extra})
    with pytest.raises(ValueError, match="not in the datasets"):
        build_multitask_dataset({"topic": parts["topic"]}, label_kinds={"other": "regression"})
    with pytest.raises(ValueError, match="unknown"):
        build_multitask_dataset({"topic": parts["topic"]}, label_kinds={"topic": "ranking"})
    with pytest.raises(ValueError, match="label_kinds"):
        build_multitask_dataset({"tags": parts["tags"]})
    with pytest.raises(ValueError, match="identifier"):
        build_multitask_dataset({"my-task": parts["topic"]})
    with pytest.raises(ValueError, match="empty"):
        build_multitask_dataset({"topic": parts["topic"].select([])})
    clash = parts["topic"].add_column("task_id", [0, 0])
    with pytest.raises(ValueError, match="task_id"):
        build_multitask_dataset({"topic": clash})
    no_ids = datasets.Dataset.from_dict({"tokens": [[1, 2]], "label": [[0, 1]]})
    with pytest.raises(ValueError, match="length_column"):
        build_multitask_dataset({"ner": no_ids})
    with pytest.raises(ValueError, match="lists of floats"):
        build_multitask_dataset({"score": parts["score"]}, label_kinds={"score": "multilabel"})
    with pytest.raises(ValueError, match="do not fit the label kind 'classification'"):
        build_multitask_dataset({"score": parts["score"]}, label_kinds={"score": "classification"})
    ragged = datasets.Dataset.from_dict({"input_ids": [[1], [2]], "label": [[0.0, 1.0], [1.0]]})
    with pytest.raises(ValueError, match="same length"):
        build_multitask_dataset({"tags": ragged}, label_kinds={"tags": "multilabel"})


def test_class_label_checks():
    """Errors that came late or in pyarrow's words: a label_column mapping without the task ('no label column
    None'), scalar labels for token classification (a raw TypeError), booleans (rejected as 'not an integer' though
    the kind was inferred), and negative classes other than -100 (accepted, failing at the forward pass)."""
    parts = task_datasets()
    with pytest.raises(ValueError, match=r"label_column gives no label column for task 'score'.*add 'score'"):
        build_multitask_dataset({"topic": parts["topic"], "score": parts["score"]}, label_column={"topic": "label"})
    with pytest.raises(ValueError, match="one list of class indices per example, got int 0"):
        build_multitask_dataset({"topic": parts["topic"]}, label_kinds={"topic": "token_classification"})
    ids = {"input_ids": [[1, 2], [3, 4]]}
    flags = build_multitask_dataset({"flag": datasets.Dataset.from_dict({**ids, "label": [True, False]})})
    assert flags["labels_flag"] == [1, 0]
    negative = datasets.Dataset.from_dict({**ids, "label": [1, -1]})
    with pytest.raises(ValueError, match="negative class index -1.*-100 marks an ignored label"):
        build_multitask_dataset({"topic": negative})
    ignored = build_multitask_dataset({"topic": datasets.Dataset.from_dict({**ids, "label": [1, -100]})})
    assert ignored["labels_topic"] == [1, -100]
    long_tags = datasets.Dataset.from_dict({**ids, "label": [[0, 1, 1], [1, 0]]})
    with pytest.raises(ValueError, match="Example 0 of task 'ner' has 3 token labels for 2 positions of 'input_ids'"):
        build_multitask_dataset({"ner": long_tags})
    scores = datasets.Dataset.from_dict({**ids, "label": [[1.0, 0.0], [2.0, NAN]]})
    with pytest.raises(ValueError, match=r"multilabel targets of task 'tags' must be in \[0, 1\].*got 2"):
        build_multitask_dataset({"tags": scores}, label_kinds={"tags": "multilabel"})
    missing = datasets.Dataset.from_dict({**ids, "label": [[1.0, -100.0], [0.5, NAN]]})
    assert len(build_multitask_dataset({"tags": missing}, label_kinds={"tags": "multilabel"})) == 2


def test_feature_types_are_aligned_on_the_first_task():
    def features(ids: str, label: str) -> datasets.Features:
        return datasets.Features({"input_ids": datasets.List(datasets.Value(ids)), "label": datasets.Value(label)})

    a = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "label": [1]}, features=features("int64", "int64"))
    b = datasets.Dataset.from_dict({"input_ids": [[3]], "label": [0.5]}, features=features("int32", "float64"))
    ds = build_multitask_dataset({"a": a, "b": b})
    assert ds.features["input_ids"] == datasets.List(datasets.Value("int64"))
    assert ds["input_ids"] == [[1, 2], [3]] and ds["labels_b"][1] == 0.5


# ---------------------------------------------------------------- collation


def test_collator_pads_inputs_and_token_labels_and_keeps_nan():
    ds = build()
    batch = MultiTaskDataCollator(pad_token_id=0)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape == (7, 4) and batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"][2].tolist() == [5, 0, 0, 0]
    assert batch["attention_mask"][2].tolist() == [1, 0, 0, 0]
    assert batch["labels_ner"][5].tolist() == [1, -100, -100, -100]
    assert batch["labels_topic"].tolist() == [0, 2, -100, -100, -100, -100, -100]
    assert batch["labels_score"].dtype == torch.float32
    assert torch.isnan(batch["labels_score"]).tolist() == [True, True, False, False, False, True, True]
    assert batch["labels_tags"].shape == (7, 3)
    assert batch["labels_tags"][6].tolist() == [1.0, 0.0, 1.0] and torch.isnan(batch["labels_tags"][:6]).all()
    assert batch["task_id"].tolist() == [0, 0, 1, 1, 1, 2, 3]


def test_collator_left_padding_and_multiple_of():
    ds = build()
    batch = MultiTaskDataCollator(pad_token_id=9, padding_side="left", pad_to_multiple_of=8)([ds[0], ds[5]])
    assert batch["input_ids"].tolist() == [[9] * 5 + [5, 6, 7], [9] * 6 + [3, 4]]
    assert batch["labels_ner"][1].tolist() == [-100] * 6 + [1, -100]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2]


def test_collator_errors():
    with pytest.raises(ValueError, match="pad_token_id"):
        MultiTaskDataCollator()
    with pytest.raises(ValueError, match="padding_side"):
        MultiTaskDataCollator(pad_token_id=0, padding_side="middle")
    collator = MultiTaskDataCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(ValueError, match="missing"):
        collator([{"input_ids": [1], "task_id": 0}, {"input_ids": [1]}])
    with pytest.raises(ValueError, match="different lengths"):
        collator([{"labels_x": [0.5, 1.0]}, {"labels_x": [0.5]}])


def test_data_collator_with_padding_keeps_scalar_labels_and_nan():
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 20)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]"
    )
    ds = build_multitask_dataset(
        {k: v for k, v in task_datasets().items() if k in ("topic", "score")}
    )
    batch = DataCollatorWithPadding(tokenizer)([ds[i] for i in range(len(ds))])
    assert batch["labels_topic"].tolist() == [0, 2, -100, -100, -100]
    assert torch.isnan(batch["labels_score"][:2]).all() and batch["labels_score"][2].item() == 0.5
    assert batch["task_id"].tolist() == [0, 0, 1, 1, 1]
    ours = MultiTaskDataCollator(tokenizer=tokenizer)([ds[i] for i in range(len(ds))])
    torch.testing.assert_close(ours["input_ids"], batch["input_ids"])


# ---------------------------------------------------------------- sampler


def check_epoch(order: list[int], task_ids: list[int], batch_size: int) -> None:
    """Every block holds every task; every example appears; each task's examples are used evenly."""
    tasks = set(task_ids)
    assert len(order) % batch_size == 0
    assert all(0 <= i < len(task_ids) for i in order)
    for start in range(0, len(order), batch_size):
        assert {task_ids[i] for i in order[start : start + batch_size]} == tasks
    counts = Counter(order)
    assert set(counts) == set(range(len(task_ids)))  # every example at least once
    for task in tasks:
        uses = [counts[i] for i in range(len(task_ids)) if task_ids[i] == task]
        assert max(uses) - min(uses) <= 1


def min_batches_brute_force(sizes: list[int], batch_size: int) -> int:
    for b in itertools.count(1):
        if sum(max(n, b) for n in sizes) <= b * batch_size:
            return b
    raise AssertionError


SAMPLER_CASES = [
    ([8, 8], 4),
    ([60, 40], 4),
    ([97, 1, 1, 1], 4),
    ([5, 3, 2], 3),
    ([1, 1], 7),
    ([13, 7, 4], 5),
]


@pytest.mark.parametrize(("sizes", "batch_size"), SAMPLER_CASES)
def test_sampler_invariants_over_epochs_and_seeds(sizes, batch_size):
    rng = np.random.default_rng(0)
    task_ids = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)).tolist()
    for seed in (0, 1, 7):
        sampler = MultiTaskSampler(task_ids, batch_size=batch_size, seed=seed)
        assert len(sampler) == min_batches_brute_force(sizes, batch_size) * batch_size
        for epoch in range(3):
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert len(order) == len(sampler)
            check_epoch(order, task_ids, batch_size)


def test_balanced_data_is_used_exactly_once():
    task_ids = [0, 1] * 8
    order = list(MultiTaskSampler(task_ids, batch_size=4))
    assert sorted(order) == list(range(16))


def test_sampler_is_deterministic_given_seed_and_epoch():
    task_ids = [0] * 20 + [1] * 10 + [2] * 5
    a, b = MultiTaskSampler(task_ids, 5, seed=3), MultiTaskSampler(task_ids, 5, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(MultiTaskSampler(task_ids, 5, seed=4)) != list(MultiTaskSampler(task_ids, 5, seed=3))
    huge = MultiTaskSampler(task_ids, 5, seed=2**62)  # any int seed works
    huge.set_epoch(10**6)
    check_epoch(list(huge), task_ids, 5)


def test_sampler_with_sparse_task_ids_and_tensor_input():
    task_ids = torch.tensor([3, 0, 3, 3, 0, 5])
    sampler = MultiTaskSampler(task_ids, batch_size=3)
    check_epoch(list(sampler), task_ids.tolist(), 3)


def test_sampler_spreads_extra_places_by_task_size():
    task_ids = [0] * 300 + [1] * 100
    order = list(MultiTaskSampler(task_ids, batch_size=8))
    share = Counter(task_ids[i] for i in order)
    assert len(order) == 400  # no over-sampling is needed
    assert share == {0: 300, 1: 100}


def test_dataloader_batches_hold_every_task_and_feed_the_multi_head_model():
    from transformers import BertConfig

    from hf_jd.trainer.multi_head import MultiHeadModel

    ds = build()
    sampler = MultiTaskSampler(ds["task_id"], batch_size=4, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=MultiTaskDataCollator(pad_token_id=0))
    model = MultiHeadModel.from_backbone(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=20,
                   max_position_embeddings=16),
        {
            "topic": {"kind": "classification", "num_labels": 3},
            "score": {"kind": "regression"},
            "ner": {"kind": "token_classification", "num_labels": 2},
            "tags": {"kind": "multilabel", "num_labels": 3},
        },
    )
    batches = list(loader)
    assert len(batches) == len(sampler) // 4
    for batch in batches:
        assert sorted(batch["task_id"].tolist()) == [0, 1, 2, 3]
        out = model(**batch, loss_reduction="none")
        for task, losses in out.losses.items():
            # each task's label is carried by exactly its own examples of the batch
            carried = (batch["task_id"] == model.task_names.index(task))
            assert torch.all((losses != 0) == carried)


def test_sampler_errors():
    with pytest.raises(ValueError, match="at least 3"):
        MultiTaskSampler([0, 1, 2, 0], batch_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        MultiTaskSampler([], batch_size=2)
    with pytest.raises(ValueError, match="non-negative integers"):
        MultiTaskSampler([0, -1], batch_size=2)
    with pytest.raises(ValueError, match="non-negative integers"):
        MultiTaskSampler([0.5, 1.0], batch_size=2)
    with pytest.raises(ValueError, match="positive integer"):
        MultiTaskSampler([0, 1], batch_size=0)
    with pytest.raises(TypeError, match="seed"):
        MultiTaskSampler([0, 1], batch_size=2, seed="x")
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        MultiTaskSampler([0, 1], batch_size=3, num_tasks=3)


def test_trainer_batches_hold_every_task_and_change_with_the_epoch(tmp_path):
    from transformers import BertConfig, Trainer, TrainingArguments

    from hf_jd.trainer.multi_head import MultiHeadModel

    class StratifiedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return MultiTaskSampler(dataset["task_id"], batch_size=self._train_batch_size, seed=self.args.seed)

    parts = {
        name: datasets.Dataset.from_dict(
            {"input_ids": [[offset + i, 1] for i in range(size)], "label": list(range(size))}
        )
        for name, size, offset in (("a", 6, 2), ("b", 3, 10))
    }
    ds = build_multitask_dataset(parts, label_kinds={"a": "classification", "b": "classification"})
    model = MultiHeadModel.from_backbone(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=20,
                   max_position_embeddings=16),
        {"a": {"kind": "classification", "num_labels": 6}, "b": {"kind": "classification", "num_labels": 3}},
    )
    seen: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"][:, 0].tolist()), with_kwargs=True
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, num_train_epochs=2, report_to="none", use_cpu=True,
        label_names=model.label_names, save_strategy="no", seed=5,
    )
    StratifiedTrainer(model=model, args=args, train_dataset=ds).train()
    sampler = MultiTaskSampler(ds["task_id"], batch_size=3, seed=5)
    assert len(seen) == 2 * len(sampler) // 3
    assert all(min(batch) < 10 <= max(batch) for batch in seen)  # tokens < 10: task a, >= 10: task b
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append([ds[i]["input_ids"][0] for i in sampler])
    assert epochs[0] != epochs[1]
    assert [t for batch in seen for t in batch] == epochs[0] + epochs[1]


def test_datasets_keyword_of_the_documented_interface():
    ds = build_multitask_dataset(datasets=task_datasets(), label_column="label", label_kinds={"tags": "multilabel"})
    assert ds["task_id"] == [0, 0, 1, 1, 1, 2, 3]
