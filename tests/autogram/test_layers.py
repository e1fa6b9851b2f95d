"""Each closed form against the explicit Jacobian: Linear (both forms), Conv1D, Embedding,
Conv2d, LayerNorm, the generic path and tied parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from hf_jd.autogram import Engine
from hf_jd.autogram._outer import OuterProductRows

from ._reference import assert_exact_step, assert_gramian_matches, jacobian, trainable


@pytest.mark.parametrize(("length", "d_in", "d_out"), [(2, 16, 16), (16, 2, 3)])
def test_linear_ghost_and_materialised_forms(length: int, d_in: int, d_out: int) -> None:
    inputs = torch.randn(3, length, d_in)
    grads = torch.randn(3, 2, length, d_out)
    factors = OuterProductRows(inputs, grads)
    rows = torch.einsum("ekto,eti->ekoi", grads, inputs).reshape(6, -1)
    expected = rows @ rows.T
    torch.testing.assert_close(factors.cross_gram(factors, force_ghost=True), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(factors.weight_gram(), expected, rtol=1e-4, atol=1e-4)
    # The cheaper form is picked: ghost for short sequences of wide layers, else materialised.
    assert factors.prefers_ghost() == (length == 2)


@pytest.mark.parametrize("transposed", [False, True])
def test_ghost_form_of_cancelling_gradients_on_nearly_equal_inputs(transposed: bool) -> None:
    """A multiple-choice head: per example, nearly equal inputs (the pooled context shared by the choices) and output
    gradients that sum to zero over the positions (a softmax over the choices). The ghost form's terms are then about
    10⁸ times larger than their sum; it must still match the per-row gradients' Gram computed in float64."""
    torch.manual_seed(0)
    examples, length, width = 4, 3, 16
    common = torch.randn(examples, 1, width, dtype=torch.float64)
    inputs = common + 1e-4 * torch.randn(examples, length, width, dtype=torch.float64)
    coefficients = torch.randn(examples, 1, length, 1, dtype=torch.float64)
    coefficients = coefficients - coefficients.mean(dim=2, keepdim=True)
    grads = coefficients * torch.randn(examples, 1, 1, width, dtype=torch.float64)
    inputs, grads = inputs.float().double(), grads.float().double()  # (the truth of the float32 factors)
    pattern = "ekto,eti->ekio" if transposed else "ekto,eti->ekoi"
    rows = torch.einsum(pattern, grads, inputs).reshape(examples, -1)
    expected = rows @ rows.T
    factors = OuterProductRows(inputs.float(), grads.float(), transposed)
    assert factors.prefers_ghost()
    gram = factors.cross_gram(factors, force_ghost=True).double()
    torch.testing.assert_close(gram, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    # Diverse inputs keep the plain form (centring would cost another pass over the output gradients).
    assert len(factors._ghost_parts()) == 2
    assert len(OuterProductRows(torch.randn(examples, length, width), grads.float(), transposed)._ghost_parts()) == 1


@pytest.mark.parametrize(
    ("shape", "ghost"),
    [
        ((16, 17, 256, 64), False),  # ViT's MLP at 32-pixel images: rows that stay in the caches (measured 0.32 ms
        ((16, 17, 128, 128), False),  # materialised against 0.53 ms ghost, one CPU thread)
        ((16, 24, 384, 96), False),
        ((16, 17, 256, 128), True),
        ((16, 8, 256, 256), True),
        ((16, 10, 768, 768), True),  # large rows: memory-bound (36 ms against 1 ms)
        ((32, 64, 128, 128), False),  # the BERT at B = 32, T = 64
    ],
)
def test_form_chosen_by_cost(shape: tuple[int, int, int, int], ghost: bool) -> None:
    """Cases measured both ways on CPU: the cost model picks the faster form."""
    examples, length, d_in, d_out = shape
    factors = OuterProductRows(torch.empty(examples, length, d_in), torch.empty(examples, 1, length, d_out))
    assert factors.prefers_ghost() == ghost


@pytest.mark.parametrize(("first_transposed", "second_transposed"), [(False, False), (False, True), (True, True)])
def test_cross_gram_of_two_uses_in_chunks(
    monkeypatch: pytest.MonkeyPatch, first_transposed: bool, second_transposed: bool
) -> None:
    import hf_jd.autogram._outer as outer

    monkeypatch.setattr(outer, "MAX_GHOST_BLOCK", 10)  # one example per chunk

    def make(transposed: bool, length: int) -> tuple[OuterProductRows, torch.Tensor]:
        d_in, d_out = (5, 4) if transposed else (4, 5)
        inputs, grads = torch.randn(3, length, d_in), torch.randn(3, 2, length, d_out)
        factors = OuterProductRows(inputs, grads, transposed)
        pattern = "ekto,eti->ekio" if transposed else "ekto,eti->ekoi"
        return factors, torch.einsum(pattern, grads, inputs).reshape(6, -1)

    first, first_rows = make(first_transposed, 2)
    second, second_rows = make(second_transposed, 3)
    expected = first_rows @ second_rows.T
    torch.testing.assert_close(first.cross_gram(second, force_ghost=True), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first.cross_gram(second), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transposed", [False, True])
def test_materialised_rows_over_budget_go_in_chunks(monkeypatch: pytest.MonkeyPatch, transposed: bool) -> None:
    import hf_jd.autogram._outer as outer

    inputs, grads = torch.randn(2, 16, 3), torch.randn(2, 2, 16, 5)
    factors = OuterProductRows(inputs, grads, transposed)
    other = OuterProductRows(torch.randn(2, 9, 3), torch.randn(2, 2, 9, 5), transposed)
    expected = factors.weight_rows() @ factors.weight_rows().T
    expected_cross = factors.weight_rows() @ other.weight_rows().T
    monkeypatch.setattr(outer, "MAX_ROW_ENTRIES", 4 * 5)  # (too large to keep)
    monkeypatch.setattr(outer, "CPU_CHUNK_ENTRIES", 4 * 5)  # one row of the weight per chunk
    assert len(factors._chunks()) == (3 if transposed else 5)
    assert not factors.prefers_ghost()
    torch.testing.assert_close(factors.weight_gram(keep_rows=True), expected, rtol=1e-4, atol=1e-4)
    assert factors._rows is None  # too large to keep
    torch.testing.assert_close(factors.cross_gram(other), expected_cross, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [1, 2, 12])
def test_linear_in_model_both_forms(length: int) -> None:
    model = nn.Sequential(nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 2))
    engine = Engine(model)
    losses = model(torch.randn(3, length, 24)).pow(2).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_gpt2_conv1d() -> None:
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(2, 6))
    engine = Engine(model)
    losses = model(torch.randn(3, 5, 4)).pow(2).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _Tokens(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4, padding_idx=padding_idx)
        self.out = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_with_repeated_and_shared_ids(padding_idx: int | None) -> None:
    model = _Tokens(padding_idx)
    engine = Engine(model)
    ids = torch.tensor([[0, 3, 3, 5, 0], [1, 3, 7, 0, 0], [2, 2, 9, 10, 5]])
    losses = model(ids).pow(2).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_embedding_per_task_rows_and_task_mode() -> None:
    model = _Tokens(0)
    ids = torch.randint(0, 11, (3, 6))
    engine = Engine(model)
    out = model(ids)
    losses = torch.stack([out[..., 0].sum(1), out[..., 1].pow(2).mean(1)], dim=1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    engine.remove()
    engine = Engine(model, batch_dim=None)
    out = model(ids)
    losses = torch.stack([out[..., 0].sum(), out[..., 1].pow(2).mean()])
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _CommonIds(nn.Module):
    """Word embeddings plus a table looked up with the same ids for every example (positions or
    token types, broadcast as ``[1, T]`` or passed expanded), optionally tied with a Linear."""

    def __init__(self, padding_idx: int | None, tied: bool = False) -> None:
        super().__init__()
        self.words = nn.Embedding(11, 4)
        self.common = nn.Embedding(7, 4, padding_idx=padding_idx)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        if tied:
            self.head.weight = self.common.weight

    def forward(self, ids: torch.Tensor, common_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.words(ids) + self.common(common_ids))))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("num_tasks", [1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_embedding_with_ids_common_to_all_examples(
    padding_idx: int | None, expanded: bool, num_tasks: int, tied: bool
) -> None:
    """Ids shared by the whole batch (repeated within an example, with padding) take a dense
    closed form; the Gramian and the single-backward gradient match the explicit Jacobian."""
    torch.manual_seed(0)
    model = _CommonIds(padding_idx, tied)
    engine = Engine(model, single_backward=True)
    ids = torch.randint(0, 11, (4, 6))
    common = torch.tensor([[0, 3, 3, 5, 0, 6]])
    if expanded:
        common = common.expand(4, -1)  # stride 0 along the batch, as HF's token_type_ids buffer
    out = model(ids, common)
    losses = (
        out.pow(2).mean((1, 2)) if num_tasks == 1 else torch.stack([out.pow(2).mean((1, 2)), out[..., 0].sum(1)], 1)
    )
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses), jac)
    weights = torch.linspace(0.5, 1.5, losses.numel())
    engine.backward(weights)
    expected = weights @ jac
    actual = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


