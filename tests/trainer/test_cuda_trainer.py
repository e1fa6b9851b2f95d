"""JDTrainer on a CUDA device (run where one is present): the first optimizer step equals the
aggregated explicit Jacobian of the same batch, for each engine, and bf16 mixed precision trains."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_jd import JDTrainer
from hf_jd.aggregation import get_aggregator

from jd_trainer_helpers import GradCapture, collate, explicit_jacobian, make_args, tiny_bert, token_dataset, trainable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = matmul


@pytest.mark.parametrize(
    "engine, single_backward", [("autojac", False), ("autogram", False), ("autogram", True)]
)
def test_iwrm_first_step_on_cuda(tmp_path, engine, single_backward):
    torch.manual_seed(0)
    model = tiny_bert()
    reference = copy.deepcopy(model).cuda()
    dataset = token_dataset()
    capture = GradCapture()
    args = make_args(
        tmp_path, use_cpu=False, jd_mode="iwrm", jd_engine=engine, jd_single_backward=single_backward, max_steps=1
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture])
    trainer.train()
    assert next(trainer.model.parameters()).is_cuda
    batch = {key: value.cuda() for key, value in collate(dataset, 0, 4).items()}
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    expected = get_aggregator("upgrad")(explicit_jacobian(losses, trainable(reference)))
    torch.testing.assert_close(capture.grads[0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_mixed_precision_training_on_cuda(tmp_path, precision, single_backward):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bf16")
    torch.manual_seed(0)
    args = make_args(
        tmp_path, use_cpu=False, jd_mode="iwrm", jd_engine="autogram", jd_single_backward=single_backward,
        max_steps=4, **{precision: True},
    )
    model = tiny_bert()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = JDTrainer(model=model, args=args, train_dataset=token_dataset())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 4 and all(log["jd/skipped_steps"] == 0 for log in logs)
    assert any(not torch.equal(a, b.detach().cpu()) for a, b in zip(before, trainer.model.parameters()))
