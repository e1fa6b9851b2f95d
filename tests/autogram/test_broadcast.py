"""Calls whose output all examples share and that is only broadcast over the batch afterwards
(T5's and MPNet's relative-position bias): per-example gradients from the ordinary backward pass
instead of one backward pass per example, exact against the explicit Jacobian."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

from hf_jd.autogram import Engine
from hf_jd.autogram import _accumulate, engine as engine_module

from ._reference import assert_exact_step, assert_gramian_matches, grads_of, jacobian, trainable
from .test_zoo import ZOO

B, T, HEADS = 4, 5, 2


class SharedBias(nn.Module):
    """Scores ``x Wᵀ`` per example plus a bias looked up once for all examples, then reshaped and
    combined with the batch in the way given by ``mode``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.table = nn.Embedding(7, HEADS)
        self.proj = nn.Linear(3, HEADS * T)
        self.buckets = torch.randint(0, 7, (T, T))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        scores = self.proj(x).view(-1, HEADS, 1, T).expand(-1, HEADS, T, T)  # [B, H, T, T]
        bias = self.table(self.buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T], shared
        if self.mode == "add":
            combined = scores + bias
        elif self.mode == "mask_then_add":  # T5 with padding: where(mask, bias, min) over the batch
            combined = scores + torch.where(mask, bias, torch.finfo(bias.dtype).min / 2).clamp_min(-1e4)
        elif self.mode == "expand":  # MPNet: bias.expand(B, ...) then added in each layer
            expanded = bias.expand(x.shape[0], -1, -1, -1).contiguous()
            combined = scores + expanded + expanded * 0.5
        elif self.mode == "padded_expand":  # CUDA's memory-efficient SDPA: unaligned mask padded, sliced, expanded
            padded = nn.functional.pad(bias, (0, 8 - T % 8))[..., :T]
            combined = scores + padded.expand(x.shape[0], -1, -1, -1)
        elif self.mode == "reused":  # the same bias added twice (two layers)
            combined = (scores + bias).tanh() + bias
        elif self.mode == "matmul":  # batched product: matmul expands the shared operand over the batch
            combined = scores @ bias.squeeze(0)
        elif self.mode == "nonlinear":  # an operation the planner does not follow: exact per-row path
            combined = scores + bias.cumsum(-1)
        else:
            raise AssertionError(self.mode)
        return combined.tanh().flatten(1)


def _losses(model: nn.Module) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, generator=generator)
    mask = torch.rand(B, 1, T, T, generator=generator) > 0.3
    out = model(x, mask)
    return out.pow(2).mean(1) + out[:, :3].sum(1)


def _assert_weighted_update(
    engine: Engine, losses: Tensor, params: list[nn.Parameter], jac: Tensor, single_backward: bool
) -> None:
    """The weighted backward after the Gramian writes ``wᵀ J`` into ``.grad``."""
    weights = torch.linspace(0.5, 1.5, losses.shape[0])
    if single_backward:
        engine.backward(weights)
    else:
        losses.backward(weights)
    torch.testing.assert_close(grads_of(params), weights @ jac, rtol=1e-4, atol=1e-6)