class _InPlaceAfterLinear(nn.Module):
    """A Linear layer on [B, T, d] inputs (its output is a view of a [B * T, d] product) whose output
    is then changed in place, as Wav2Vec2's padding (``h[mask] = 0``) or ``ReLU(inplace=True)``."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        if self.change == "masked":
            mask = torch.zeros(hidden.shape[:2], dtype=torch.bool)
            mask[0, -2:] = True
            hidden[mask] = 0.0
        elif self.change == "relu_":
            hidden.relu_()
        else:
            hidden += 1.0
        return self.second(torch.tanh(hidden))


@pytest.mark.parametrize("change", ["masked", "relu_", "add_"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_output_changed_in_place_after_a_linear_layer(change: str, single_backward: bool) -> None:
    """The in-place change left the output's own autograd edge out of the graph: its Gramian
    contribution was silently lost (and, with the single backward, its gradient)."""
    torch.manual_seed(0)
    model = _InPlaceAfterLinear(change)
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(3, 5, 4)).pow(2).sum((1, 2))
    assert_exact_step(engine, losses, trainable(model), single_backward)


def test_embedding_scale_grad_by_freq_is_rejected() -> None:
    model = nn.Embedding(5, 3, scale_grad_by_freq=True)
    Engine(model)
    with pytest.raises(RuntimeError, match="scale_grad_by_freq"):
        model(torch.tensor([[1, 2]]))


class _TiedLM(nn.Module):
    """Input embedding tied with the output projection, plus a broadcast position embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.position = nn.Embedding(6, 4)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, T], broadcast over the batch
        hidden = self.embed(ids) + self.position(positions)
        return self.head(torch.tanh(self.hidden(hidden)))


def test_tied_embedding_and_broadcast_positions() -> None:
    model = _TiedLM()
    engine = Engine(model)
    ids = torch.randint(0, 9, (3, 5))
    logits = model(ids)
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(1)
    params = trainable(model)
    assert len(engine.parameters()) == len(params) == 4
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, params))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_tied_embedding_used_twice_with_several_tasks(batch_dim: int | None) -> None:
    model = _TiedLM()
    engine = Engine(model, batch_dim=batch_dim)
    ids = torch.randint(0, 9, (3, 5))
    logits = model(ids) + model.head(model.embed(ids.flip(1)))
    if batch_dim is None:
        losses = torch.stack([logits[..., :4].logsumexp(-1).mean(), logits.pow(2).mean(), logits[:, 0].sum()])
    else:
        losses = torch.stack([logits[..., :4].logsumexp(-1).mean(1), logits.pow(2).mean((1, 2))], dim=1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_tied_parameter_in_generic_module_is_materialised() -> None:
    class Scale(nn.Module):
        def __init__(self, weight: nn.Parameter) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight.sum(0)

    model = _TiedLM()
    model.scale = Scale(model.embed.weight)
    engine = Engine(model)
    ids = torch.randint(0, 9, (3, 5))
    losses = model.scale(model(ids)[..., :4]).pow(2).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_broadcast_expansion_keeps_values() -> None:
    model = _TiedLM()
    ids = torch.randint(0, 9, (3, 5))
    expected = model(ids)
    Engine(model)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(1, 2), bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.conv2(torch.relu(self.conv1(x))))
        return self.head(hidden.mean(dim=(2, 3)))


