"""Bad inputs to JDTrainer and non-finite losses: each gives a clear error (or is skipped and counted)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from hf_jd import JDTrainer
from hf_jd import NonFiniteLossError  # public name

from jd_trainer_helpers import TASKS, TwoTaskNet, make_args, tiny_bert, token_dataset, two_task_dataset


def _train(tmp_path, model=None, compute_losses=None, dataset=None, **kwargs):
    kwargs.setdefault("jd_mode", "mtl")
    kwargs.setdefault("jd_task_names", TASKS)
    kwargs.setdefault("max_steps", 1)
    trainer = JDTrainer(
        model=model if model is not None else TwoTaskNet(),
        args=make_args(tmp_path, **kwargs),
        train_dataset=dataset if dataset is not None else two_task_dataset(),
        compute_losses=compute_losses,
    )
    trainer.train()
    return trainer


def test_plain_training_arguments_are_rejected(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="JDTrainer needs JDTrainingArguments"):
        JDTrainer(model=TwoTaskNet(), args=args)


def test_compute_loss_func_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="compute_losses="):
        JDTrainer(model=TwoTaskNet(), args=make_args(tmp_path), compute_loss_func=lambda *a, **k: 0)


def test_non_callable_compute_losses_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="compute_losses must be callable"):
        JDTrainer(model=TwoTaskNet(), args=make_args(tmp_path), compute_losses="mean")


def test_label_smoothing_of_losses_jd_does_not_compute_is_rejected(tmp_path):
    """It applies to the built-in per-example losses of iwrm only (see test_trainer_hf_parity)."""
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 cannot apply to the task losses of jd_mode='mtl'"):
        make_args(tmp_path, label_smoothing_factor=0.1, jd_mode="mtl", jd_task_names=TASKS)
    with pytest.raises(ValueError, match="cannot apply to the losses of compute_losses"):
        JDTrainer(
            model=tiny_bert(), args=make_args(tmp_path, label_smoothing_factor=0.1), compute_losses=lambda m, i: None
        )


def test_jd_modules_pattern_matching_nothing(tmp_path):
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, jd_modules=["decoder.*"])
    with pytest.raises(ValueError, match=r"jd_modules pattern 'decoder\.\*' matches no submodule .*encoder"):
        JDTrainer(model=TwoTaskNet(), args=args)


def test_partial_jd_modules_need_a_gramian_based_aggregator(tmp_path):
    with pytest.raises(ValueError, match=r"not Gramian-based \(or overrides aggregate\(\)\), so there are no weights"):
        _train(tmp_path, jd_modules=["encoder"], jd_aggregator="graddrop")


def test_frozen_jd_modules(tmp_path):
    model = TwoTaskNet()
    model.encoder.requires_grad_(False)
    with pytest.raises(ValueError, match="covers no trainable parameter"):
        _train(tmp_path, model=model, jd_modules=["encoder"])


class NoLosses(TwoTaskNet):
    def forward(self, x, labels_a=None, labels_b=None, loss_reduction="mean"):
        out = super().forward(x, labels_a, labels_b, loss_reduction)
        out.pop("losses", None)
        return out


def test_mtl_without_losses_in_outputs(tmp_path):
    with pytest.raises(ValueError, match="needs the model output to carry `losses`"):
        _train(tmp_path, model=NoLosses())


def test_losses_dict_not_matching_task_names(tmp_path):
    with pytest.raises(ValueError, match=r"has tasks \['a', 'b'\] but jd_task_names is \['a', 'c'\]"):
        _train(tmp_path, jd_task_names=["a", "c"])


@pytest.mark.parametrize(
    ("mode", "shape", "message"),
    [
        ("mtl", (3,), r"expects losses of shape \[m\] with m = 2 tasks, got \(3,\)"),
        ("mtl", (4, 2), r"expects losses of shape \[m\]"),
        ("iwmtl", (4,), r"expects losses of shape \[B, m\] with m = 2 tasks, got \(4,\)"),
        ("iwmtl", (4, 3), r"got \(4, 3\)"),
        ("iwrm", (4, 2), r"expects losses of shape \[B\]"),
    ],
)
def test_wrong_loss_shape(tmp_path, mode, shape, message):
    def compute_losses(model, inputs):
        out = model(**inputs)
        return out["loss"] * torch.ones(shape), out

    kwargs = {"jd_task_names": None} if mode == "iwrm" else {}
    with pytest.raises(ValueError, match=message):
        _train(tmp_path, compute_losses=compute_losses, jd_mode=mode, **kwargs)


def test_mtl_non_scalar_task_loss(tmp_path):
    def compute_losses(model, inputs):
        out = model(**inputs, loss_reduction="none")
        return out["losses"], out

    with pytest.raises(ValueError, match=r"non-scalar losses for \['a', 'b'\].*jd_mode='iwmtl'"):
        _train(tmp_path, compute_losses=compute_losses)


def test_compute_losses_must_return_a_pair(tmp_path):
    with pytest.raises(TypeError, match=r"must return a tuple \(losses, outputs\)"):
        _train(tmp_path, compute_losses=lambda model, inputs: model(**inputs)["loss"])


def test_losses_without_grad(tmp_path):
    def compute_losses(model, inputs):
        out = model(**inputs)
        return torch.stack([out["losses"][t] for t in TASKS]).detach(), out

    with pytest.raises(ValueError, match="do not require grad"):
        _train(tmp_path, compute_losses=compute_losses)


def test_iwrm_without_labels(tmp_path):
    dataset = token_dataset().remove_columns("labels")
    with pytest.raises(ValueError, match="has no \\['labels'\\] entry"):
        _train(tmp_path, model=tiny_bert(), dataset=dataset, jd_mode="iwrm", jd_task_names=None)
    # (labels in a column of another name: the Trainer dropped it, the message says how to keep it)
    dataset = token_dataset().rename_column("labels", "y")
    with pytest.raises(ValueError, match=r"has no \['labels'\] entry.*label_names=\[its name\]"):
        _train(tmp_path, model=tiny_bert(), dataset=dataset, jd_mode="iwrm", jd_task_names=None)


def test_iwrm_on_task_labels_suggests_the_multi_task_modes(tmp_path):
    """A multi-task model's data with jd_mode='iwrm' (the default): the message points at iwmtl and mtl."""
    with pytest.raises(ValueError, match=r"task labels \['labels_a', 'labels_b'\]: .* jd_mode='iwmtl'"):
        _train(tmp_path, model=TwoTaskNet(), dataset=two_task_dataset(), jd_mode="iwrm", jd_task_names=None)
    # (a MultiHeadModel is rejected when the trainer is built, see test_multi_head_model_under_the_default_iwrm_mode)
    from hf_jd import MultiHeadModel

    model = MultiHeadModel.from_backbone(tiny_bert().config, {"a": {"kind": "regression"}})
    dataset = token_dataset().rename_column("labels", "labels_a")
    with pytest.raises(ValueError, match=r"MultiHeadModel \(tasks \['a'\]\).*jd_mode='iwmtl'"):
        _train(tmp_path, model=model, dataset=dataset, jd_mode="iwrm", jd_task_names=None)


