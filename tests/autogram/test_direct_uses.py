"""Generic calls whose parameters are used by operations with outputs split by example (a container
module's mask embedding, class token or position table): their per-example products start at those
operations instead of running back from the call's outputs through everything after the use; exact against
the explicit Jacobian, also when examples are mixed after the use, with both backward modes."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine

from ._reference import (
    assert_exact_step_with_freed_graph,
    assert_gramian_matches,
    assert_update_matches,
    count_per_row,
    count_started_at_uses,
    grads_of,
    jacobian,
    trainable,
)


class _Container(nn.Module):
    """A module with a parameter of its own, written into masked positions of its input (as Wav2Vec2's mask
    embedding) and added to it, before a child layer; ``mix`` mixes the examples after that use."""

    def __init__(self, mix: str = "none", in_place: bool = False, chained: str = "", depth: int = 1) -> None:
        super().__init__()
        self.depth = depth  # (applications of the inner layer after the uses)
        self.chained = chained  # "other": a use of another parameter after the write; "same": of the embedding too
        self.embed = nn.Parameter(torch.randn(6))
        self.shift = nn.Parameter(torch.randn(6))
        self.inner = nn.Linear(6, 6)
        self.mix = mix
        self.in_place = in_place
        self.passes = 0  # backward passes through the activation after the parameters' uses

    def _count(self, grad: Tensor) -> None:
        self.passes += 1

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x: [B, T, 6], a view of [B * T, 6] rows
        h = x if self.in_place else x.clone()  # in place: written into a view (CopySlices on its base)
        # Before the write: independent of the embedding (on the [B * T, 6] rows too when those are written).
        shifted = None if self.chained else (x.reshape(-1, 6) if self.in_place else x) + self.shift
        h[mask] = self.embed
        if self.chained == "other":
            shifted = h + self.shift  # after the write: the addition reaches the embedding too
        elif self.chained == "same":
            shifted = h + self.shift * self.embed  # ... and uses it again
        h = self.inner(h * shifted.view_as(h))
        for _ in range(self.depth - 1):
            h = self.inner(torch.tanh(h))
        if h.requires_grad:
            h.register_hook(self._count)
        if self.mix == "center":
            h = h - h.mean(0, keepdim=True)
        elif self.mix == "softmax":
            h = h.softmax(0)
        return h


class _Net(nn.Module):
    def __init__(self, mix: str = "none", flat: bool = False, chained: str = "", depth: int = 1) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 6)
        self.body = _Container(mix, in_place=flat, chained=chained, depth=depth)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x: [B, T, 3] -> losses [B]
        # flat: the container writes into the view of the Linear's [B * T, 6] rows, as in Wav2Vec2
        return self.head(torch.tanh(self.body(self.pre(x), mask))).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("chained", ["", "other", "same"])
@pytest.mark.parametrize("flat", [False, True])
def test_products_start_at_the_parameters_uses(flat: bool, chained: str) -> None:
    """The per-example products run through the operations using the parameters only: the activations after
    them see the ordinary backward pass alone (one more pass with the products from the call's outputs). Also when
    the use of one parameter lies upstream of another's (``other``: each parameter's products then run from its own
    uses, in a call that goes on for a while after them); not when a parameter's own uses are nested (``same``): the
    products then start at the call's outputs."""
    torch.manual_seed(0)
    model = _Net(flat=flat, chained=chained, depth=4)
    engine = Engine(model)
    for step, batch in enumerate((4, 4, 3, 3)):
        x, mask = torch.randn(batch, 5, 3), torch.rand(batch, 5) > 0.5
        losses = model(x, mask)
        jac = jacobian(losses, trainable(model))
        model.body.passes = 0
        gramian = engine.compute_gramian(losses)
        assert_gramian_matches(gramian, jac)
        if step in (1, 3):  # (the first step of a batch size also checks the grouping or the mixing)
            assert model.body.passes == (2 if chained == "same" else 1)