def test_cnn_per_example() -> None:
    model = _CNN()
    engine = Engine(model)
    losses = model(torch.randn(3, 2, 7, 8)).pow(2).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_cnn_tasks() -> None:
    model = _CNN()
    engine = Engine(model, batch_dim=None)
    out = model(torch.randn(3, 2, 7, 8))
    losses = torch.stack([out[:, 0].mean(), out[:, 1].pow(2).mean()])
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_grouped_and_1d_convolutions_with_string_padding() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, padding="same"), nn.Flatten(1), nn.Unflatten(1, (4, 25)),
                          nn.Conv1d(4, 2, 3), nn.Flatten(1))
    engine = Engine(model)
    losses = model(torch.randn(2, 4, 5, 5)).pow(2).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _RMSNorm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_generic_module_called_twice_with_shared_parameters() -> None:
    norm = _RMSNorm(4)
    layer = nn.Linear(4, 4)
    model = nn.ModuleList([norm, layer])
    engine = Engine(model)
    x = torch.randn(3, 2, 4)
    losses = norm(layer(norm(x))).pow(3).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_generic_module_with_children_and_direct_parameters() -> None:
    class WithToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.randn(1, 1, 4))
            self.proj = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = torch.cat([self.token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
            return tokens, tokens.mean(1)

    model = WithToken()
    engine = Engine(model)
    tokens, pooled = model(torch.randn(3, 2, 3))
    losses = tokens.pow(2).sum((1, 2)) + pooled.sin().sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_layer_norm_without_bias_and_2d_shape() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Unflatten(-1, (2, 3)), nn.LayerNorm((2, 3), bias=False),
                          nn.Flatten(-2), nn.Linear(6, 1))
    engine = Engine(model)
    losses = model(torch.randn(4, 3, 6)).pow(2).sum((1, 2))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_multihead_attention_uses_its_output_projection_directly(batch_dim: int | None) -> None:
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    model = nn.ModuleList([attention, nn.Linear(4, 2)])
    engine = Engine(model, batch_dim=batch_dim)
    x = torch.randn(3, 5, 4)
    out = model[1](attention(x, x, x)[0])
    losses = out.pow(2).sum((1, 2)) if batch_dim == 0 else out.pow(2).mean((0, 1))
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _ProbePooling(nn.Module):
    """Attention pooling with a learned query (SigLIP's head): a module with a parameter of its own
    around an nn.MultiheadAttention, which uses its out_proj without calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.probe = nn.Parameter(torch.randn(1, 1, 8))
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        pooled = self.attention(self.probe.expand(x.shape[0], -1, -1), hidden, hidden)[0][:, 0]
        return self.head(pooled).squeeze(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_multihead_attention_under_a_parent_with_parameters(single_backward: bool) -> None:
    model = _ProbePooling()
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(3, 5, 4)).pow(2)
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)


class _DirectUse(nn.Module):
    """Uses its child's weight without calling the child (unless ``call_child``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.child = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, use_child: bool = True) -> torch.Tensor:
        x = x * self.scale
        return x @ self.child.weight.T if use_child else x


@pytest.mark.parametrize("single_backward", [False, True])
def test_direct_use_of_an_uncalled_child_is_borrowed(single_backward: bool) -> None:
    """A module with parameters of its own that uses its child's weight without calling the child (it raised): on the
    first step the child's weight takes the per-row pass of parameters used outside the captured calls; from then on
    the module borrows the child, whose weight its generic record covers with its own. Exact on every step."""
    from ._reference import assert_exact_step_with_freed_graph

    torch.manual_seed(0)
    model = _DirectUse()
    engine = Engine(model, single_backward=single_backward)
    for batch in (2, 3, 3):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, 4)).pow(2).sum(1)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert engine._capture.infos[id(model)].borrowed == {"child": model.child}


def test_uncalled_unused_child_is_fine() -> None:
    model = _DirectUse()
    engine = Engine(model)
    losses = model(torch.randn(2, 4), use_child=False).pow(2).sum(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


def test_parameter_used_in_unsupported_layout_is_reported() -> None:
    lstm = nn.LSTM(3, 4)  # sequence-first: dimension 0 is time, not batch
    engine = Engine(lstm)
    out, _ = lstm(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="batch of 5 examples"):
        engine.compute_gramian(out.sum((0, 2)))


def test_generic_path_in_chunks_of_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_jd.autogram._generic as generic

    monkeypatch.setattr(generic, "MAX_SPREAD_ENTRIES", 1)  # one example per vector-Jacobian product
    model = nn.Sequential(nn.Linear(4, 4), _RMSNorm(4), nn.Linear(4, 2))
    engine = Engine(model)
    out = model(torch.randn(3, 5, 4))
    losses = torch.stack([out[..., 0].sum(1), out[..., 1].pow(2).mean(1)], dim=1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _OnePlusRMSNorm(nn.Module):
    """Gemma-style ``(1 + w) ⊙ x̂``: the same per-row gradient ``Σ g ⊙ x̂`` as ``w ⊙ x̂``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size) * 0.1)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class _T5StyleLayerNorm(nn.Module):
    """T5's RMS norm, whose class name says "LayerNorm" (no mean subtracted, no bias)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class _SquaredScaleNorm(nn.Module):
    """``w² ⊙ x̂``: a norm by its name and shape whose closed form does not apply (generic path)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.pow(2) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


@pytest.mark.parametrize(
    ("norm", "closed_form"),
    [(nn.RMSNorm(6), True), (nn.RMSNorm(6, eps=1e-3), True), (_OnePlusRMSNorm(6), True),
     (_T5StyleLayerNorm(6), True), (_SquaredScaleNorm(6), False)],
)
def test_rms_norm_closed_form_is_verified(
    monkeypatch: pytest.MonkeyPatch, norm: nn.Module, closed_form: bool
) -> None:
    from hf_jd.autogram._rms_norm import RMSNormRecord, is_rms_norm_like

    assert is_rms_norm_like(norm)  # by its name and shape; the formula is checked on the tensors
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Linear(6, 2))
    engine = Engine(model)
    used: list[bool] = []
    original = RMSNormRecord.per_row

    def spy(self: RMSNormRecord, name: str) -> torch.Tensor:
        used.append(self.closed_form)
        return original(self, name)

    monkeypatch.setattr(RMSNormRecord, "per_row", spy)
    out = model(torch.randn(3, 5, 4))
    losses = torch.stack([out[..., 0].sum(1), out[..., 1].pow(2).mean(1)], dim=1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert used == [closed_form]


class _ScaledInput(nn.Module):
    """A module with a parameter of its own that scales its input before calling a child Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.scale)


@pytest.mark.parametrize("root", [True, False])
@pytest.mark.parametrize("single_backward", [False, True])
def test_own_parameter_before_a_child_call(root: bool, single_backward: bool) -> None:
    """As the first parametrised call, the generic record's per-example products ran through the child's
    node while the streaming hooks were still registered there (a vmap error)."""
    torch.manual_seed(0)
    model = _ScaledInput() if root else nn.Sequential(nn.Linear(4, 4), _ScaledInput())
    engine = Engine(model, single_backward=single_backward)
    losses = model(torch.randn(3, 4)).pow(2).sum(-1)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jacobian(losses, trainable(model)))


