"""``auto_find_batch_size=True``: the Trainer runs its training loop again with a smaller batch after an
out-of-memory error; the aggregator's row-sized state and the last-batch check follow the new size."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import BertForSequenceClassification, default_data_collator

from hf_jd import JDTrainer

from jd_trainer_helpers import make_args, tiny_bert, token_dataset


class OutOfMemoryOnce(BertForSequenceClassification):
    """Raises the out-of-memory error accelerate recognises on its ``fail_at``-th training forward at batch size 8
    (after ``fail_at - 1`` steps have run at that size)."""

    fail_at = 2

    def forward(self, input_ids: Any = None, **kwargs: Any) -> Any:
        if self.training and input_ids.shape[0] == 8:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.fail_at:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB (simulated in a test)")
        return super().forward(input_ids=input_ids, **kwargs)


def _trainer(tmp_path: Any, aggregator: str, examples: int, **options: Any) -> JDTrainer:
    torch.manual_seed(0)
    model = OutOfMemoryOnce(tiny_bert().config)
    args = make_args(tmp_path, jd_aggregator=aggregator, per_device_train_batch_size=8, auto_find_batch_size=True,
                     **options)
    return JDTrainer(model=model, args=args, train_dataset=token_dataset(n=examples),
                     data_collator=default_data_collator)


@pytest.mark.parametrize("aggregator", ["gradvac", "nash_mtl"])
def test_retry_with_a_smaller_batch_restarts_the_state(tmp_path: Any, aggregator: str) -> None:
    """GradVac's targets and Nash-MTL's weights were sized on the 8 rows of the first step: the retried loop, at 7
    examples a batch, starts them over (it raised that they held 8 rows before)."""
    trainer = _trainer(tmp_path, aggregator, examples=32, max_steps=3)
    trainer.train()
    assert trainer._train_batch_size == 7
    assert trainer.state.global_step == 3
    for name, value in trainer.jd_step.aggregator.state_dict().items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            assert value.shape[0] == 7, name


def test_retry_checks_the_last_batch_again(tmp_path: Any) -> None:
    """32 examples fill batches of 8, but at 7 examples a batch they leave a last batch of 4, which GradVac (sized on 7
    rows) rejects: the retried loop says so before it starts, as the first one would have."""
    trainer = _trainer(tmp_path, "gradvac", examples=32, max_steps=-1, num_train_epochs=1)
    with pytest.raises(ValueError, match="batch size of 7 the last batch of each epoch has 4 examples"):
        trainer.train()