def test_nested_uses_in_a_short_call_keep_the_products_from_its_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested uses in a call with little after them (as ViLT's embeddings): starting there would save little and its
    grouping check may cost a pass on every step, so the products start at the call's outputs (exact either way)."""
    started = count_started_at_uses(monkeypatch)
    torch.manual_seed(0)
    model = _Net(chained="other")
    engine = Engine(model)
    for batch in (4, 4):
        losses = model(torch.randn(batch, 5, 3), torch.rand(batch, 5) > 0.5)
        assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert started == [[], []]


class _MixerLike(nn.Module):
    """As a Mamba mixer: a depthwise convolution through a child's weight on ``[B, d, T]``, then a product with
    another child's weight on the ``[B * T, r]`` rows of a called projection, and elementwise parameters, all used
    by operations split by example (``k = 1`` and ``k = T`` rows per example), the convolution's upstream of the
    product's."""

    def __init__(self, width: int = 6, rank: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, groups=width, padding=2)  # never called: its weight is borrowed
        self.x_proj = nn.Linear(width, rank, bias=False)
        self.dt_proj = nn.Linear(rank, width)  # never called either
        self.A_log = nn.Parameter(torch.randn(width) * 0.3)
        self.D = nn.Parameter(torch.randn(width))
        self.passes = 0  # backward passes through the activation after the mixer

    def _count(self, grad: Tensor) -> None:
        self.passes += 1

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, T, d]
        length, width = x.shape[1], x.shape[2]
        h = nn.functional.conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, padding=2, groups=width)
        h = nn.functional.silu(h[..., :length])  # [B, d, T]
        step = self.dt_proj.weight @ self.x_proj(h.transpose(1, 2)).transpose(1, 2)  # [B, d, T]
        step = nn.functional.softplus(step + self.dt_proj.bias[:, None])
        decay = torch.exp(-torch.exp(self.A_log)[None, :, None] * step)
        out = (decay * h + h * self.D[None, :, None]).transpose(1, 2)
        if out.requires_grad:
            out.register_hook(self._count)
        return out


class _MixerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 6)
        self.mixer = _MixerLike()
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 3] -> losses [B]
        return self.head(torch.tanh(self.mixer(self.pre(x)))).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_uses_with_different_rows_per_example_and_nested(single_backward: bool) -> None:
    """A call whose parameters are used with one row per example and with ``T`` rows per example (flattened), one
    use upstream of another: its products start at the uses (the activation after the call sees the ordinary
    backward pass only), exact over steps of several batch sizes."""
    torch.manual_seed(4)
    model = _MixerNet()
    engine = Engine(model, single_backward=single_backward)
    for step, batch in enumerate((4, 4, 4, 3, 3)):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, 5, 3))
        params = trainable(model)
        jac = jacobian(losses, params)
        model.mixer.passes = 0
        assert_gramian_matches(engine.compute_gramian(losses), jac)
        if step in (2, 4):  # (after the first step: the borrowed weights; the first of a batch size: the check)
            assert model.mixer.passes == 1
        weights = torch.linspace(0.5, 1.5, batch)
        model.zero_grad(set_to_none=True)
        if single_backward:
            engine.backward(weights)
        else:
            losses.backward(weights)
        assert_update_matches(grads_of(params), weights @ jac)


class _QueryParent(nn.Module):
    """As Deformable DETR's model: a parent that owns a parameter (``level_embed``) and reads a child's table without
    calling the child (``query.weight``, expanded over the batch), both added to its ``[B, ...]`` states, the query
    table's use upstream of the level embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.randn(3, 6))
        self.query = nn.Embedding(5, 6)  # never called
        self.inp = nn.Linear(3, 6)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:  # [B, 5, 3] -> [B, 5, 6]
        h = self.inp(x) + self.query.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        h = h + self.level_embed[1].view(1, 1, -1)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return h


@pytest.mark.parametrize("single_backward", [False, True])
def test_parent_table_and_own_parameter_added_to_the_states(
    single_backward: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's generic call (its own parameter and the borrowed table, both used by additions with one row per
    example, one upstream of the other) starts its products at the additions once it borrows the table (after the
    first step), not back through its whole body; exact."""
    started = count_started_at_uses(monkeypatch)
    torch.manual_seed(5)
    model = nn.Sequential(_QueryParent(), nn.Linear(6, 1))
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the first step: the table used outside the calls)
        for batch in (4, 4, 3):
            model.zero_grad(set_to_none=True)
            losses = model(torch.randn(batch, 5, 3)).squeeze(-1).pow(2).mean(1)
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert started[-1] == ["0"]


@pytest.mark.parametrize("mix", ["none", "center", "softmax"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_examples_mixed_after_the_use_stay_exact(mix: str, single_backward: bool) -> None:
    torch.manual_seed(1)
    model = _Net(mix, flat=True)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed examples: the engine warns and takes the exact paths
        for batch in (4, 4, 3):
            losses = model(torch.randn(batch, 5, 3), torch.rand(batch, 5) > 0.5)
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_wav2vec2_with_spec_augment(single_backward: bool) -> None:
    """Wav2Vec2 in training mode masks frames with its mask embedding (SpecAugment, drawn with NumPy)."""
    torch.manual_seed(2)
    config = tf.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, num_labels=2, mask_time_prob=0.3, mask_time_length=2,
    )
    model = tf.Wav2Vec2ForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-row pass
        for batch in (3, 3, 2):
            logits = model(input_values=torch.randn(batch, 400)).logits
            losses = nn.functional.cross_entropy(logits, torch.randint(0, 2, (batch,)), reduction="none")
            assert_exact_step_with_freed_graph(engine, model, losses, single_backward)
    assert model.wav2vec2.masked_spec_embed.grad is not None


@pytest.mark.parametrize("single_backward", [False, True])
def test_vit_class_token_and_position_table(single_backward: bool) -> None:
    """ViT's embeddings: the class token is concatenated to the patches before the position table is added."""
    torch.manual_seed(3)
    config = tf.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16, num_labels=2)
    model = tf.ViTForImageClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 3, 2):
        logits = model(pixel_values=torch.randn(batch, 3, 8, 8)).logits
        losses = nn.functional.cross_entropy(logits, torch.randint(0, 2, (batch,)), reduction="none")
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)