class _MatmulLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own that computes the same map (Falcon's FalconLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class _DoubledLinear(nn.Linear):
    """An nn.Linear subclass whose forward is not F.linear of its parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, 2 * self.weight, self.bias)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize(("layer", "closed_form"), [(_MatmulLinear, True), (_DoubledLinear, False)])
def test_linear_subclass_with_its_own_forward_is_verified(
    layer: type, closed_form: bool, single_backward: bool
) -> None:
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(0)
    model = nn.Sequential(layer(4, 5), nn.Tanh(), layer(5, 2, bias=False))
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):  # the first call decides; the later ones take the chosen path
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(3, 6, 4))
        losses = torch.stack([out[..., 0].sum(1), out[..., 1].pow(2).mean(1)], dim=1)
        assert_exact_step(engine, losses, trainable(model), single_backward)
        kinds = {info.kind for info in engine._capture.infos.values()}
        assert kinds == ({Kind.LINEAR} if closed_form else {Kind.GENERIC})


class _ScaledEmbedding(nn.Embedding):
    """BART's / Gemma's scaled word embedding: ``W[ids] · c`` through the stock lookup."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 3.0


class _PaddingBlindEmbedding(nn.Embedding):
    """A lookup that ignores ``padding_idx`` (the padding row gets gradient): not the closed form's."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight) * 3.0


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize(("layer", "closed_form"), [(_ScaledEmbedding, True), (_PaddingBlindEmbedding, False)])
def test_embedding_subclass_with_its_own_forward_is_verified(
    layer: type, closed_form: bool, single_backward: bool
) -> None:
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(0)
    embedding = layer(10, 4, padding_idx=0)
    head = nn.Linear(4, 1)
    model = nn.Sequential(embedding, nn.Tanh(), head)
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):  # the first call decides; the later ones take the chosen path
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([[1, 2, 0, 0], [3, 3, 4, 0], [5, 1, 2, 6]])  # padding, repeated and shared ids
        losses = model(ids).squeeze(-1).pow(2).sum(1)
        assert_exact_step(engine, losses, trainable(model), single_backward)
        assert engine._capture.infos[id(embedding)].kind is (Kind.EMBEDDING if closed_form else Kind.GENERIC)


class _PositionsOfIds(nn.Embedding):
    """FSMT's positional embedding: it looks up the positions of its input ids, not the ids."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.arange(ids.shape[1]).expand_as(ids))


class _ClampedEmbedding(nn.Embedding):
    """Looks up its ids clamped to the table: the same as the stock lookup while they are all in range."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids.clamp(max=self.num_embeddings - 1))


@pytest.mark.parametrize(("layer", "first_highest"), [(_PositionsOfIds, 100), (_ClampedEmbedding, 8)])
def test_embedding_subclass_given_ids_outside_its_table(layer: type, first_highest: int) -> None:
    """The check of an Embedding subclass looked its input ids up in its table: ids beyond the table (more tokens
    than positions) raised an IndexError from the engine's hook, on the first step or on a later one."""
    torch.manual_seed(0)
    tokens, positions, head = nn.Embedding(100, 4), layer(8, 4), nn.Linear(4, 1)
    model = nn.ModuleList([tokens, positions, head])
    engine = Engine(model)
    for highest in (first_highest, 100, 100):  # (the clamped lookup's check passes on ids all in its table)
        ids = torch.randint(0, highest, (3, 6))
        losses = head(torch.tanh(tokens(ids) + positions(ids))).squeeze(-1).sum(1).pow(2)
        assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_closed_form(single_backward: bool, channels_last: bool) -> None:
    """GroupNorm in closed form (the generic path cost a backward pass per example, and vmap rejected
    channels-last inputs), over 2-D and 1-D spatial inputs, per-example and per-task losses."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(0)
    image = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.GroupNorm(4, 4))
    audio = nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(4, 4), nn.GELU())
    for model, x in ((image, torch.randn(3, 3, 7, 7)), (audio, torch.randn(3, 2, 9))):
        if channels_last and x.dim() == 4:
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        for batch_dim in (0, None):
            engine = Engine(model, batch_dim=batch_dim, single_backward=single_backward)
            model.zero_grad(set_to_none=True)
            out = model(x).flatten(1)
            losses = torch.stack([out.pow(2).mean(1), out.tanh().mean(1)], dim=1)  # [B, 2]
            assert_exact_step(engine, losses if batch_dim == 0 else losses.sum(0), trainable(model), single_backward)
            kinds = {type(info.module).__name__: info.kind for info in engine._capture.infos.values()}
            assert kinds["GroupNorm"] is Kind.GROUP_NORM
            engine.remove()


def _with_running_statistics(model: nn.Module) -> nn.Module:
    """The model's batch norms given running statistics away from 0 and 1 and put in evaluation mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_in_evaluation_mode_closed_form(single_backward: bool, channels_last: bool) -> None:
    """Batch norms in evaluation mode (a convolutional backbone fine-tuned with its statistics frozen) in closed form,
    from the running statistics (the generic path cost a backward pass per example: ResNet 6x a plain step), on
    [N, C, H, W], [N, C, L] and [N, C] inputs, per-example and per-task losses; with batch_dim=None also in training
    mode, from the batch's statistics (which do not update the running ones a second time)."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(0)
    image = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))
    sequence = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.GELU(), nn.Flatten(), nn.Linear(28, 5),
                             nn.BatchNorm1d(5))  # fmt: skip
    for model, x in ((image, torch.randn(3, 3, 7, 7)), (sequence, torch.randn(3, 2, 9))):
        if channels_last and x.dim() == 4:
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        for batch_dim, training in ((0, False), (None, False), (None, True)):
            model = _with_running_statistics(model).train(training)
            engine = Engine(model, batch_dim=batch_dim, single_backward=single_backward)
            model.zero_grad(set_to_none=True)
            norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            running = [norm.running_mean.clone() for norm in norms]
            out = model(x).flatten(1)
            losses = torch.stack([out.pow(2).mean(1), out.tanh().mean(1)], dim=1)  # [B, 2]
            assert_exact_step(engine, losses if batch_dim == 0 else losses.sum(0), trainable(model), single_backward)
            kinds = {info.kind for info in engine._capture.infos.values() if "BatchNorm" in type(info.module).__name__}
            assert kinds == {Kind.BATCH_NORM}
            # (training: updated once, by the forward pass)
            assert all(torch.equal(a, norm.running_mean) for a, norm in zip(running, norms)) != training
            engine.remove()


class _FlattenedBatchNorms(nn.Module):
    """Norms of several samples per example: LeViT's batch norms of [B * T, C] tokens, and a GroupNorm and a batch
    norm of [B * k, C, L] samples (PatchTST's channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.tokens = nn.Linear(4, 6), nn.BatchNorm1d(6)
        self.group, self.channels = nn.GroupNorm(2, 6), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 4] -> [B, 2]
        batch, length, _ = x.shape
        h = self.tokens(self.first(x).flatten(0, 1)).view(batch, length, 6)
        samples = h.reshape(batch * 2, length // 2, 6).transpose(1, 2)  # [B * 2, C, T / 2]
        h = self.channels(self.group(samples).tanh()).transpose(1, 2).reshape(batch, length, 6)
        return self.head(h).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_norms_of_several_samples_per_example_are_regrouped(single_backward: bool, monkeypatch) -> None:
    """A batch norm (evaluation mode) or GroupNorm whose samples are k per example is verified batch-major and keeps
    its closed form, for per-example and per-example-per-task losses (it took the per-row pass on every step)."""
    from ._reference import assert_exact_step, count_per_row

    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = _with_running_statistics(_FlattenedBatchNorms())
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for per_task in (False, True, False):
            per_row.clear()
            model.zero_grad(set_to_none=True)
            out = model(torch.randn(3, 4, 4))
            assert_exact_step(engine, out if per_task else out.sum(1), trainable(model), single_backward)
    assert per_row == []


class _Frames(nn.Module):
    """A video-like layout: ``[B, k, C, H, W]`` frames folded into ``[B * k, C, H, W]`` samples for a patch convolution
    and a padded 3x3 convolution, then unfolded back per example (``interleaved``: folded frame-major, so that the
    samples of an example are not consecutive)."""

    def __init__(self, interleaved: bool = False) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 6, 2, stride=2)
        self.mix = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)
        self.interleaved = interleaved

    def forward(self, x: Tensor) -> Tensor:  # [B, k, 3, 4, 4] -> [B, 2]
        batch, frames = x.shape[:2]
        if self.interleaved:
            samples = x.transpose(0, 1).reshape(frames * batch, *x.shape[2:])
        else:
            samples = x.reshape(batch * frames, *x.shape[2:])
        h = self.mix(self.patches(samples).tanh())  # [B * k, 5, 2, 2]
        h = h.view(frames, batch, -1) if self.interleaved else h.view(batch, frames, -1)
        h = h.transpose(0, 1) if self.interleaved else h
        return self.head(h.reshape(batch, frames, 5, -1).mean(dim=(1, 3)))


