"""Module outputs of size 1 along ``batch_dim``: the engine never changes what the model computes.

Such an output (BERT's ``[1, T, d]`` position embeddings, a ``[1, T, T]`` relative bias, prompt embeddings
``[1, P, d]``, a channels-first ``[1, T, B]`` tensor) is a table shared by the examples, whatever comes next:
the forward hooks return it unchanged, and its per-example gradients come from the engine's exact paths (a
broadcast plan when the model only broadcasts it over the batch further on, else a verified grouping or the
per-row pass). Each model is checked over several steps, including a change of the batch size, against the
explicit Jacobian (``assert_exact_step``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_jd.autogram import Engine

from ._reference import assert_exact_step, trainable

V = 40


def _assert_unchanged_forward_and_exact(model: nn.Module, inputs: list[Tensor], single_backward: bool) -> None:
    """For each batch: the losses with the engine enabled equal those without it (same shape and values),
    and the Gramian and the weighted update match the explicit Jacobian."""
    engine = Engine(model, single_backward=single_backward)
    params = trainable(model)
    for x in inputs:
        with engine.disabled():
            expected = model(x).detach()
        losses = model(x)
        assert losses.shape == expected.shape
        torch.testing.assert_close(losses.detach(), expected, rtol=0, atol=0)
        model.zero_grad(set_to_none=True)
        assert_exact_step(engine, losses, params, single_backward)
    engine.remove()


class _ChannelScale(nn.Module):
    """Per-channel scale of a channels-first ``[C, T, B]`` tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.weight.view(-1, 1, 1))


class _BatchLast(nn.Module):
    """One channel first, the batch last: the scale's input and output are ``[1, T, B]``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = _ChannelScale(1)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T] -> losses [B]
        out = self.scale(x.T.unsqueeze(0))  # [1, T, B]
        return self.head(out.squeeze(0).T).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_batch_last_output_with_one_channel(single_backward: bool) -> None:
    """A ``[1, T, B]`` output is not a batch broadcast over ``[B, T, B]`` (expanding it changed the losses)."""
    model = _BatchLast()
    inputs = [torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3)]
    _assert_unchanged_forward_and_exact(model, inputs, single_backward)


class _RelativeBias(nn.Module):
    """A relative-position bias ``[1, T, T]`` looked up from position ids ``[1, T]``."""

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * max_len - 1))
        self.max_len = max_len

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions[:, None, :] - positions[:, :, None] + self.max_len - 1]


class _HeadsFlattened(nn.Module):
    """Attention on ``[B * H, T, T]`` scores, to which the ``[1, T, T]`` bias is added."""

    def __init__(self, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.bias = _RelativeBias(8)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d] -> losses [B]
        b, t, _ = x.shape
        q, k, v = (
            z.reshape(b, t, self.heads, -1).transpose(1, 2).reshape(b * self.heads, t, -1)
            for z in self.qkv(x).chunk(3, -1)
        )
        scores = q @ k.transpose(1, 2) + self.bias(torch.arange(t)[None])
        return (scores.softmax(-1) @ v).pow(2).reshape(b, -1).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_relative_bias_added_to_scores_of_flattened_heads(single_backward: bool) -> None:
    """A ``[1, T, T]`` bias added to ``[B * H, T, T]`` scores (expanding it to ``[B, T, T]`` broke the forward)."""
    model = _HeadsFlattened()
    inputs = [torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(2, 5, 4), torch.randn(5, 5, 4)]
    _assert_unchanged_forward_and_exact(model, inputs, single_backward)


class _PromptTuned(nn.Module):
    """Prompt embeddings ``[1, P, d]`` looked up from ids ``[1, P]`` and repeated over the batch."""

    def __init__(self, num_prompts: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.prompt = nn.Embedding(num_prompts, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: Tensor) -> Tensor:  # ids: [B, T]
        prompt = self.prompt(torch.arange(self.prompt.num_embeddings)[None])
        hidden = torch.cat([prompt.repeat(ids.shape[0], 1, 1), self.emb(ids)], 1)
        return self.head(hidden).pow(2).mean((1, 2))


@pytest.mark.parametrize("single_backward", [False, True])
def test_prompt_embeddings_repeated_over_the_batch(single_backward: bool) -> None:
    """With as many prompts as tokens (P = T = 6), expanding the prompts and repeating them made ``[B * B, P, d]``."""
    model = _PromptTuned(6)
    inputs = [torch.randint(0, 10, (2, 6)), torch.randint(0, 10, (2, 6)), torch.randint(0, 10, (3, 6))]
    _assert_unchanged_forward_and_exact(model, inputs, single_backward)


class _OneHeadBias(nn.Module):
    """A one-head bias ``[1, N, N]`` selected from a ``[1, n, n]`` table by position ids ``[N]``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, n, n))

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[:, positions][:, :, positions]


class _OneHead(nn.Module):
    def __init__(self, d: int = 4, n: int = 2) -> None:
        super().__init__()
        self.qk = nn.Linear(d, 2 * d)
        self.bias = _OneHeadBias(n)
        self.n = n

    def forward(self, x: Tensor) -> Tensor:  # x: [B, N, d] -> losses [B]
        q, k = self.qk(x).unsqueeze(1).chunk(2, -1)  # [B, 1, N, d]
        scores = q @ k.transpose(-1, -2) + self.bias(torch.arange(self.n))
        return scores.softmax(-1).pow(2).reshape(x.shape[0], -1).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_one_head_bias_while_the_batch_size_changes(single_backward: bool) -> None:
    """With N = B the ``[1, N, N]`` bias was left shared, with another B its head dimension was taken for a
    broadcast batch and expanded: the copies' gradients were summed as per-example ones (Gramian 0.7% off)."""
    model = _OneHead()
    inputs = [torch.randn(2, 2, 4), torch.randn(2, 2, 4), torch.randn(3, 2, 4), torch.randn(2, 2, 4)]
    _assert_unchanged_forward_and_exact(model, inputs, single_backward)


