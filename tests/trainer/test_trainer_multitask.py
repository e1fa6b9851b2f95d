"""JDTrainer with MultiHeadModel on a multi-dataset (one dataset per task) with the multi-task sampler."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig

from hf_jd import JDTrainer, MultiHeadModel
from hf_jd.trainer import MultiTaskSampler, build_multitask_dataset

from jd_trainer_helpers import make_args

TASKS = ["topic", "score"]


def _data(n: int, seed: int) -> dict[str, list]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 40, (n, 6), generator=generator)
    return {"input_ids": input_ids.tolist(), "attention_mask": torch.ones(n, 6, dtype=torch.long).tolist(),
            "x0": (input_ids[:, 1] % 2).tolist(), "x1": (input_ids[:, 2] / 40.0).tolist()}  # fmt: skip


def _multitask_dataset():
    topic = _data(10, 0)
    score = _data(6, 1)
    datasets = {
        "topic": Dataset.from_dict({"input_ids": topic["input_ids"], "attention_mask": topic["attention_mask"],
                                    "label": topic["x0"]}),
        "score": Dataset.from_dict({"input_ids": score["input_ids"], "attention_mask": score["attention_mask"],
                                    "label": score["x1"]}),
    }  # fmt: skip
    return build_multitask_dataset(datasets, label_kinds={"topic": "classification", "score": "regression"})


def _model():
    torch.manual_seed(0)
    backbone = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          vocab_size=40, max_position_embeddings=16, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)  # fmt: skip
    heads = {"topic": {"kind": "classification", "num_labels": 2}, "score": {"kind": "regression"}}
    return MultiHeadModel.from_backbone(backbone, heads)


@pytest.mark.parametrize("mode", ["mtl", "iwmtl"])
def test_multi_dataset_training(tmp_path, mode):
    dataset = _multitask_dataset()
    model = _model()
    seen_task_ids = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_task_ids.append(kwargs["task_id"].tolist()) if module.training else None,
        with_kwargs=True,
    )
    args = make_args(tmp_path, jd_mode=mode, jd_task_names=TASKS, max_steps=3, train_sampling_strategy="random",
                     eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3)  # fmt: skip
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    assert isinstance(trainer._get_train_sampler(), MultiTaskSampler)
    trainer.train()

    assert len(seen_task_ids) == 3
    assert all(set(ids) == {0, 1} for ids in seen_task_ids)  # every batch holds every task
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all("jd/weight_topic" in log and "loss_score" in log for log in logs)
    evaluation = next(log for log in trainer.state.log_history if "eval_loss" in log)
    assert evaluation["eval_loss_topic"] > 0 and evaluation["eval_loss_score"] > 0
    assert (tmp_path / "checkpoint-3" / "jd_aggregator_state.pt").is_file()
    reloaded = MultiHeadModel.from_pretrained(tmp_path / "checkpoint-3")
    for (name, p), q in zip(trainer.model.named_parameters(), reloaded.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_task_id_is_dropped_for_models_that_do_not_take_it(tmp_path):
    from jd_trainer_helpers import TwoTaskNet, two_task_dataset

    dataset = two_task_dataset(n=8).add_column("task_id", [0, 1] * 4)
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=["a", "b"], max_steps=1)
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=dataset)
    assert isinstance(trainer._get_train_sampler(), MultiTaskSampler)
    trainer.train()  # TwoTaskNet.forward has no task_id: it must not receive it


def test_evaluation_task_losses_count_only_labelled_examples(tmp_path):
    """Each eval_loss_<task> is the mean over the examples of that task (batches mix tasks unevenly)."""
    dataset = _multitask_dataset()
    model = _model()
    args = make_args(tmp_path, jd_mode="iwmtl", jd_task_names=TASKS, per_device_eval_batch_size=4)
    metrics = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset).evaluate()
    model.eval()
    for task in TASKS:
        rows = dataset.filter(lambda row, task=task: row["task_id"] == TASKS.index(task))
        with torch.no_grad():
            out = model(input_ids=torch.tensor(rows["input_ids"]), attention_mask=torch.tensor(rows["attention_mask"]),
                        **{f"labels_{task}": torch.tensor(rows[f"labels_{task}"])})  # fmt: skip
        assert metrics[f"eval_loss_{task}"] == pytest.approx(out.losses[task].item(), rel=1e-4)


def test_iwmtl_training_loss_is_the_mean_of_the_task_losses(tmp_path):
    """On merged datasets every example lacks the other task's label (a placeholder loss 0): the logged loss is the
    mean of loss_<task> (over the examples carrying each label), as in mtl, not the mean of the [B, m] matrix (about
    half of it here)."""
    logs = {}
    for mode in ("mtl", "iwmtl"):
        args = make_args(tmp_path / mode, jd_mode=mode, jd_task_names=TASKS, max_steps=1, jd_aggregator="mean")
        trainer = JDTrainer(model=_model(), args=args, train_dataset=_multitask_dataset())
        trainer.train()
        logs[mode] = next(log for log in trainer.state.log_history if "loss" in log)
    for mode, log in logs.items():
        assert log["loss"] == pytest.approx((log["loss_topic"] + log["loss_score"]) / 2, rel=1e-4), mode
    assert logs["iwmtl"]["loss"] == pytest.approx(logs["mtl"]["loss"], rel=1e-4)


def test_backbone_inputs_of_a_multi_head_vision_model_are_kept(tmp_path):
    """MultiHeadModel passes pixel_values to its ViT backbone through **kwargs: the Trainer's column filter
    (remove_unused_columns=True, the default) dropped them and the forward failed."""
    from transformers import ViTConfig

    generator = torch.Generator().manual_seed(0)

    def images(n: int, labels: list) -> Dataset:
        pixels = torch.randn(n, 3, 8, 8, generator=generator)
        return Dataset.from_dict({"pixel_values": pixels.tolist(), "label": labels})

    dataset = build_multitask_dataset(
        {"topic": images(6, [0, 1, 0, 1, 1, 0]), "score": images(4, [0.5, -1.0, 2.0, 0.0])},
        label_kinds={"topic": "classification", "score": "regression"},
        length_column="pixel_values",
    )
    torch.manual_seed(0)
    backbone = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         image_size=8, patch_size=4, num_channels=3)  # fmt: skip
    model = MultiHeadModel.from_backbone(
        backbone, {"topic": {"kind": "classification", "num_labels": 2}, "score": {"kind": "regression"}}
    )
    args = make_args(tmp_path, jd_mode="iwmtl", jd_task_names=TASKS, max_steps=2)
    assert args.remove_unused_columns
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    metrics = trainer.evaluate()
    assert all(math.isfinite(metrics[f"eval_loss_{task}"]) for task in TASKS)


def test_main_input_of_a_multi_head_vision_model_is_the_backbones(tmp_path):
    """The Trainer reads the model's main input for include_for_metrics=["inputs"] and for counting the input tokens
    seen: MultiHeadModel named input_ids whatever its backbone, so a ViT backbone's evaluation raised KeyError and
    counted no input."""
    from transformers import ViTConfig

    generator = torch.Generator().manual_seed(0)
    dataset = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 8, 8, generator=generator).tolist(),
                                 "labels_topic": [0, 1] * 4})  # fmt: skip
    torch.manual_seed(0)
    backbone = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         image_size=8, patch_size=4, num_channels=3)  # fmt: skip
    model = MultiHeadModel.from_backbone(backbone, {"topic": {"kind": "classification", "num_labels": 2}})
    assert model.main_input_name == "pixel_values"
    seen_inputs: list[int] = []

    def metrics(prediction) -> dict[str, float]:
        seen_inputs.append(len(prediction.inputs))
        return {}

    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=["topic"], label_names=["labels_topic"], max_steps=1,
                     per_device_train_batch_size=4, include_num_input_tokens_seen=True, include_for_metrics=["inputs"])
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, compute_metrics=metrics)
    trainer.train()
    assert trainer.state.num_input_tokens_seen == 4 * 3 * 8 * 8
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert seen_inputs == [8]


def test_eval_loss_on_merged_datasets_does_not_depend_on_the_batch_size(tmp_path):
    """Batches of merged datasets hold some tasks only: the Trainer's average of per-batch losses (the model's mean
    over the tasks present) moved with the evaluation batch size (1.88 to 3.34 in the report). It is now the mean of
    the per-task losses."""
    dataset = _multitask_dataset()
    model = _model()
    results = []
    for batch_size in (1, 5, 16):
        args = make_args(tmp_path, jd_mode="iwmtl", jd_task_names=TASKS, per_device_eval_batch_size=batch_size)
        results.append(JDTrainer(model=model, args=args, eval_dataset=dataset).evaluate())
    for metrics in results:
        assert metrics["eval_loss"] == pytest.approx((metrics["eval_loss_topic"] + metrics["eval_loss_score"]) / 2)
        assert metrics["eval_loss"] == pytest.approx(results[0]["eval_loss"], rel=1e-5)


def test_data_seed_orders_the_multi_task_batches(tmp_path):
    dataset = _multitask_dataset()
    orders = []
    for data_seed in (None, 1, 2):
        args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, data_seed=data_seed, seed=0)
        sampler = JDTrainer(model=_model(), args=args, train_dataset=dataset)._get_train_sampler()
        assert isinstance(sampler, MultiTaskSampler)
        orders.append(list(sampler))
    assert orders[1] != orders[2]  # (it was seeded with `seed` alone: data_seed changed nothing)
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, data_seed=0, seed=5)
    sampler = JDTrainer(model=_model(), args=args, train_dataset=dataset)._get_train_sampler()
    assert list(sampler) == orders[0]  # data_seed=0 orders as seed=0 did