@pytest.mark.parametrize("single_backward", [False, True])
def test_convolutions_on_several_samples_per_example_are_regrouped(single_backward: bool, monkeypatch) -> None:
    """Convolutions on ``[B * k, C, H, W]`` samples (a video model's frames) are verified batch-major and keep their
    closed form, for per-example and per-example-per-task losses (they took the per-row pass on every step)."""
    from ._reference import count_per_row

    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = _Frames()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for per_task in (False, True, False):
            per_row.clear()
            model.zero_grad(set_to_none=True)
            out = model(torch.randn(3, 4, 3, 4, 4))
            assert_exact_step(engine, out if per_task else out.sum(1), trainable(model), single_backward)
    assert per_row == []


@pytest.mark.parametrize("single_backward", [False, True])
def test_convolutions_on_one_sample_per_example_after_several(single_backward: bool) -> None:
    """A step with one frame per example after steps with several: the call, verified with k = 1 (its module was seen
    regrouped), gets its gradients with a grouping axis of 1 (it crashed on their five dimensions; vision-language
    models with one image per example after a batch with several)."""
    torch.manual_seed(0)
    model = _Frames()
    engine = Engine(model, single_backward=single_backward)
    for frames in (4, 1, 2, 1):
        model.zero_grad(set_to_none=True)
        assert_exact_step(engine, model(torch.randn(3, frames, 3, 4, 4)).sum(1), trainable(model), single_backward)


def test_convolutions_on_samples_of_interleaved_examples_stay_exact(monkeypatch) -> None:
    """Frames folded frame-major: the samples of an example are not consecutive, the check finds it and the
    convolutions take the exact per-row path."""
    from ._reference import count_per_row

    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = _Frames(interleaved=True)
    engine = Engine(model)
    out = model(torch.randn(3, 4, 3, 4, 4))
    assert_exact_step(engine, out.sum(1), trainable(model), False)
    assert per_row


