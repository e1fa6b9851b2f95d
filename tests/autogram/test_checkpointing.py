"""The engine with non-reentrant activation checkpointing (transformers' gradient checkpointing by
default): the checkpointed blocks' forward passes, re-run inside backward passes, are not captured
again, and the Gramian and the weighted update stay exact. Reentrant checkpointing is rejected."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    SwinConfig,
    SwinForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, trainable

B, T, V = 3, 6, 50
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _next_token_losses(logits: Tensor, ids: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def _bert() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    config = BertConfig(vocab_size=V, max_position_embeddings=16, hidden_dropout_prob=0.2,
                        attention_probs_dropout_prob=0.2, num_labels=3, **SMALL)
    labels = torch.tensor([0, 2, 1])
    return BertForSequenceClassification(config), lambda m, ids: nn.functional.cross_entropy(
        m(input_ids=ids).logits, labels, reduction="none")


def _gpt2() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), lambda m, ids: _next_token_losses(m(input_ids=ids).logits, ids)


def _llama() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    config = LlamaConfig(vocab_size=V, num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=0, **SMALL)
    return LlamaForCausalLM(config), lambda m, ids: _next_token_losses(m(input_ids=ids).logits, ids)


def _t5() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """Relative-position bias shared by the examples (per-example gradients by a per-row pass)."""
    config = T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)

    def losses(m: nn.Module, ids: Tensor) -> Tensor:
        labels = ids[:, :4].contiguous()
        logits = m(input_ids=ids, labels=labels).logits
        return nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)

    return T5ForConditionalGeneration(config), losses


def _deberta() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """Relative embeddings normalised by a LayerNorm (a parameter passed as a module's input)."""
    config = DebertaV2Config(vocab_size=V, max_position_embeddings=16, relative_attention=True, position_buckets=8,
                             pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", num_labels=2, **SMALL)
    labels = torch.tensor([0, 1, 1])
    return DebertaV2ForSequenceClassification(config), lambda m, ids: nn.functional.cross_entropy(
        m(input_ids=ids).logits, labels, reduction="none")


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "t5": _t5, "deberta": _deberta}


# T5 and DeBERTa take slower paths (a backward pass per loss row): one mode each, to keep the suite fast.
CASES = [("bert", False), ("bert", True), ("gpt2", False), ("gpt2", True), ("llama", False), ("llama", True),
         ("t5", False), ("deberta", True)]


@pytest.mark.parametrize(("name", "single_backward"), CASES)
def test_transformers_gradient_checkpointing_is_exact(name: str, single_backward: bool) -> None:
    torch.manual_seed(0)
    model, losses_of = MODELS[name]()
    model.train()
    model.activation_checkpointing_enable()  # non-reentrant: transformers' default
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2 if name in ("bert", "gpt2", "llama") else 1):  # re-runs leave nothing for the next step
        model.zero_grad(set_to_none=True)
        losses = losses_of(model, torch.randint(1, V, (B, T)))
        assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_nested_checkpointed_blocks_are_exact(single_backward: bool) -> None:
    # Swin checkpoints its stages and the layers inside them: recomputing a stage re-runs the inner checkpoints'
    # forward passes under their own hooks, which the engine took for a reversible layer (RuntimeError).
    torch.manual_seed(0)
    config = SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
                        num_labels=3, drop_path_rate=0.0)
    model = SwinForImageClassification(config).train()
    model.activation_checkpointing_enable()
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 2):
        model.zero_grad(set_to_none=True)
        images, labels = torch.randn(batch, 3, 16, 16), torch.randint(0, 3, (batch,))
        losses = nn.functional.cross_entropy(model(pixel_values=images).logits, labels, reduction="none")
        assert_exact_step(engine, losses, trainable(model), single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_checkpointing_with_per_task_and_per_example_task_losses(single_backward: bool) -> None:
    torch.manual_seed(0)
    model, _ = _bert()
    model.train().activation_checkpointing_enable()
    for batch_dim in (0, None):
        engine = Engine(model, batch_dim=batch_dim, single_backward=single_backward)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=torch.randint(1, V, (B, T))).logits
        losses = torch.stack([nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]), reduction="none"),
                              logits[:, 0].pow(2)], dim=1)  # [B, 2]
        assert_exact_step(engine, losses if batch_dim == 0 else losses.mean(0), trainable(model), single_backward)
        engine.remove()


class _PositionScaled(nn.Module):
    """A block whose position table ``[1, T, d]`` multiplies its input: the table stays shared by the examples
    (the hooks return it unchanged, also in the forward pass that checkpointing re-runs, whose recomputed
    tensors must match the captured ones), and its per-example gradients take the exact paths."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(8, 4)
        self.linear = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x * self.positions(torch.arange(x.shape[1])[None]))


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _PositionScaled()
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False)).sum((1, 2))


@pytest.mark.parametrize("single_backward", [False, True])
def test_torch_checkpoint_of_a_block_with_a_broadcast_output(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = _Checkpointed()
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        assert_exact_step(engine, model(torch.randn(B, 5, 4)), trainable(model), single_backward)


def test_reentrant_checkpointing_is_rejected_with_the_fix() -> None:
    model, losses_of = _gpt2()
    model.train().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    engine = Engine(model)
    losses = losses_of(model, torch.randint(1, V, (B, T)))
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*Make the checkpointing non-reentrant"):
        engine.compute_gramian(losses)


def test_reformer_reversible_layers_are_rejected() -> None:
    """Reformer's reversible layers re-run their forward passes in the backward pass outside
    torch.utils.checkpoint and write the parameters' gradients themselves: a clear error."""
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(vocab_size=V, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                            feed_forward_size=32, attn_layers=["local", "local"], axial_pos_embds=False,
                            max_position_embeddings=16, local_attn_chunk_length=4, is_decoder=True)
    model = ReformerModelWithLMHead(config).train()
    engine = Engine(model)
    ids = torch.randint(0, V, (B, 8))
    losses = _next_token_losses(model(input_ids=ids).logits, ids)
    with pytest.raises(RuntimeError, match="outside torch.utils.checkpoint: reversible layers"):
        engine.compute_gramian(losses)


class _WritesGrad(torch.autograd.Function):
    """Identity whose backward also writes the ``.grad`` of ``target`` itself (not an input of the
    function: reversible layers reach their parameters through their modules)."""

    target: Tensor

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        _WritesGrad.target.grad = torch.ones_like(_WritesGrad.target)
        return grad


def test_a_backward_that_writes_gradients_is_rejected() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(3, 3)
            self.second = nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.second(_WritesGrad.apply(self.first(x))).squeeze(1)

    model = Net()
    _WritesGrad.target = model.first.weight
    engine = Engine(model)
    losses = model(torch.randn(B, 3))
    with pytest.raises(RuntimeError, match=r"\.grad of first\.weight .*was written during a torch\.autograd\.grad"):
        engine.compute_gramian(losses)
