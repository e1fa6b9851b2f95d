"""fp16 loss scaling with gradients that JDTrainer writes directly (single backward, autojac).

Those paths bypass ``accelerator.backward``, whose ``scaler.scale(loss)`` is what creates a
GradScaler's scale tensor; the optimizer step's ``unscale_`` fails without it. On CPU, accelerate
uses no scaler, so a CPU GradScaler is attached by hand (the CUDA test trains with fp16 for real).
"""

from __future__ import annotations

import pytest
import torch

from hf_jd import JDTrainer

from jd_trainer_helpers import make_args, tiny_bert, token_dataset


@pytest.mark.parametrize("options", [{"jd_single_backward": True}, {"jd_engine": "autojac"}])
def test_direct_gradients_are_scaled_and_unscalable(tmp_path, options):
    torch.manual_seed(0)
    args = make_args(tmp_path, jd_mode="iwrm", max_steps=1, **options)
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.accelerator.scaler = scaler
    assert trainer._direct_grad_factor() == 1024.0
    # The scale tensor exists now: the optimizer step can unscale the gradients written with it.
    model = trainer.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = {key: torch.tensor(value) for key, value in token_dataset()[:4].items()}
    trainer.create_optimizer()
    trainer.training_step(model, inputs)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    scaler.unscale_(optimizer)
    unscaled = [p.grad for p in model.parameters() if p.grad is not None]
    for scaled, plain in zip(grads, unscaled):
        torch.testing.assert_close(plain, scaled / 1024.0)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 1024.0  # finite gradients: the scale is kept (growth after 2000 steps)