class _ChoicesThroughAnRMSNorm(nn.Module):
    """A multiple-choice layout: ``[B, C, T, 4]`` features folded into ``[B * C, T, d]`` rows, normalised by an
    RMSNorm, one score per choice."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.first, self.norm, self.head = nn.Linear(4, 6), norm, nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T, 4] -> [B, C]
        batch, choices, length, _ = x.shape
        h = self.norm(self.first(x.reshape(batch * choices, length, 4)))
        return self.head(torch.tanh(h)).mean(dim=(1, 2)).view(batch, choices)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("norm", ["torch", "llama"])
def test_rms_norm_on_rows_of_several_samples_per_example_is_regrouped(
    single_backward: bool, norm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An RMSNorm on ``[B * C, T, d]`` rows is verified batch-major and keeps its closed form, as LayerNorm does, for
    per-example and per-example-per-task losses (it took the per-row pass on every step)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from hf_jd.autogram._rms_norm import RMSNormRecord

    from ._reference import assert_exact_step, count_per_row

    per_row = count_per_row(monkeypatch)
    closed_forms: list[bool] = []
    original = RMSNormRecord._bind

    def bind(self, *args):  # type: ignore[no-untyped-def]
        original(self, *args)
        closed_forms.append(self.closed_form)

    monkeypatch.setattr(RMSNormRecord, "_bind", bind)
    torch.manual_seed(0)
    module = nn.RMSNorm(6, eps=1e-6) if norm == "torch" else LlamaRMSNorm(6)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    model = _ChoicesThroughAnRMSNorm(module)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for per_task in (False, True, False):
            model.zero_grad(set_to_none=True)
            scores = model(torch.randn(3, 2, 5, 4))
            losses = scores.pow(2) if per_task else nn.functional.cross_entropy(scores, torch.tensor([0, 1, 1]),
                                                                                 reduction="none")
            assert_exact_step(engine, losses, trainable(model), single_backward)
    assert per_row == []
    assert closed_forms and all(closed_forms)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("folded", [False, True])
def test_conv1d_and_grouped_conv2d_closed_form(
    single_backward: bool, folded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conv1d (any groups, stride, dilation, padding) and grouped / depthwise Conv2d in closed form, for
    per-example losses and task losses, against the explicit Jacobian: with the rows folded into the groups of the
    convolution's weight-gradient kernel, and with the unfolded patches. Also on a channels-last input (ConvNeXt's
    depthwise convolutions), whose backward pass is vmapped."""
    from hf_jd.autogram import _conv
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    monkeypatch.setattr(_conv, "MAX_FOLDED_GROUP_CHANNELS", 10**9 if folded else 0)
    torch.manual_seed(0)
    audio = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.GELU(), nn.Conv1d(4, 4, 3, dilation=2, groups=2),
                          nn.Tanh(), nn.Conv1d(4, 3, 1, bias=False))
    image = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(4, 6, (3, 2), stride=2, groups=2)
    )
    channels_last = torch.randn(3, 7, 7, 4).permute(0, 3, 1, 2)
    # depthwise kernels (one input channel per group) with channel multipliers, strides, dilations and paddings
    depthwise_image = nn.Sequential(
        nn.Conv2d(4, 8, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2), groups=4), nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False),
    )
    depthwise_audio = nn.Sequential(nn.Conv1d(3, 6, 3, stride=2, dilation=2, padding=3, groups=3), nn.Tanh(),
                                    nn.Conv1d(6, 6, 4, groups=6))
    for model, x in ((audio, torch.randn(3, 2, 11)), (image, torch.randn(3, 4, 7, 7)), (image, channels_last),
                     (depthwise_image, torch.randn(3, 4, 9, 8)), (depthwise_audio, torch.randn(3, 3, 17))):
        for batch_dim in (0, None):
            engine = Engine(model, batch_dim=batch_dim, single_backward=single_backward)
            model.zero_grad(set_to_none=True)
            out = model(x).flatten(1)
            losses = torch.stack([out.pow(2).mean(1), out.tanh().mean(1)], dim=1)  # [B, 2]
            assert_exact_step(engine, losses if batch_dim == 0 else losses.sum(0), trainable(model), single_backward)
            assert {info.kind for info in engine._capture.infos.values()} == {Kind.GROUPED_CONV}
            engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_convolutions_padded_otherwise_than_with_zeros_keep_their_closed_forms(
    single_backward: bool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conv1d and Conv2d with ``padding_mode`` other than ``"zeros"`` (HiFi-GAN-style vocoders pad by reflection), also
    grouped, weight-normalised, and with ``padding="same"`` on an even kernel (padded unevenly): their closed forms pad
    the captured input the same way (they took the per-row pass on every step)."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import count_per_row

    per_row = count_per_row(monkeypatch)
    torch.manual_seed(0)
    audio = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 4, 5, padding=2, padding_mode=mode)), nn.Tanh(),
        nn.Conv1d(4, 4, 4, padding="same", dilation=1, groups=2, padding_mode=mode), nn.Tanh(),
        nn.Conv1d(4, 3, 3, stride=2, padding=1, padding_mode=mode),
    )
    image = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.Tanh(),
                          nn.Conv2d(4, 4, (2, 3), padding="same", groups=4, padding_mode=mode))
    for model, x in ((audio, torch.randn(3, 2, 12)), (image, torch.randn(3, 3, 6, 5))):
        engine = Engine(model, single_backward=single_backward)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for per_task in (False, True):
                model.zero_grad(set_to_none=True)
                out = model(x).flatten(1)
                losses = torch.stack([out.pow(2).mean(1), out.tanh().mean(1)], dim=1)
                assert_exact_step(engine, losses if per_task else losses.sum(1), trainable(model), single_backward)
        infos = engine._capture.infos.values()
        kinds = [info.kind for info in infos if isinstance(info.module, (nn.Conv1d, nn.Conv2d))]
        assert kinds and set(kinds) <= {Kind.GROUPED_CONV, Kind.CONV2D}
        engine.remove()
    assert per_row == []


@pytest.mark.parametrize(
    "layer", [nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1, groups=3), nn.GroupNorm(1, 3), nn.BatchNorm2d(3).eval()]
)
def test_sample_first_layers_take_the_per_row_path_under_another_batch_dim(layer: nn.Module) -> None:
    """Convolutions, GroupNorm and batch norms take their samples along dimension 0: with batch_dim=1, the size of
    their channels is never taken for the examples' (their closed forms would mix them), also when it equals the batch
    size; the exact per-row path gives the Gramian instead (it raised)."""
    torch.manual_seed(0)
    engine = Engine(layer, batch_dim=1)
    losses = layer(torch.randn(2, 3, 4, 4)).pow(2).sum((0, 2, 3))  # [3]: one "example" per channel
    jac = jacobian(losses, trainable(layer))
    assert_gramian_matches(engine.compute_gramian(losses), jac)


class _SwapLastTwo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2)


class _ChannelsLayerNorm(nn.Module):
    """ConvNeXt-style layer norm over the last dimension or, channels first, over dimension 1."""

    def __init__(self, size: int, channels_first: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size))
        self.bias = nn.Parameter(torch.randn(size))
        self.eps = 1e-6
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        x = nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1) if self.channels_first else x


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("channels_first", [False, True])
def test_layer_norm_look_alike_is_verified(channels_first: bool, single_backward: bool) -> None:
    """A layer norm by another name, over the last dimension or over dimension 1 (ConvNeXt's channels-first form,
    handled like a GroupNorm's per-channel affine map): verified on the first call, then in closed form."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(0)
    norm = _ChannelsLayerNorm(4, channels_first)
    swap = [_SwapLastTwo()] if channels_first else []  # [B, T, d] <-> [B, d, T] around a channels-first norm
    model = nn.Sequential(nn.Linear(4, 4), *swap, norm, *swap, nn.Tanh(), nn.Linear(4, 2))
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(3, 5, 4))
        losses = torch.stack([out[..., 0].pow(2).mean(1), out[..., 1].tanh().mean(1)], dim=1)
        assert_exact_step(engine, losses, trainable(model), single_backward)
        assert engine._capture.infos[id(norm)].kind is (Kind.CHANNEL_NORM if channels_first else Kind.LAYER_NORM)


class _OffsetChannelsNorm(_ChannelsLayerNorm):
    """Normalises dimension 1 like a layer norm but adds 0.1 after the affine map: not a channel norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.1


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_channels_first_norm_look_alikes(batch_dim: int) -> None:
    """A channels-first layer norm on [N, C, H, W] takes the closed form when its samples are the examples (along
    dimension 0) and stays generic otherwise (its closed form needs the samples first), as does a module that only
    looks like one. Exact against the explicit Jacobian in each case."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(1)
    for norm_class, kind in ((_ChannelsLayerNorm, Kind.CHANNEL_NORM), (_OffsetChannelsNorm, Kind.GENERIC)):
        norm = norm_class(3, channels_first=True)
        model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), norm, nn.Tanh())
        engine = Engine(model, batch_dim=batch_dim)
        out = model(torch.randn(4, 3, 5, 5))
        # batch_dim=1: one "example" per channel of the [N, C, H, W] tensors (the norm mixes them)
        losses = out.pow(2).mean((0, 2, 3)) if batch_dim == 1 else out.pow(2).mean((1, 2, 3))
        assert_exact_step(engine, losses, trainable(model), False)
        assert engine._capture.infos[id(norm)].kind is (kind if batch_dim == 0 else Kind.GENERIC)
        engine.remove()


@pytest.mark.parametrize(("channels", "groups"), [(3, 3), (4, 2)])
def test_per_row_convolutions_run_in_full_precision(
    channels: int, groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuDNN convolutions default to TF32 on recent GPUs (about 1e-3 relative error): the convolutions that give the
    per-row kernel gradients (depthwise, or folded groups) run in full float32 precision (the flags themselves:
    ``tests/autogram/test_tf32.py``)."""
    from contextlib import contextmanager

    from hf_jd.autogram import _conv

    calls: list[bool] = []

    @contextmanager
    def spy(device: torch.device, matmul: bool = True):  # type: ignore[no-untyped-def]
        calls.append(matmul)
        yield

    monkeypatch.setattr(_conv, "full_float32_precision", spy)
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 2 * channels, 3, padding=1, groups=groups)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(2 * channels * 25, 1))
    engine = Engine(model)
    assert_exact_step(engine, model(torch.randn(4, channels, 5, 5)).squeeze(1).pow(2), trainable(model), False)
    assert calls and not any(calls)  # (convolutions only: the matrix products keep their setting)