def _count_per_row(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = _accumulate.grads_per_row
    monkeypatch.setattr(engine_module, "grads_per_row", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("mode", ["add", "mask_then_add", "expand", "padded_expand", "reused", "matmul"])
@pytest.mark.parametrize("single_backward", [False, True])
def test_broadcast_bias_exact_without_per_row_pass(mode: str, single_backward: bool, monkeypatch) -> None:
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = SharedBias(mode)
    engine = Engine(model, single_backward=single_backward)
    losses = _losses(model)
    params = trainable(model)
    jac = jacobian(losses, params)
    gramian = engine.compute_gramian(losses, retain_graph=True)
    assert_gramian_matches(gramian, jac)
    assert per_row == []  # the shared bias got its per-example gradients from the ordinary pass
    _assert_weighted_update(engine, losses, params, jac, single_backward)


def test_other_uses_of_a_shared_output_keep_the_exact_per_row_path(monkeypatch) -> None:
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = SharedBias("nonlinear")
    engine = Engine(model)
    losses = _losses(model)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert per_row == [1]


@pytest.mark.parametrize("name", ["t5", "mpnet"])
def test_relative_position_tables_use_the_ordinary_pass(name: str, monkeypatch) -> None:
    per_row = _count_per_row(monkeypatch)
    build, make_inputs = ZOO[name]
    torch.manual_seed(0)
    model = build().train()
    engine = Engine(model)
    inputs = make_inputs(4, 6, True)  # padding: T5 masks the bias with where(...) over the batch
    out = model(**inputs)
    scores = (out.logits if hasattr(out, "logits") else out[0]).float()
    losses = scores.logsumexp(-1).reshape(4, -1).mean(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert per_row == []


def test_t5_single_example_and_seq2seq_labels() -> None:
    config = tf.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                         relative_attention_num_buckets=8, decoder_start_token_id=0)
    for batch in (1, 3):
        torch.manual_seed(batch)
        model = tf.T5ForConditionalGeneration(config).train()
        engine = Engine(model)
        ids, labels = torch.randint(1, 40, (batch, 6)), torch.randint(1, 40, (batch, 4))
        logits = model(input_ids=ids, labels=labels).logits
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
        assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


@pytest.mark.parametrize("single_backward", [False, True])
def test_deberta_v3_relative_embeddings_use_the_ordinary_pass(single_backward: bool, monkeypatch) -> None:
    """DeBERTa-v3's configuration: the relative embeddings are layer-normalised, projected by the
    attention's own query and key layers (shared keys), then repeated over ``[B * heads, …]``."""
    per_row = _count_per_row(monkeypatch)
    config = tf.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, relative_attention=True, position_buckets=4, max_relative_positions=8,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = tf.DebertaV2ForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    ids = torch.randint(3, 40, (B, 7))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    logits = model(input_ids=ids, attention_mask=mask).logits
    losses = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 1]), reduction="none")
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
    assert per_row == []
    _assert_weighted_update(engine, losses, params, jac, single_backward)


def _deberta_v3_large_init() -> nn.Module:
    """DeBERTa-v3's configuration with large initial weights (strict checks of small terms), in eval mode."""
    config = tf.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, relative_attention=True, position_buckets=4, max_relative_positions=8,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        num_labels=3, initializer_range=0.5,
    )
    torch.manual_seed(0)
    return tf.DebertaV2ForSequenceClassification(config).eval()


def test_deberta_v3_shared_relative_layer_norm_alone(monkeypatch) -> None:
    """Only the relative embeddings' LayerNorm trainable: its per-example gradients come only
    through the repeated ``[B * heads, …]`` position keys and queries (a strict check of the
    batch-major slicing, which the whole model's Gramian would hide under larger terms)."""
    per_row = _count_per_row(monkeypatch)
    model = _deberta_v3_large_init()
    norm = model.deberta.encoder.LayerNorm
    model.requires_grad_(False)
    norm.requires_grad_(True)
    engine = Engine(model)
    logits = model(input_ids=torch.randint(3, 40, (B, 7))).logits
    losses = logits.pow(2).sum(1)
    jac = jacobian(losses, trainable(norm))
    gramian = engine.compute_gramian(losses)
    assert per_row == []
    assert float(jac.norm()) > 1e-2
    assert_gramian_matches(gramian, jac)


@pytest.mark.parametrize("single_backward", [False, True])
def test_deberta_v3_relative_embedding_table_alone(single_backward: bool, monkeypatch) -> None:
    """Only ``rel_embeddings.weight`` trainable: DeBERTa-v3 layer-normalises that parameter without
    calling its Embedding module, so no record owned it and its contribution was silently missing
    (small at initialisation, hidden in the whole model's Gramian); the LayerNorm record now gives
    its per-example input gradients, from the ordinary pass."""
    per_row = _count_per_row(monkeypatch)
    model = _deberta_v3_large_init()
    table = model.deberta.encoder.rel_embeddings
    model.requires_grad_(False)
    table.requires_grad_(True)
    engine = Engine(model, single_backward=single_backward)
    losses = model(input_ids=torch.randint(3, 40, (B, 7))).logits.pow(2).sum(1)
    params = trainable(table)
    jac = jacobian(losses, params)
    assert float(jac.norm()) > 1e-3
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
    assert per_row == []
    _assert_weighted_update(engine, losses, params, jac, single_backward)