def _per_row_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and "batched backward pass over the" in str(w.message)
    ]


def _bert_losses(model: nn.Module, ids: Tensor, num_tasks: int) -> Tensor:
    logits = model(input_ids=ids).logits
    losses = nn.functional.cross_entropy(logits, torch.arange(ids.shape[0]) % 3, reduction="none")
    return losses if num_tasks == 1 else torch.stack([losses, logits[:, 0].pow(2)], 1)


def _gpt2_losses(model: nn.Module, ids: Tensor, num_tasks: int) -> Tensor:
    logits = model(input_ids=ids).logits
    losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    return losses if num_tasks == 1 else torch.stack([losses, logits[:, 0, 1].pow(2)], 1)


def _model(name: str) -> tuple[nn.Module, nn.Module]:
    """A tiny model with its position-embedding module (position ids ``[1, T]`` by default)."""
    if name == "bert":
        config = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=3)  # fmt: skip
        bert = BertForSequenceClassification(config)
        return bert, bert.bert.embeddings.position_embeddings
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    gpt2 = GPT2LMHeadModel(config)
    return gpt2, gpt2.transformer.wpe


@pytest.mark.parametrize(
    ("name", "num_tasks", "checkpointing", "single_backward"),
    [("bert", 1, False, False), ("bert", 2, True, True), ("gpt2", 1, True, False), ("gpt2", 2, False, True)],
)
def test_default_position_ids_stay_shared_without_the_per_row_pass(
    name: str, num_tasks: int, checkpointing: bool, single_backward: bool
) -> None:
    """BERT's and GPT-2's position embeddings ``[1, T, d]`` keep their shape (a user's hook on the module sees
    its own output), take the broadcast plan of the addition to the word embeddings and not the per-row pass
    (no warning over several steps; also for per-example task losses ``[B, m]`` and under activation
    checkpointing), and the steps are exact."""
    model, positions = _model(name)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant: transformers' default
    engine = Engine(model, single_backward=single_backward)
    seen: list[torch.Size] = []
    positions.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    losses_of = _bert_losses if name == "bert" else _gpt2_losses
    params = trainable(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch_size in (4, 4, 3):
            ids = torch.randint(1, V, (batch_size, 6))
            model.zero_grad(set_to_none=True)
            assert_exact_step(engine, losses_of(model, ids, num_tasks), params, single_backward)
    assert seen == [torch.Size([1, 6, 16])] * 3
    assert _per_row_warnings(caught) == []


class _Positioned(nn.Module):
    """Word and position embeddings ``[1, T, d]`` added between two modules, as in BERT."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(V, 8)
        self.positions = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        hidden = self.words(ids) + self.positions(torch.arange(ids.shape[1])[None])
        return self.head(torch.tanh(hidden)).pow(2).mean((1, 2))


@pytest.mark.slow  # compiling takes several seconds on CPU
@pytest.mark.parametrize(("num_tasks", "dynamic"), [(1, False), (2, True)])
def test_compiled_model_with_position_embeddings_takes_no_per_row_pass(num_tasks: int, dynamic: bool) -> None:
    """Under torch.compile the addition that broadcasts the ``[1, T, d]`` table is inside a compiled graph (one
    autograd node): a backward pass through that node per example, instead of the per-row pass (one backward
    pass through the model per row), also with dynamic shapes (whose sizes are inputs of the compiled graph
    too). The table keeps its shape."""
    import torch._functorch.config

    torch._dynamo.reset()
    model = _Positioned()
    engine = Engine(model)
    seen: list[torch.Size] = []
    model.positions.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    compiled = torch.compile(model, dynamic=dynamic)
    params = trainable(model)
    with torch._functorch.config.patch(donated_buffer=False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch_size in (4, 4, 3):
            ids = torch.randint(0, V, (batch_size, 6))
            losses = compiled(ids)
            losses = losses if num_tasks == 1 else torch.stack([losses, losses.sqrt()], 1)
            model.zero_grad(set_to_none=True)
            assert_exact_step(engine, losses, params, single_backward=False)
    assert seen == [torch.Size([1, 6, 8])] * 3
    assert _per_row_warnings(caught) == []


@pytest.mark.parametrize("num_tasks", [1, 2])
def test_shared_table_with_losses_that_mix_the_examples(num_tasks: int) -> None:
    """Losses centred over the batch mix the examples: the per-example gradients a broadcast plan assumes are
    not those of the losses, so the table takes the exact per-row path with the other calls (``[B]`` and
    ``[B, m]`` losses), and the table keeps its shape."""
    model = _Positioned()
    engine = Engine(model)
    seen: list[torch.Size] = []
    model.positions.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    params = trainable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the warning about losses that mix the examples)
        for batch_size in (4, 4, 3):
            losses = model(torch.randint(0, V, (batch_size, 6)))
            losses = losses - 0.5 * losses.mean()
            losses = losses if num_tasks == 1 else torch.stack([losses, losses.exp()], 1)
            model.zero_grad(set_to_none=True)
            assert_exact_step(engine, losses, params, single_backward=False)
    assert seen == [torch.Size([1, 6, 8])] * 3