class _SwitchingNorm(nn.Module):
    """A layer-norm look-alike whose later calls may compute something else: a flag doubles its weight, a keyword
    normalises over the channels of [N, C, T] instead of the last dimension."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, size))
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.3, size))
        self.eps = 1e-6
        self.doubled = False

    def forward(self, x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        weight = 2 * self.weight if self.doubled else self.weight
        if channels_first:
            return nn.functional.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, self.bias, self.eps).movedim(-1, 1)
        return nn.functional.layer_norm(x, (x.shape[-1],), weight, self.bias, self.eps)


@pytest.mark.parametrize("switch", ["flag", "keyword"])
def test_norm_look_alike_verified_on_every_call(switch: str) -> None:
    """A look-alike verified on its first call, then called again in the same forward pass computing something else:
    that call breaks the form, the module is captured no more in that pass (its parameters take the exact per-row pass
    of uncovered parameters) and is generic from the next pass on. Exact on every step (it was silently wrong)."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step_with_freed_graph

    torch.manual_seed(2)
    norm = _SwitchingNorm(4)
    head = nn.Linear(4, 2)
    model = nn.ModuleDict({"norm": norm, "head": head})
    engine = Engine(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        first = norm(x)
        if switch == "flag":
            norm.doubled = True
            second = norm(x.tanh())
            norm.doubled = False
        else:
            second = norm(x.tanh().transpose(1, 2), channels_first=True).transpose(1, 2)
        return head(first + second).pow(2).mean((1, 2))

    for _ in range(3):
        model.zero_grad(set_to_none=True)
        assert_exact_step_with_freed_graph(engine, model, forward(torch.randn(3, 4, 4)), False)
        assert engine._capture.infos[id(norm)].kind is Kind.GENERIC


def test_channels_first_norm_on_samples_that_are_not_the_examples() -> None:
    """A channels-first layer norm on [B * k, C, H, W] samples (frames folded into the batch) stays generic, whose
    verified grouping handles it, instead of a closed form that would need the per-row pass (convolutions on such
    samples still do)."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step_with_freed_graph

    torch.manual_seed(3)
    model = _Clips()
    engine = Engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (no per-row pass)
        for batch in (3, 3):
            model.zero_grad(set_to_none=True)
            losses = model(torch.randn(batch, 2, 2, 4, 4)).pow(2).mean((1, 2, 3, 4))
            assert_exact_step_with_freed_graph(engine, model, losses, False)
    assert engine._capture.infos[id(model.frames[1])].kind is Kind.GENERIC


class _Clips(nn.Module):
    """Clips ``[B, k, C, H, W]`` whose frames a channels-first norm processes as ``[B * k, ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = nn.Sequential(nn.Tanh(), _ChannelsLayerNorm(2, channels_first=True), nn.Tanh())

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.frames(clips.flatten(0, 1)).unflatten(0, clips.shape[:2])


@pytest.mark.parametrize("single_backward", [False, True])
def test_string_paddings_take_the_closed_forms(single_backward: bool) -> None:
    """``padding="valid"`` (SigLIP's patch embedding) and ``padding="same"`` with an even total (odd kernels) are
    zero paddings of known sizes: the closed forms apply. ``"same"`` with an odd total (an even kernel, padded one
    more on one side by torch) keeps the generic path."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 2, stride=2, padding="valid"), nn.Tanh(),  # closed form
        nn.Conv2d(4, 4, (3, 5), dilation=(2, 1), padding="same"), nn.Tanh(),  # closed form
        nn.Conv2d(4, 4, 3, groups=2, padding="same"), nn.Tanh(),  # grouped: closed form
        nn.Conv2d(4, 2, 2, padding="same"), nn.Flatten(2),  # even kernel: generic
        nn.Conv1d(2, 3, 5, padding="same"), nn.Tanh(), nn.Conv1d(3, 2, 3, padding="valid"), nn.Flatten(1),
    )
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 2):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, 3, 8, 6)).pow(2).mean(1)
        assert_exact_step(engine, losses, trainable(model), single_backward)
    kinds = [engine._capture.infos[id(module)].kind for module in model if isinstance(module, (nn.Conv1d, nn.Conv2d))]
    assert kinds == [Kind.CONV2D, Kind.CONV2D, Kind.GROUPED_CONV, Kind.GENERIC, Kind.GROUPED_CONV, Kind.GROUPED_CONV]


@pytest.mark.parametrize("single_backward", [False, True])
def test_conv3d_patch_embedding_takes_the_closed_form(single_backward: bool) -> None:
    """A ``Conv3d`` whose kernel equals its stride (video transformers' tubelet embeddings) is a Linear layer on
    separate patches, also when the sizes leave a remainder (dropped by the convolution); an overlapping one keeps
    the generic path."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv3d(3, 4, (2, 3, 2), stride=(2, 3, 2)), nn.Tanh(),  # [5, 7, 6] -> [2, 2, 3]: remainders dropped
        nn.Conv3d(4, 5, 2, stride=2, bias=False, padding="valid"), nn.Tanh(),  # closed form
        nn.Conv3d(5, 2, 1, padding=(0, 0, 0)), nn.Flatten(1),  # a 1 x 1 x 1 kernel: separate patches too
    )
    overlapping = nn.Conv3d(3, 2, 2, stride=1)
    for batch_dim in (0, None):
        engine = Engine(model, overlapping, batch_dim=batch_dim, single_backward=single_backward)
        for batch in (3, 2):
            model.zero_grad(set_to_none=True)
            overlapping.zero_grad(set_to_none=True)
            x = torch.randn(batch, 3, 5, 7, 6)
            out = torch.cat([model(x), overlapping(x).flatten(1)], dim=1)
            losses = torch.stack([out.pow(2).mean(1), out.tanh().mean(1)], dim=1)  # [B, 2]
            params = trainable(model, overlapping)
            assert_exact_step(engine, losses if batch_dim == 0 else losses.sum(0), params, single_backward)
        kinds = [engine._capture.infos[id(module)].kind for module in (*model[::2], overlapping)]
        assert kinds == [Kind.CONV2D, Kind.CONV2D, Kind.CONV2D, Kind.GENERIC]
        engine.remove()


@pytest.mark.parametrize("single_backward", [False, True])
def test_conv_transpose_patches_take_the_closed_form(single_backward: bool) -> None:
    """A ``ConvTranspose2d`` whose kernel equals its stride (a decoder's upsampling) maps each input position to its
    own output patch: a Linear layer per position. Also with an ``output_size`` beyond the patches (positions that
    get the bias alone), without bias, and for task losses; an overlapping one keeps the generic path."""
    from hf_jd.autogram._dispatch import Kind

    from ._reference import assert_exact_step

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
            self.up_no_bias = nn.ConvTranspose2d(3, 2, (1, 3), stride=(1, 3), bias=False)
            self.overlapping = nn.ConvTranspose2d(2, 2, 3, stride=2)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.conv(x))  # [B, 4, 3, 4]
            h = torch.tanh(self.up(h, output_size=[7, 9]))  # one extra row and column beyond the patches
            h = torch.tanh(self.up_no_bias(h))
            return self.overlapping(h).flatten(1)

    torch.manual_seed(2)
    model = Decoder()
    for batch_dim in (0, None):
        engine = Engine(model, batch_dim=batch_dim, single_backward=single_backward)
        for batch in (3, 2):
            model.zero_grad(set_to_none=True)
            out = model(torch.randn(batch, 3, 5, 6))
            losses = torch.stack([out.pow(2).mean(1), out.tanh().mean(1)], dim=1)  # [B, 2]
            assert_exact_step(engine, losses if batch_dim == 0 else losses.sum(0), trainable(model), single_backward)
        kinds = [engine._capture.infos[id(module)].kind for module in (model.up, model.up_no_bias, model.overlapping)]
        assert kinds == [Kind.CONV_TRANSPOSE, Kind.CONV_TRANSPOSE, Kind.GENERIC]
        engine.remove()


class _MeanSquareInFloat32Norm(nn.Module):
    """T5's and CPM-Ant's RMS norm: the mean square in float32, the product in the input's dtype."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class _AllInFloat32Norm(_MeanSquareInFloat32Norm):
    """LLaMA's RMS norm: everything in float32, cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.to(torch.float32)
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@pytest.mark.parametrize("norm_class", [_MeanSquareInFloat32Norm, _AllInFloat32Norm, _T5StyleLayerNorm, nn.RMSNorm])
def test_rms_norms_of_float64_models_are_exact_to_float64_precision(norm_class: type[nn.Module]) -> None:
    """A float64 model's Gramian is exact to float64's rounding, whichever precision its norms compute in (the
    closed form's x̂ computed in float32 for CPM-Ant's norm was off by 1e-9)."""
    torch.manual_seed(0)
    norm = norm_class(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Linear(6, 2)).double()
    engine = Engine(model)
    out = model(torch.randn(3, 5, 4, dtype=torch.float64) * 3)
    losses = out[..., 0].sum(1) + out[..., 1].pow(2).mean(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)), rtol=1e-12, atol=0)