@pytest.mark.parametrize("name", ["t5", "mpnet"])
def test_relative_position_tables_alone(name: str, monkeypatch) -> None:
    """Only the relative-position tables trainable: the Gramian is theirs alone, a strict check."""
    per_row = _count_per_row(monkeypatch)
    build, make_inputs = ZOO[name]
    torch.manual_seed(0)
    model = build().train()
    model.requires_grad_(False)
    tables = [m for n, m in model.named_modules() if n.endswith("relative_attention_bias")]
    assert tables
    for table in tables:
        nn.init.normal_(table.weight, std=1.0)
        table.requires_grad_(True)
    engine = Engine(model)
    out = model(**make_inputs(4, 6, True))
    scores = (out.logits if hasattr(out, "logits") else out[0]).float()
    losses = scores.logsumexp(-1).reshape(4, -1).mean(1)
    jac = jacobian(losses, trainable(model))
    assert float(jac.norm()) > 1e-3
    assert_gramian_matches(engine.compute_gramian(losses), jac)
    assert per_row == []


def test_tables_and_layers_with_the_batch_size_elsewhere_are_exact(monkeypatch) -> None:
    """T5 with as many tokens as examples: its layers' [B, T, d] tensors and its [T, T] buckets have
    the batch size along two dimensions; the grouping by example is then verified, exactly."""
    build, make_inputs = ZOO["t5"]
    torch.manual_seed(0)
    model = build().train()
    engine = Engine(model)
    out = model(**make_inputs(5, 5, False))  # encoder bias [5, 5, heads] with 5 examples
    losses = out.logits.float().logsumexp(-1).mean(1)
    assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))


