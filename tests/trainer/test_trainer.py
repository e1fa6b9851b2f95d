"""End-to-end tests of JDTrainer: the first optimizer step against an explicit Jacobian, all modes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_jd import JDTrainer
from hf_jd.aggregation import get_aggregator

from jd_trainer_helpers import (
    TASKS,
    GradCapture,
    TwoTaskNet,
    collate,
    explicit_jacobian,
    make_args,
    tiny_bert,
    token_dataset,
    trainable,
    two_task_dataset,
)

ENGINES = ["autojac", "autogram"]


def _mtl_losses(model, batch, mode):
    out = model(
        batch["x"], labels_a=batch["labels_a"], labels_b=batch["labels_b"],
        loss_reduction="mean" if mode == "mtl" else "none",
    )  # fmt: skip
    return torch.stack([out["losses"][t] for t in TASKS], dim=-1)


def _expected_first_step(reference, dataset, batch_size, ga, aggregator_name, losses_fn):
    """(Σ over the micro-batches of the first step of aggregator(J)) / ga, from explicit Jacobians."""
    aggregator = get_aggregator(aggregator_name)
    params = trainable(reference)
    total = torch.zeros(sum(p.numel() for p in params))
    plain = torch.zeros_like(total)
    for micro in range(ga):
        batch = collate(dataset, micro * batch_size, (micro + 1) * batch_size)
        jacobian = explicit_jacobian(losses_fn(reference, batch), params)
        total += aggregator(jacobian)
        plain += jacobian.mean(dim=0)
    # The rows conflict, so JD differs from the ordinary step on the mean loss: the test can fail.
    assert not torch.allclose(total, plain, rtol=1e-3, atol=1e-6)
    return total / ga


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["mtl", "iwmtl"])
@pytest.mark.parametrize("ga", [1, 2])
def test_multitask_first_step_equals_explicit_jacobian(tmp_path, engine, mode, ga):
    model = TwoTaskNet()
    reference = copy.deepcopy(model)
    dataset = two_task_dataset()
    capture = GradCapture()
    args = make_args(
        tmp_path, jd_mode=mode, jd_task_names=TASKS, jd_engine=engine, gradient_accumulation_steps=ga, max_steps=1
    )
    JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture]).train()
    expected = _expected_first_step(
        reference, dataset, 4, ga, "upgrad", lambda m, b: _mtl_losses(m, b, mode)
    )
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("ga", [1, 2])
def test_iwrm_first_step_equals_explicit_jacobian(tmp_path, engine, ga):
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    dataset = token_dataset()
    capture = GradCapture()
    args = make_args(tmp_path, jd_mode="iwrm", jd_engine=engine, gradient_accumulation_steps=ga, max_steps=1)
    JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture]).train()

    def losses_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    expected = _expected_first_step(reference, dataset, 4, ga, "upgrad", losses_fn)
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)


def test_non_gramian_aggregator_uses_autojac(tmp_path):
    model = TwoTaskNet()
    reference = copy.deepcopy(model)
    dataset = two_task_dataset()
    capture = GradCapture()
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, jd_aggregator="trimmed_mean",
                     jd_aggregator_kwargs={"trim_number": 0}, max_steps=1)  # fmt: skip
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture])
    assert trainer.jd_step.engine_kind == "autojac"
    trainer.train()
    params = trainable(reference)
    jacobian = explicit_jacobian(_mtl_losses(reference, collate(dataset, 0, 4), "mtl"), params)
    torch.testing.assert_close(capture.grads[0], jacobian.mean(dim=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_jd_modules_restricts_the_jacobian(tmp_path, engine):
    # MGDA's weights depend on the whole geometry of the rows, so leaving the heads out of the
    # Gramian changes them (UPGrad would give the mean on both when the rows do not conflict).
    model = TwoTaskNet()
    reference = copy.deepcopy(model)
    dataset = two_task_dataset()
    capture = GradCapture()
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, jd_engine=engine, jd_modules=["encoder"],
                     jd_aggregator="mgda", max_steps=1)  # fmt: skip
    JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture]).train()

    params = trainable(reference)
    encoder_ids = {id(p) for p in reference.encoder.parameters()}
    losses = _mtl_losses(reference, collate(dataset, 0, 4), "mtl")
    jacobian = explicit_jacobian(losses, params)
    mask = torch.cat([torch.full((p.numel(),), id(p) in encoder_ids) for p in params])
    encoder_jacobian = jacobian[:, mask]
    weighting = get_aggregator("mgda").weighting
    weights = weighting(encoder_jacobian @ encoder_jacobian.T)
    expected = weights @ jacobian  # encoder: aggregated; heads: gradient of Σ w_i L_i
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)
    # The result differs from aggregating the full Jacobian (the heads are not in the Gramian).
    full = get_aggregator("mgda")(jacobian)
    assert not torch.allclose(full, expected, rtol=1e-3, atol=1e-5)


def test_update_weights_every_reuses_weights(tmp_path):
    model = TwoTaskNet()
    dataset = two_task_dataset()
    states = []

    class Snapshot(GradCapture):
        def on_step_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            snapshot = TwoTaskNet()  # not a deepcopy: that would copy the engine's hooks too
            snapshot.load_state_dict(model.state_dict())
            states.append(snapshot)

    capture = Snapshot()
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, jd_update_weights_every=2, max_steps=3,
                     learning_rate=0.1)  # fmt: skip
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture])
    trainer.train()
    weighting = get_aggregator("upgrad").weighting
    params0 = trainable(states[0])
    jac0 = explicit_jacobian(_mtl_losses(states[0], collate(dataset, 0, 4), "mtl"), params0)
    weights0 = weighting(jac0 @ jac0.T)
    # Step 1 reuses the weights of step 0 on a new batch and new parameters.
    params1 = trainable(states[1])
    jac1 = explicit_jacobian(_mtl_losses(states[1], collate(dataset, 4, 8), "mtl"), params1)
    torch.testing.assert_close(capture.grads[1], weights0 @ jac1, rtol=1e-4, atol=1e-6)
    # Step 2 recomputes them.
    params2 = trainable(states[2])
    jac2 = explicit_jacobian(_mtl_losses(states[2], collate(dataset, 8, 12), "mtl"), params2)
    torch.testing.assert_close(capture.grads[2], weighting(jac2 @ jac2.T) @ jac2, rtol=1e-4, atol=1e-6)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert "jd/weight_a" in logs[0] and "jd/weight_a" not in logs[1] and "jd/weight_a" in logs[2]
    assert "loss_a" in logs[1]


def test_mtl_logs(tmp_path):
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, max_steps=2)
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset())
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        for key in ["jd/weight_a", "jd/weight_b", "loss_a", "loss_b", "jd/conflicting_pairs", "jd/min_cosine",
                    "jd/skipped_steps"]:  # fmt: skip
            assert key in log, key
        assert log["jd/conflicting_pairs"] in (0.0, 1.0)
        assert -1.0 <= log["jd/min_cosine"] <= 1.0
        assert log["loss"] == pytest.approx((log["loss_a"] + log["loss_b"]) / 2, rel=1e-5)
        assert log["jd/skipped_steps"] == 0.0


def test_logs_can_be_turned_off(tmp_path):
    args = make_args(tmp_path, jd_mode="mtl", jd_task_names=TASKS, max_steps=1, jd_log_weights=False)
    trainer = JDTrainer(model=TwoTaskNet(), args=args, train_dataset=two_task_dataset())
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert not any(key.startswith("jd/weight") or key.startswith("loss_") for key in log)
    assert log["jd/skipped_steps"] == 0.0


def test_iwrm_logs_weight_summaries(tmp_path):
    torch.manual_seed(0)
    args = make_args(tmp_path, jd_mode="iwrm", max_steps=1)
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert log["jd/weight_min"] <= log["jd/weight_mean"] <= log["jd/weight_max"]
    assert 0 <= log["jd/conflicting_pairs"] <= 6  # 4 examples: 6 pairs


@pytest.mark.parametrize("engine", ["autogram", "autojac"])
def test_activation_checkpointing_gives_the_exact_step(tmp_path, engine):
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    dataset = token_dataset()
    capture = GradCapture()
    args = make_args(tmp_path, jd_mode="iwrm", jd_engine=engine, activation_checkpointing=True, max_steps=1)
    JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture]).train()
    assert model.is_activation_checkpointing

    def losses_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    expected = _expected_first_step(reference, dataset, 4, 1, "upgrad", losses_fn)
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)


def _hook_counts(model: torch.nn.Module) -> list[int]:
    return [
        len(getattr(module, name))
        for module in model.modules()
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    ]


def test_training_leaves_no_hooks_on_the_model(tmp_path):
    """Training with the autogram engine takes its hooks off the model at the end (they stacked up, one set per
    trainer, on a model trained again or evaluated by other trainers); training again builds a new engine and still
    gives the Jacobian-descent step."""
    torch.manual_seed(0)
    model = tiny_bert()
    before = _hook_counts(model)
    dataset = token_dataset()
    capture = GradCapture()
    args = make_args(tmp_path, jd_mode="iwrm", jd_engine="autogram", max_steps=1)
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture])
    trainer.train()
    assert _hook_counts(model) == before
    reference = copy.deepcopy(model)
    trainer.train()  # (a second run, from the trained weights)
    assert _hook_counts(model) == before

    def losses_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    expected = _expected_first_step(reference, dataset, 4, 1, "upgrad", losses_fn)
    torch.testing.assert_close(capture.grads[-1], expected, rtol=1e-4, atol=1e-6)
