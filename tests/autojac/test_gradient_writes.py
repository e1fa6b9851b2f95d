"""autojac refuses models whose backward pass writes the parameters' gradients itself: the
gradients torch.autograd.grad returns are then not those of the losses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd.aggregation import Mean
from hf_jd.autojac import backward, jac, jac_to_grad


class _WritesGrad(torch.autograd.Function):
    """Identity whose backward also writes a parameter's ``.grad`` (as reversible layers do)."""

    @staticmethod
    def forward(ctx, x: Tensor, param: Tensor) -> Tensor:  # noqa: ANN001
        ctx.param = param
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        if ctx.param.grad is None:
            ctx.param.grad = torch.zeros_like(ctx.param)
        ctx.param.grad.add_(1.0)  # in place: the same tensor, a new version
        return grad, None


@pytest.mark.parametrize("existing_grad", [False, True])
def test_backward_writing_gradients_is_rejected(existing_grad: bool) -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 1)
    if existing_grad:
        first.weight.grad = torch.zeros_like(first.weight)
    losses = second(_WritesGrad.apply(first(torch.randn(4, 3)), first.weight)).squeeze(1)
    params = [*first.parameters(), *second.parameters()]
    with pytest.raises(RuntimeError, match=r"\.grad of inputs\[0\] \(shape \(3, 3\)\) was written"):
        backward(losses, params)


def test_jac_of_a_well_behaved_model_leaves_gradients_alone() -> None:
    model = nn.Linear(3, 2)
    model.weight.grad = torch.ones_like(model.weight)
    (jacobian,) = jac(model(torch.randn(2, 3)).sum(0), [model.weight])
    assert jacobian.shape == (2, 2, 3)
    assert torch.equal(model.weight.grad, torch.ones_like(model.weight))


def test_reformer_reversible_layers_are_rejected() -> None:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                            feed_forward_size=32, attn_layers=["local", "local"], axial_pos_embds=False,
                            max_position_embeddings=16, local_attn_chunk_length=4, is_decoder=True)
    model = ReformerModelWithLMHead(config).train()
    ids = torch.randint(0, 50, (3, 8))
    logits = model(input_ids=ids).logits
    losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="reversible layers"):
        backward(losses, params)
        jac_to_grad(params, Mean())