class _ScaledScores(nn.Module):
    """Attention-like scores times a per-head scale computed from a parameter alone (Swinv2's
    ``clamp(logit_scale).exp()``), with as many heads as examples: the scale ``[H, 1, 1]`` has the batch size
    along ``batch_dim`` by coincidence and must not be taken for a tensor split by example."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.qk = nn.Linear(3, 2 * heads * 2)
        self.logit_scale = nn.Parameter(torch.randn(heads, 1, 1))
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:  # x: [B, N, 3] -> losses [B]
        batch, length, _ = x.shape
        q, k = self.qk(x).view(batch, length, 2, self.heads, 2).permute(2, 0, 3, 1, 4)  # [B, H, N, 2] each
        scale = torch.clamp(self.logit_scale, max=2.0).exp()
        scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, N, N]
        return scores.softmax(-1).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("single_backward", [False, True])
def test_parameters_only_tensor_with_the_batch_size_is_not_split(heads: int, single_backward: bool) -> None:
    torch.manual_seed(5)
    model = _ScaledScores(heads)
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (taken for one split by example, it looked like examples mixed by the losses)
        for batch in (4, 4, 3):  # heads = B on the first steps (with 4 heads)
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 5, 3)), single_backward)


class _Windows(nn.Module):
    """A module with a parameter of its own applied to windows of the examples (``[B * windows, size, d]`` rows,
    as Swin's attention): its calls are regrouped by example, and its products start at the scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6))
        self.inner = nn.Linear(6, 6)
        self.passes = 0

    def _count(self, grad: Tensor) -> None:
        self.passes += 1

    def forward(self, x: Tensor) -> Tensor:  # [B * windows, 3, 6]
        h = self.inner(x * self.scale)
        if h.requires_grad:
            h.register_hook(self._count)
        return h.softmax(1)


class _WindowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(2, 6)
        self.windows = _Windows()
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 9, 2] -> losses [B]
        batch = x.shape[0]
        h = self.windows(self.pre(x).reshape(batch * 3, 3, 6)).reshape(batch, 9, 6)
        return self.head(h).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_regrouped_calls_start_at_the_parameters_uses(single_backward: bool) -> None:
    torch.manual_seed(6)
    model = _WindowNet()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step, batch in enumerate((4, 4, 5, 5)):
            losses = model(torch.randn(batch, 9, 2))
            jac = jacobian(losses, trainable(model))
            model.windows.passes = 0
            assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
            if step in (1, 3):  # the ordinary pass only (the first step of a batch size also checks the grouping)
                assert model.windows.passes == 1
            weights = torch.linspace(0.5, 1.5, batch)
            model.zero_grad(set_to_none=True)
            engine.backward(weights) if single_backward else losses.backward(weights)
            torch.testing.assert_close(grads_of(trainable(model)), weights @ jac, rtol=1e-4, atol=1e-6)


class _TimeMajorInside(nn.Module):
    """A batch-major module that applies its own weight to its input's rows flattened time-major (as
    ``F.multi_head_attention_forward`` does with ``batch_first`` inputs): those ``[T * B, d]`` rows look like ``k``
    rows per example but are not grouped by example, which the grouping check finds."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 6] -> [B, T, 6]
        batch, length, _ = x.shape
        rows = x.transpose(0, 1).reshape(-1, 6) @ self.weight  # [T * B, 6], time-major
        return torch.tanh(rows).view(length, batch, 6).transpose(0, 1)


class _TimeMajorNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(2, 6)
        self.inside = _TimeMajorInside()
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inside(self.pre(x))).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_uses_on_rows_not_grouped_by_example_fall_back_to_the_outputs(single_backward: bool, monkeypatch) -> None:
    """The products from the uses fail the grouping check once (exact per-row pass on that step); the module then
    keeps products from its outputs, without the per-row pass."""
    per_row = count_per_row(monkeypatch)
    torch.manual_seed(7)
    model = _TimeMajorNet()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-row warning (a second per-row step), no mixed-losses warning
        for batch in (4, 4, 3, 3):
            assert_exact_step_with_freed_graph(engine, model, model(torch.randn(batch, 5, 2)), single_backward)
    assert len(per_row) <= 1


class _LeftProduct(nn.Module):
    """``(W @ rows.T).T`` on ``[B * T, d]`` rows: the product's output ``[out, B * T]`` has the examples along dim 1,
    and its dim 0 equals the batch size when ``out = B``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, 4) * 0.5)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 4] -> [B, T, features]
        return (self.weight @ x.flatten(0, 1).T).T.reshape(*x.shape[:2], -1)