class _BiasThenFlatten(nn.Module):
    """A table shared by the examples (a [T, d] lookup added to every example, as T5's relative bias) beside
    a Linear layer on the flattened [B * T, d] rows (as OPT's): the table gets its per-example gradients from
    the ordinary pass, while the flattened call's grouping is verified."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(8, 4)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        hidden = torch.tanh(x + self.table(torch.arange(length)))
        return self.linear(hidden.reshape(batch * length, dim)).reshape(batch, length, -1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_shared_table_beside_a_regrouped_call(monkeypatch: pytest.MonkeyPatch, single_backward: bool) -> None:
    from hf_jd.autogram import engine as engine_module

    from ._reference import assert_exact_step

    per_row: list[int] = []
    original = engine_module.grads_per_row
    monkeypatch.setattr(
        engine_module, "grads_per_row", lambda *args: (per_row.append(len(args[2])), original(*args))[1]
    )
    torch.manual_seed(0)
    model = _BiasThenFlatten()
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(3, 5, 4)).pow(2).sum((1, 2))
        assert_exact_step(engine, losses, trainable(model), single_backward)
    assert per_row == []  # neither call needed the per-row pass


@pytest.mark.parametrize("single_backward", [False, True])
def test_clip_contrastive_losses_mix_the_examples(single_backward: bool) -> None:
    """CLIP's per-example contrastive losses mix the examples: the calls fail the grouping check, and the
    position table, which would get a broadcast plan, must take the exact path with them."""
    from ._reference import assert_exact_step

    torch.manual_seed(0)
    config = tf.CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=50,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = tf.CLIPModel(config).train()
    engine = Engine(model, single_backward=single_backward)
    out = model(input_ids=torch.randint(0, 50, (3, 6)), pixel_values=torch.randn(3, 3, 16, 16))
    targets = torch.arange(3)
    losses = 0.5 * (nn.functional.cross_entropy(out.logits_per_image, targets, reduction="none")
                    + nn.functional.cross_entropy(out.logits_per_text, targets, reduction="none"))
    assert_exact_step(engine, losses, trainable(model), single_backward)


def _per_row_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(record.message) for record in records if "per-row gradients come from a batched" in str(record.message)]


def test_a_module_on_the_per_row_path_every_step_is_named_in_one_warning_from_the_second_step() -> None:
    torch.manual_seed(0)
    model = SharedBias("nonlinear")  # the shared table's output is used otherwise than broadcast: per-row path
    engine = Engine(model)
    seen = []
    for _ in range(3):
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            losses = _losses(model)
            gramian = engine.compute_gramian(losses)
        assert_gramian_matches(gramian, jacobian(losses, trainable(model)))
        seen.append(_per_row_warnings(records))
    assert seen[0] == [] and seen[2] == []  # not on a first step (which may be a one-time check), then once
    (message,) = seen[1]
    assert "table (Embedding)" in message and "batch_dim=0" in message and "4 loss rows" in message
    assert "jd_modules" in message


def test_a_first_step_check_of_a_position_table_with_as_many_positions_as_examples_does_not_warn() -> None:
    # BERT's [1, T, d] position embeddings with T = B: per-row on the first step only, until the layout is verified.
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=8, num_labels=2)
    model = tf.BertForSequenceClassification(config)
    engine = Engine(model)
    ids, labels = torch.randint(0, 30, (4, 4)), torch.tensor([0, 1, 1, 0])
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for _ in range(3):
            logits = model(input_ids=ids).logits
            losses = nn.functional.cross_entropy(logits, labels, reduction="none")
            assert_gramian_matches(engine.compute_gramian(losses), jacobian(losses, trainable(model)))
    assert _per_row_warnings(records) == []


class FlatBias(nn.Module):
    """Scores ``x Wᵀ`` flattened to ``[B * T, H]`` rows (batch- or time-major) plus a table shared by all rows
    (added by broadcasting over the ``B * T`` rows, as Swin adds its relative-position bias to the attention
    scores of its ``[B * windows, ...]`` windows)."""

    def __init__(self, time_major: bool) -> None:
        super().__init__()
        self.time_major = time_major
        self.table = nn.Embedding(7, HEADS)
        self.proj = nn.Linear(3, HEADS)
        self.ids = torch.tensor(4)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, 3]
        batch, length, _ = x.shape
        scores = self.proj(x)
        bias = self.table(self.ids)  # [H], shared
        if self.time_major:
            rows = scores.transpose(0, 1).reshape(length * batch, HEADS) + bias
            scores = rows.reshape(length, batch, HEADS).transpose(0, 1)
        else:
            scores = (scores.reshape(batch * length, HEADS) + bias).reshape(batch, length, HEADS)
        return scores.tanh().pow(2).sum((1, 2))


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("single_backward", [False, True])
def test_table_broadcast_over_flattened_rows(time_major: bool, single_backward: bool, monkeypatch) -> None:
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = FlatBias(time_major)
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        losses = model(torch.randn(B, T, 3))
        params = trainable(model)
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
        _assert_weighted_update(engine, losses, params, jac, single_backward)
    # Batch-major rows: the grouping check confirms the plan (per-example gradients from the ordinary pass);
    # time-major rows fail it (slicing them by example would be wrong) and take the exact per-row path.
    assert per_row == ([1, 1] if time_major else [])


def _exact_image_step(model: nn.Module, engine: Engine, batch: int, single_backward: bool) -> None:
    """One step of a 16-pixel, 3-label image classifier: Gramian and weighted update against the explicit Jacobian."""
    model.zero_grad(set_to_none=True)
    images, labels = torch.randn(batch, 3, 16, 16), torch.randint(0, 3, (batch,))
    losses = nn.functional.cross_entropy(model(pixel_values=images).logits, labels, reduction="none")
    params = trainable(model)
    jac = jacobian(losses, params)
    assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
    _assert_weighted_update(engine, losses, params, jac, single_backward)


@pytest.mark.parametrize("single_backward", [False, True])
def test_swin_relative_position_tables_use_the_ordinary_pass(single_backward: bool, monkeypatch) -> None:
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    config = tf.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
                           num_labels=3)
    model = tf.SwinForImageClassification(config)  # shifted windows in the second block: masked scores too
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 2):
        _exact_image_step(model, engine, batch, single_backward)
    assert per_row == []  # the tables (generic calls broadcast over [B * windows] scores) were per-row before


@pytest.mark.parametrize("single_backward", [False, True])
def test_swin_windows_verified_once_per_structure(single_backward: bool, monkeypatch) -> None:
    """The grouping of Swin's [B * windows] rows and of the tables broadcast over them is verified on the first step
    of a forward pass's structure (the index into the relative-position table moves no example's rows), then
    trusted: the later steps take one plain backward pass for the check."""
    from hf_jd.autogram import engine as engine_module

    trusted: list[bool] = []
    original = engine_module.grads_verified

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("add", True):
            trusted.append(kwargs.get("trusted") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "grads_verified", recorded)
    torch.manual_seed(1)
    config = tf.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
                           num_labels=3)
    model = tf.SwinForImageClassification(config)
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 3, 3):
        _exact_image_step(model, engine, batch, single_backward)
    assert trusted == [False, True, True]


@pytest.mark.parametrize("single_backward", [False, True])
def test_trusted_grouping_and_planned_tables_share_one_pass(single_backward: bool, monkeypatch) -> None:
    """Once the windows' grouping is trusted, its one plain backward pass also gives the planned tables their
    per-example gradients: no second pass from the losses for them."""
    from hf_jd.autogram import engine as engine_module

    passes: list[str] = []
    for name in ("grads_verified", "grads_streamed", "grads_at_once"):
        original = getattr(engine_module, name)

        def recorded(*args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            passes.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(engine_module, name, recorded)
    torch.manual_seed(2)
    config = tf.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
                           num_labels=3)
    model = tf.SwinForImageClassification(config)
    engine = Engine(model, single_backward=single_backward)
    _exact_image_step(model, engine, 3, single_backward)  # (checks the grouping, then takes the ordinary pass)
    passes.clear()
    _exact_image_step(model, engine, 3, single_backward)
    assert passes == ["grads_verified"]


class ContinuousBias(nn.Module):
    """Swinv2-style continuous position bias: a two-layer MLP (ReLU in place on the first Linear's output, a view of
    its product) on a table of relative coordinates, picked by a relative-position index, ``16 * sigmoid``, added to
    the per-example scores: a shared table reached through a Linear, unary functions, an in-place operation and an
    index selection."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(inplace=True), nn.Linear(8, HEADS, bias=False))
        self.proj = nn.Linear(3, HEADS * T)
        positions = torch.arange(T)
        self.index = (positions[:, None] - positions[None, :] + T - 1).reshape(-1)  # [T * T] into 2T - 1 rows
        self.coords = torch.linspace(-1, 1, 2 * T - 1).view(1, 2 * T - 1, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        scores = self.proj(x).view(-1, HEADS, 1, T).expand(-1, HEADS, T, T)  # [B, H, T, T]
        table = self.mlp(self.coords).view(-1, HEADS)  # [2T - 1, H]
        bias = table[self.index].view(T, T, HEADS).permute(2, 0, 1).contiguous()
        return (scores + 16 * torch.sigmoid(bias).unsqueeze(0)).tanh().flatten(1)


@pytest.mark.parametrize("single_backward", [False, True])
def test_table_through_unary_functions_in_place_ops_and_an_index(single_backward: bool, monkeypatch) -> None:
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    model = ContinuousBias()
    engine = Engine(model, single_backward=single_backward)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        losses = _losses(model)
        params = trainable(model)
        jac = jacobian(losses, params)
        assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
        _assert_weighted_update(engine, losses, params, jac, single_backward)
    assert per_row == []  # (on the last step)


@pytest.mark.parametrize("single_backward", [False, True])
def test_swinv2_continuous_position_bias_uses_the_ordinary_pass(single_backward: bool, monkeypatch) -> None:
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    config = tf.Swinv2Config(image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
                             num_labels=3)
    model = tf.Swinv2ForImageClassification(config)
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 3, 2):
        _exact_image_step(model, engine, batch, single_backward)
    assert per_row == []  # its MLP's tables took the per-row pass on every step before