def _nan_on_call(call_to_break: int, task: str):
    calls = {"n": 0}

    def compute_losses(model, inputs):
        out = model(**inputs)
        losses = torch.stack([out["losses"][t] for t in TASKS])
        calls["n"] += 1
        if calls["n"] == call_to_break:
            losses = losses * torch.tensor([1.0 if t != task else float("nan") for t in TASKS])
        return losses, out

    return compute_losses


@pytest.mark.parametrize("engine", ["autojac", "autogram"])
def test_nonfinite_loss_raises_with_task_and_step(tmp_path, engine):
    expected = r"task\(s\) \['b'\] at training step 2 \(the logs' step; state.global_step 1\).*jd_nonfinite='skip'"
    with pytest.raises(NonFiniteLossError, match=expected):
        _train(tmp_path, compute_losses=_nan_on_call(2, "b"), jd_engine=engine, max_steps=3)


@pytest.mark.parametrize("engine", ["autojac", "autogram"])
def test_nonfinite_loss_is_skipped_and_counted(tmp_path, engine):
    trainer = _train(tmp_path, compute_losses=_nan_on_call(2, "a"), jd_engine=engine, jd_nonfinite="skip",
                     max_steps=3)  # fmt: skip
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["jd/skipped_steps"] for log in logs] == [0.0, 1.0, 1.0]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_iwrm_names_examples(tmp_path):
    def compute_losses(model, inputs):
        labels = inputs.pop("labels")
        out = model(**inputs)
        losses = torch.nn.functional.cross_entropy(out.logits, labels, reduction="none")
        return losses * torch.tensor([1.0, float("inf"), 1.0, 1.0]), out

    with pytest.raises(NonFiniteLossError, match=r"example\(s\) \[1\] of the batch at training step 1\b"):
        _train(tmp_path, model=tiny_bert(), dataset=token_dataset(), compute_losses=compute_losses,
               jd_mode="iwrm", jd_task_names=None)  # fmt: skip


def test_arguments_changed_after_construction_are_checked_again(tmp_path):
    args = make_args(tmp_path)
    args.jd_mode = "mtl"  # without jd_task_names
    with pytest.raises(ValueError, match="needs jd_task_names"):
        JDTrainer(model=TwoTaskNet(), args=args)


def test_task_names_the_multi_head_model_has_no_head_for(tmp_path):
    """A typo in jd_task_names: the trainer would pass the model a ``labels_c`` column that does not exist and drop
    the others; the message names the model's tasks instead of the model's missing losses."""
    from jd_trainer_helpers import multi_head_model

    dataset = token_dataset().rename_column("labels", "labels_a").add_column("labels_b", [0.5] * 16)
    with pytest.raises(ValueError, match=r"jd_task_names \['a', 'c'\] names \['c'\], but the MultiHeadModel has "
                                         r"heads for the tasks \['a', 'b'\] only"):
        _train(tmp_path, model=multi_head_model(), dataset=dataset, jd_task_names=["a", "c"])


def test_task_names_leaving_out_a_task_of_the_multi_head_model(tmp_path):
    from jd_trainer_helpers import multi_head_model

    dataset = token_dataset().rename_column("labels", "labels_a").add_column("labels_b", [0.5] * 16)
    with pytest.warns(UserWarning, match=r"leaves out the MultiHeadModel's tasks \['b'\]"):
        trainer = _train(tmp_path, model=multi_head_model(), dataset=dataset, jd_task_names=["a"])
    assert trainer.state.global_step == 1  # (task a alone is trained)


def test_multi_head_model_under_the_default_iwrm_mode(tmp_path):
    """A MultiHeadModel under the default ``jd_mode="iwrm"`` (no ``compute_losses``) is rejected when the trainer is
    built, naming the multi-task modes (it failed at the first training step before)."""
    from jd_trainer_helpers import multi_head_model

    with pytest.raises(ValueError, match=r"MultiHeadModel \(tasks \['a', 'b'\]\).*jd_mode='iwmtl'"):
        JDTrainer(model=multi_head_model(), args=make_args(tmp_path), train_dataset=token_dataset())