@pytest.mark.parametrize("single_backward", [False, True])
@pytest.mark.parametrize("batches", [(2, 5, 5), (5, 5, 3)])
def test_batch_size_equal_to_a_product_s_features(batches: tuple[int, ...], single_backward: bool) -> None:
    """Operations split by example are verified like flattened rows, also with one row per example: here the batch
    size along dim 0 is a coincidence (it was taken for the examples, ~46% off)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), _LeftProduct(5), nn.Tanh(), nn.Linear(5, 1))
    engine = Engine(model, single_backward=single_backward)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(batch, 4, 3)).squeeze(-1).pow(2).mean(1)
        assert_exact_step_with_freed_graph(engine, model, losses, single_backward)


class _TimeMajorProduct(nn.Module):
    """``torch.matmul`` of time-major ``[T, B, 4]`` inputs with a ``[4, features]`` weight: a product on ``[T * B, 4]``
    rows whose features equal the batch size when ``features = B``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, features) * 0.5)

    def forward(self, x: Tensor) -> Tensor:  # [T, B, 4] -> [T, B, features]
        return torch.matmul(x, self.weight)


def test_time_major_product_with_as_many_features_as_examples_after_other_batch_sizes() -> None:
    """Steps with B = 2, 3 verify the grouping at the reshaped output; with B = 5 the products start at the product
    itself, whose features were taken for the examples (30% off): a pass verified earlier is trusted only if its
    products start at the same operations."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), _TimeMajorProduct(5), nn.Tanh(), nn.Linear(5, 1))
    engine = Engine(model, batch_dim=1)
    for batch in (2, 3, 5):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(4, batch, 3)).squeeze(-1).pow(2).mean(0)
        assert_exact_step_with_freed_graph(engine, model, losses, False)


class _Scan(nn.Module):
    """A selective-scan mixer as Mamba's reference kernel computes it: ``A`` scales the time steps of each example
    (``[B, d, T, N]``), then a Python loop over the positions reads it one slice at a time."""

    def __init__(self, state: int) -> None:
        super().__init__()
        self.a_log = nn.Parameter(torch.randn(6, state) * 0.3)
        self.passes = 0  # backward passes through the scaled time steps

    def _count(self, grad: Tensor) -> None:
        self.passes += 1

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 6] -> [B, T, 6]
        x = x.transpose(1, 2)  # [B, d, T]
        steps = nn.functional.softplus(x)
        discrete = torch.exp(-torch.exp(self.a_log)[None, :, None, :] * steps[..., None])  # [B, d, T, N]
        discrete.register_hook(self._count)
        state = x.new_zeros(x.shape[0], x.shape[1], self.a_log.shape[1])
        outputs = []
        for position in range(x.shape[2]):
            state = discrete[:, :, position] * state + x[:, :, position, None]
            outputs.append(state.sum(-1))
        return torch.stack(outputs, -1).transpose(1, 2)


@pytest.mark.parametrize("single_backward", [False, True])
def test_a_use_with_another_dimension_of_the_batch_size_is_taken(single_backward: bool) -> None:
    """B = T = N: the use of ``A`` (``[B, d, T, N]``) has the batch size along other dimensions too. It was passed over
    for the slices the scan reads (``[B, d, N]``), whose products ran through the loop once per example and position
    (Mamba and Falcon-Mamba at B = 16 with 16 positions or a state of 16: 11-17x a plain step against 3.5x); it is
    taken now, its grouping by example verified like any use's."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 6), _Scan(state=4), nn.Tanh(), nn.Linear(6, 1))
    scan = model[1]
    engine = Engine(model, single_backward=single_backward)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(4, 4, 3)).squeeze(-1).pow(2).mean(1)
        jac = jacobian(losses, trainable(model))
        scan.passes = 0
        assert_gramian_matches(engine.compute_gramian(losses), jac)
        if step == 2:  # (a structure verified earlier: the ordinary pass alone goes through the loop)
            assert scan.passes == 1
        weights = torch.linspace(0.5, 1.5, 4)
        model.zero_grad(set_to_none=True)
        engine.backward(weights) if single_backward else losses.backward(weights)
        assert_update_matches(grads_of(trainable(model)), weights @ jac)