class WrittenTable(nn.Module):
    """A shared table with a batch statistic written into a copy of it in place (``z[0] = x.mean(0)``, which makes the
    table depend on the examples) before it is broadcast over the scores; a second table added to the examples."""

    def __init__(self) -> None:
        super().__init__()
        self.tab = nn.Embedding(2 * T - 1, HEADS)
        self.pos = nn.Embedding(T, 6)
        self.qk = nn.Linear(6, 12)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 6] -> [B]
        batch = x.shape[0]
        x = x + self.pos(torch.arange(T))[None]
        q, k = (z.reshape(batch, T, HEADS, -1).transpose(1, 2) for z in self.qk(x).chunk(2, -1))
        positions = torch.arange(T)
        table = self.tab(positions[:, None] - positions[None, :] + T - 1).clone()  # [T, T, H]
        table[0] = 3 * x.mean(0)[:, :HEADS]
        scores = q @ k.transpose(-1, -2) + table.permute(2, 0, 1).unsqueeze(0)
        return self.out((scores.softmax(-1) @ x.unsqueeze(1)).mean(1)).pow(2).mean((1, 2))


@pytest.mark.parametrize("single_backward", [False, True])
def test_table_with_example_data_written_in_stays_exact(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = WrittenTable()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the per-row path, warned)
        for batch in (4, 4, 3):
            model.zero_grad(set_to_none=True)
            losses = model(torch.randn(batch, T, 6))
            params = trainable(model)
            jac = jacobian(losses, params)
            assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
            _assert_weighted_update(engine, losses, params, jac, single_backward)