class _Float32ChannelsLayerNorm(_ChannelsLayerNorm):
    """A layer-norm look-alike computing in float32 whatever its input's dtype (as mixed-precision code does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.float().movedim(1, -1) if self.channels_first else x.float()
        hidden = nn.functional.layer_norm(hidden, self.weight.shape, self.weight.float(), self.bias.float(), self.eps)
        return (hidden.movedim(-1, 1) if self.channels_first else hidden).to(x.dtype)


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("norm_class", [_ChannelsLayerNorm, _Float32ChannelsLayerNorm])
def test_layer_norm_look_alikes_of_float64_models_are_exact_to_float64_precision(
    norm_class: type[_ChannelsLayerNorm], channels_first: bool
) -> None:
    """In a float64 model a look-alike that computes in float64 keeps its closed form; one that computes in float32
    is not taken for it (its output differs in the last float32 bits) and stays exact through the generic path."""
    from hf_jd.autogram._dispatch import Kind

    torch.manual_seed(0)
    norm = norm_class(4, channels_first)
    swap = [_SwapLastTwo()] if channels_first else []
    model = nn.Sequential(nn.Linear(4, 4), *swap, norm, *swap, nn.Tanh(), nn.Linear(4, 2)).double()
    engine = Engine(model)
    out = model(torch.randn(3, 5, 4, dtype=torch.float64))
    losses = out[..., 0].pow(2).mean(1) + out[..., 1].tanh().mean(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)), rtol=1e-12, atol=0)
    closed_form = Kind.CHANNEL_NORM if channels_first else Kind.LAYER_NORM
    assert engine._capture.infos[id(norm)].kind is (closed_form if norm_class is _ChannelsLayerNorm else Kind.GENERIC)


@pytest.mark.parametrize("single_backward", [False, True])
def test_an_unbatched_convolution_takes_the_exact_generic_path(single_backward: bool) -> None:
    """A Conv1d called on one [C, L] sample (no sample dimension): it was rejected during the forward pass."""
    torch.manual_seed(0)
    conv, head = nn.Conv1d(3, 4, 3), nn.Linear(4 * 6, 2)
    engine = Engine(conv, head, batch_dim=None, single_backward=single_backward)
    with pytest.warns(RuntimeWarning, match=r"an unbatched input .* Pass batched inputs"):
        losses = head(torch.tanh(conv(torch.randn(3, 8))).flatten()).pow(2)
    assert_exact_step(engine, losses, trainable(conv, head), single_backward)