class TableThenMixed(nn.Module):
    """A position table added to the inputs (no call before it to show anything), then the examples mixed by a batch
    statistic: the table's per-example gradients read at the addition would carry the other examples' losses."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(T, 6)
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, 6] -> [B]
        h = x + self.pos(torch.arange(T))[None]
        h = h + 0.5 * h.mean(0, keepdim=True)
        return self.out(torch.tanh(self.lin(h))).pow(2).mean((1, 2))


@pytest.mark.parametrize("single_backward", [False, True])
def test_examples_mixed_after_a_planned_table_are_seen(single_backward: bool) -> None:
    torch.manual_seed(0)
    model = TableThenMixed()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for batch in (4, 4, 3):
            model.zero_grad(set_to_none=True)
            losses = model(torch.randn(batch, T, 6))
            params = trainable(model)
            jac = jacobian(losses, params)
            assert_gramian_matches(engine.compute_gramian(losses, retain_graph=True), jac)
            _assert_weighted_update(engine, losses, params, jac, single_backward)
    assert any("mix the examples" in str(record.message) for record in records)


def _led_steps(single_backward: bool, monkeypatch, seed: int, batch: int, length: int) -> list:
    """Three exact steps of a tiny LED (attention window 4) on ``[batch, length]`` ids; the calls that took the
    per-row pass on the last one."""
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(seed)
    config = tf.LEDConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_window=4,
                          max_encoder_position_embeddings=32, max_decoder_position_embeddings=16)  # fmt: skip
    model = tf.LEDForConditionalGeneration(config).train()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers says when it pads)
        for _ in range(3):
            per_row.clear()
            model.zero_grad(set_to_none=True)
            ids, decoder = torch.randint(3, 40, (batch, length)), torch.randint(3, 40, (batch, 5))
            logits = model(input_ids=ids, decoder_input_ids=decoder[:, :-1]).logits
            losses = nn.functional.cross_entropy(logits.transpose(1, 2), decoder[:, 1:], reduction="none").mean(1)
            assert_exact_step(engine, losses, trainable(model), single_backward)
    return per_row


@pytest.mark.parametrize("single_backward", [False, True])
def test_led_position_tables_are_planned_beside_time_major_calls(single_backward: bool, monkeypatch) -> None:
    """LED's [T, d] position tables (T a multiple of the batch size) sit beside its time-major Longformer attention:
    planning was all or nothing, so the tables took the per-row pass on every step (8x a plain step against BART's
    2.5x); now each table that can be planned is, and the plans' broadcasting nodes are checked."""
    assert _led_steps(single_backward, monkeypatch, seed=0, batch=4, length=16) == []  # (on the last step)


@pytest.mark.parametrize("single_backward", [False, True])
def test_led_position_tables_are_planned_when_led_pads_the_ids(single_backward: bool, monkeypatch) -> None:
    """With ids not a multiple of its attention window, LED pads them inside the model and embeds the padding ids in
    a call of their own, whose gradients are zero (masked): its layout check never tells, and the position tables
    (no size equal to the batch size) took the per-row pass on every step. They are planned now."""
    assert _led_steps(single_backward, monkeypatch, seed=1, batch=6, length=10) == []  # (on the last step)


@pytest.mark.parametrize("single_backward", [False, True])
def test_ids_padded_inside_the_model_keep_the_closed_forms(single_backward: bool, monkeypatch) -> None:
    """Longformer pads its [B, T] ids to a multiple of its attention window inside the model: the embeddings' [B, T']
    ids share no length with the model's inputs, so they were taken for tables shared by the examples and took the
    per-row pass on every step (12x a plain step); now their split by example is verified on the first step."""
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    config = tf.LongformerConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, attention_window=4, max_position_embeddings=40, pad_token_id=1,
                                 num_labels=2)  # fmt: skip
    model = tf.LongformerForSequenceClassification(config).train()
    engine = Engine(model, single_backward=single_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers says it pads)
        for length in (10, 10, 7):
            per_row.clear()
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=torch.randint(3, 40, (3, length))).logits
            losses = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1]), reduction="none")
            assert_exact_step(engine, losses, trainable(model), single_backward)
    assert per_row == []  # (on the last step)


def _sdpa_padding_the_mask_as_cuda_does(original):
    """``scaled_dot_product_attention`` preceded by what CUDA's memory-efficient kernel does to an unaligned float
    ``attn_mask`` (pad the last dimension to a multiple of 8, slice it back, expand it over the batch)."""

    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, **kwargs):
        if attn_mask is not None and attn_mask.is_floating_point():
            length = attn_mask.shape[-1]
            padded = nn.functional.pad(attn_mask, (0, 8 - length % 8))[..., :length]
            attn_mask = padded.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    return sdpa


@pytest.mark.parametrize("cuda_mask", [False, True])
@pytest.mark.parametrize("single_backward", [False, True])
def test_beit_relative_position_bias_uses_the_ordinary_pass(cuda_mask: bool, single_backward: bool,
                                                            monkeypatch) -> None:
    if cuda_mask:
        monkeypatch.setattr(nn.functional, "scaled_dot_product_attention",
                            _sdpa_padding_the_mask_as_cuda_does(nn.functional.scaled_dot_product_attention))
    per_row = _count_per_row(monkeypatch)
    torch.manual_seed(0)
    config = tf.BeitConfig(image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=16, layer_scale_init_value=0.5, use_relative_position_bias=True,
                           num_labels=3, attn_implementation="sdpa")
    model = tf.BeitForImageClassification(config)
    engine = Engine(model, single_backward=single_backward)
    for batch in (3, 2):
        _exact_image_step(model, engine, batch, single_backward)
    assert per_row == []  # the [1, H, T, T] bias of each layer is broadcast over the scores


class _TableTwice(nn.Module):
    """A projected table of positions broadcast over the batch along two paths (as DeBERTa's projected relative
    embeddings serve two attention terms)."""

    def __init__(self, positions: int) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.projection = nn.Linear(8, 8)
        self.positions = nn.Embedding(positions, 8)
        self.positions.requires_grad_(False)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.embed(inputs)
        keys = self.projection(self.positions.weight)
        first = torch.bmm(hidden, keys.unsqueeze(0).expand(inputs.shape[0], -1, -1).transpose(1, 2))
        second = torch.bmm(torch.tanh(hidden), keys.unsqueeze(0).expand(inputs.shape[0], -1, -1).transpose(1, 2))
        return (first.tanh() * second).mean(dim=(1, 2))


def test_per_example_table_gradients_of_several_paths_in_one_buffer() -> None:
    """A plan's per-example gradients are written into one stack as they come, each later path's added to it in
    place: the list of an example's gradients, their stack and the sum of the paths' stacks held three or four
    buffers of the stack's size at once."""
    from ._memory import peak_held_bytes

    torch.manual_seed(0)
    examples, positions = 4, 512
    model = _TableTwice(positions)
    engine = Engine(model, batch_dim=0)
    for _ in range(2):
        losses = model(torch.randn(examples, 5, 3)).pow(2)
        gramian, peak = peak_held_bytes(lambda losses=losses: engine.compute_gramian(losses), 16 * 1024)
        assert_gramian_matches(gramian, jacobian(losses, trainable(model)))
    stack = examples * positions * 8 * 4  # bytes of the per-example gradients of the projected table
    assert peak <= 3.5 * stack  # (4.25 before)


class _NormalisedTableUnderAutocast(nn.Module):
    """A layer-normalised table of positions (float32 under autocast) broadcast over the batch, also through a Linear
    layer (a bf16 product under autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(8, 8)
        self.norm = nn.LayerNorm(8)
        self.linear = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        table = self.norm(self.positions.weight[: inputs.shape[1]]).unsqueeze(0)
        hidden = self.linear(inputs + table) + inputs * self.linear(table)
        return self.head(torch.tanh(hidden)).pow(2).mean(dim=1).sum(dim=1)


def test_broadcast_path_through_a_bf16_product_under_autocast() -> None:
    """The plan called the Linear layer's backward node on a float32 gradient while its saved inputs were bf16 (a
    RuntimeError from the engine); the gradient is now cast to the node's output dtype first, as autograd does."""
    torch.manual_seed(0)
    model = _NormalisedTableUnderAutocast()
    engine = Engine(model, batch_dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the table read outside its module's call: from the losses directly)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(torch.randn(4, 5, 8))
        jac = jacobian(losses, trainable(model)).float()
        gramian = engine.compute_gramian(losses)
    expected = jac @ jac.T
    assert float((gramian - expected).abs().max() / expected.abs().max()) < 2e-2  # (bf16 products)
