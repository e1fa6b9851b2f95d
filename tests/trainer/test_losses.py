"""Tests of hf_jd.trainer.losses.per_example_losses against the models' own losses."""

import pytest
import torch
from transformers import (
    BertConfig,
    CpmAntConfig,
    CpmAntForCausalLM,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
    XLMConfig,
    XLMWithLMHeadModel,
    XLNetConfig,
    XLNetLMHeadModel,
)

from hf_jd.trainer.losses import detect_model_kind, per_example_losses, unwrap_model


def bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        **kwargs,
    )


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=1, eos_token_id=1)


def check_against_model(model, inputs: dict, labels: torch.Tensor, *, equal_counts: bool, **forward_kwargs):
    """Rows equal the model's loss on each example alone; the mean equals the batch loss (equal counts)."""
    model.eval()
    outputs = model(**inputs, **forward_kwargs)
    losses = per_example_losses(model, outputs, labels)
    assert losses.shape == (labels.shape[0],)
    assert losses.dtype == torch.float32
    for i in range(labels.shape[0]):
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        extra = {k: v[i : i + 1] for k, v in forward_kwargs.items()}
        alone = model(**single, **extra, labels=labels[i : i + 1]).loss
        torch.testing.assert_close(losses[i], alone.float(), rtol=1e-5, atol=1e-6)
    if equal_counts:
        batch_loss = model(**inputs, **forward_kwargs, labels=labels).loss
        torch.testing.assert_close(losses.mean(), batch_loss.float(), rtol=1e-5, atol=1e-6)
    return losses


def test_sequence_classification_single_label():
    model = BertForSequenceClassification(bert_config(num_labels=3))
    inputs = {"input_ids": torch.randint(1, 100, (4, 6))}
    labels = torch.tensor([0, 2, 1, 2])
    assert detect_model_kind(model) == "sequence_classification"
    check_against_model(model, inputs, labels, equal_counts=True)
    assert model.config.problem_type is None or model.config.problem_type == "single_label_classification"


def test_multiple_choice():
    """Cross-entropy over the [B, C] choice scores, as BertForMultipleChoice's own loss."""
    model = BertForMultipleChoice(bert_config())
    inputs = {"input_ids": torch.randint(1, 100, (4, 3, 6))}
    labels = torch.tensor([0, 2, 1, 2])
    assert detect_model_kind(model) == "multiple_choice"
    check_against_model(model, inputs, labels, equal_counts=True)
    model.eval()
    losses = per_example_losses(model, model(**inputs), torch.tensor([0, -100, 1, 2]))
    assert losses[1] == 0 and bool((losses[[0, 2, 3]] > 0).all())
    with pytest.raises(ValueError, match="one label .*per example"):
        per_example_losses(model, model(**inputs), torch.tensor([[0, 1], [1, 2], [0, 0], [2, 2]]))


def test_sequence_classification_multi_label():
    model = BertForSequenceClassification(bert_config(num_labels=3))
    inputs = {"input_ids": torch.randint(1, 100, (4, 6))}
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    check_against_model(model, inputs, labels, equal_counts=True)


@pytest.mark.parametrize("num_labels", [1, 2])
def test_sequence_classification_regression(num_labels):
    kwargs = {"num_labels": num_labels}
    if num_labels > 1:
        kwargs["problem_type"] = "regression"
    model = BertForSequenceClassification(bert_config(**kwargs))
    inputs = {"input_ids": torch.randint(1, 100, (3, 5))}
    labels = torch.randn(3) if num_labels == 1 else torch.randn(3, num_labels)
    check_against_model(model, inputs, labels, equal_counts=True)


@pytest.mark.parametrize(
    ("num_labels", "labels", "expected"),
    [
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
        (1, torch.tensor([0.5, -1.0]), "regression"),
        (3, torch.tensor([0, 2]), "single_label_classification"),
    ],
)
def test_the_inferred_problem_type_is_recorded_in_the_config_as_the_models_own_loss_does(num_labels, labels, expected):
    model = BertForSequenceClassification(bert_config(num_labels=num_labels))
    outputs = model(input_ids=torch.randint(1, 100, (2, 4)))
    per_example_losses(model, outputs, labels)
    assert model.config.problem_type == expected  # (saved with the model: pipelines read it)
    reference = BertForSequenceClassification(bert_config(num_labels=num_labels))
    reference(input_ids=torch.randint(1, 100, (2, 4)), labels=labels)
    assert reference.config.problem_type == expected


def test_problem_type_of_config_wins_over_label_dtype():
    model = BertForSequenceClassification(bert_config(num_labels=2, problem_type="multi_label_classification")).eval()
    outputs = model(input_ids=torch.randint(1, 100, (2, 4)))
    labels = torch.tensor([[1, 0], [0, 1]])  # integer labels, yet multi-label by config
    logits = outputs.logits.detach()
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
    torch.testing.assert_close(per_example_losses(model, outputs, labels).detach(), want)


def test_token_classification():
    model = BertForTokenClassification(bert_config(num_labels=4))
    inputs = {"input_ids": torch.randint(1, 100, (3, 6))}
    labels = torch.randint(0, 4, (3, 6))
    labels[:, 0] = -100
    labels[torch.arange(3), torch.tensor([5, 3, 2])] = -100  # four labelled tokens in every example
    check_against_model(model, inputs, labels, equal_counts=True)


def test_token_classification_unequal_counts_is_mean_of_example_means():
    model = BertForTokenClassification(bert_config(num_labels=4)).eval()
    inputs = {"input_ids": torch.randint(1, 100, (2, 6))}
    labels = torch.randint(0, 4, (2, 6))
    labels[0, 2:] = -100  # 2 tokens vs 6 tokens
    losses = check_against_model(model, inputs, labels, equal_counts=False)
    token_mean = model(**inputs, labels=labels).loss
    torch.testing.assert_close((2 * losses[0] + 6 * losses[1]) / 8, token_mean)


def test_causal_lm_with_padding_and_an_empty_example():
    model = GPT2LMHeadModel(gpt2_config())
    input_ids = torch.randint(2, 100, (3, 7))
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    labels = input_ids.clone()
    labels[1, 5:] = -100
    assert detect_model_kind(model) == "causal_lm"
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    losses = check_against_model(model, inputs, labels, equal_counts=False)
    # example 0 and 2 have 6 valid shifted targets each: their mean is the model's loss on the two
    pair = {k: v[[0, 2]] for k, v in inputs.items()}
    torch.testing.assert_close(losses[[0, 2]].mean(), model(**pair, labels=labels[[0, 2]]).loss)
    # only the first token is labelled: nothing to predict after the shift -> loss 0, finite
    empty = labels.clone()
    empty[2, 1:] = -100
    out = model(**inputs)
    result = per_example_losses(model, out, empty)
    assert result[2].item() == 0.0
    torch.testing.assert_close(result[:2], losses[:2])


def _xlnet() -> XLNetLMHeadModel:
    return XLNetLMHeadModel(XLNetConfig(vocab_size=100, d_model=32, n_layer=2, n_head=2, d_inner=64))


def _cpmant() -> CpmAntForCausalLM:
    return CpmAntForCausalLM(CpmAntConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, dim_head=16, dim_ff=64,
        prompt_length=4, prompt_types=3, segment_types=3, position_bias_num_buckets=8, position_bias_max_distance=32,
    ))  # fmt: skip


@pytest.mark.parametrize("build", [_xlnet, _cpmant], ids=["xlnet", "cpmant"])
def test_causal_lms_whose_own_loss_does_not_shift_the_labels(build):
    """XLNet's and CPM-Ant's losses compare position t with label t: shifting gave another objective (XLNet's
    per-example mean 4.63 against its own loss 3.98)."""
    torch.manual_seed(0)
    model = build()
    assert detect_model_kind(model) == "causal_lm"
    input_ids = torch.randint(5, 90, (3, 7))
    check_against_model(model, {"input_ids": input_ids}, input_ids, equal_counts=True)


def test_mixture_of_experts_router_loss_is_added_to_every_example():
    """With output_router_logits=True, Mixtral's loss adds router_aux_loss_coef times its load-balancing loss (one
    number for the batch): every example's loss gets it, so that their mean is the model's loss (it was left out)."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=True, router_aux_loss_coef=0.5,
    )  # fmt: skip
    model = MixtralForCausalLM(config).eval()
    input_ids = torch.randint(5, 100, (3, 7))
    outputs = model(input_ids=input_ids)
    losses = per_example_losses(model, outputs, input_ids)
    expected = model(input_ids=input_ids, labels=input_ids)
    assert float(expected.aux_loss) > 0.1  # (the term is not negligible)
    torch.testing.assert_close(losses.mean(), expected.loss, rtol=1e-5, atol=1e-6)
    without = per_example_losses(model, {"logits": outputs.logits}, input_ids)
    torch.testing.assert_close(losses - without, torch.full((3,), 0.5 * float(outputs.aux_loss)), rtol=1e-5, atol=1e-6)


def test_causal_lm_rows_are_the_gradients_of_single_example_losses():
    model = GPT2LMHeadModel(gpt2_config()).eval()
    input_ids = torch.randint(2, 100, (2, 5))
    losses = per_example_losses(model, model(input_ids=input_ids), input_ids)
    params = [model.transformer.h[0].mlp.c_fc.weight, model.lm_head.weight]
    jacobian = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(2)]
    for i in range(2):
        alone = model(input_ids=input_ids[i : i + 1], labels=input_ids[i : i + 1]).loss
        for got, want in zip(jacobian[i], torch.autograd.grad(alone, params), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_masked_lm():
    model = BertForMaskedLM(bert_config())
    input_ids = torch.randint(1, 100, (3, 8))
    labels = torch.full_like(input_ids, -100)
    labels[:, [1, 4]] = input_ids[:, [1, 4]]
    assert detect_model_kind(model) == "masked_lm"
    check_against_model(model, {"input_ids": input_ids}, labels, equal_counts=True)


def test_seq2seq_lm():
    config = T5Config(
        vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=0
    )
    model = T5ForConditionalGeneration(config)
    assert detect_model_kind(model) == "seq2seq_lm"
    input_ids = torch.randint(1, 100, (3, 5))
    labels = torch.randint(1, 100, (3, 4))
    labels[0, 3] = -100
    decoder_input_ids = model._shift_right(labels)
    check_against_model(
        model, {"input_ids": input_ids}, labels, equal_counts=False, decoder_input_ids=decoder_input_ids
    )


def test_vision_encoder_decoder_takes_the_seq2seq_loss():
    """Image captioning / OCR (ViT encoder, GPT-2 decoder): an image-to-text model registered beside the decoder-only
    vision-language models, whose encoder-decoder config gives it the seq2seq loss (labels not shifted here)."""
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    encoder = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    decoder = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, add_cross_attention=True,
                         is_decoder=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 0, 0
    model = VisionEncoderDecoderModel(config=config)
    assert detect_model_kind(model) == "seq2seq_lm"
    labels = torch.randint(1, 50, (3, 5))
    labels[1, 3:] = -100
    decoder_input_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
    check_against_model(model, {"pixel_values": torch.randn(3, 3, 8, 8)}, labels, equal_counts=False,
                        decoder_input_ids=decoder_input_ids)


def test_vision_language_models_take_the_causal_lm_loss():
    """Decoder-only image-text-to-text models (LLaVA-style ``...ForConditionalGeneration``) compute the causal LM's
    shifted loss over their ``[B, T, V]`` logits."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=16)
    text = LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=32)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=59,
                                                      vision_feature_select_strategy="default"))
    assert detect_model_kind(model) == "causal_lm"
    image_tokens = (8 // 4) ** 2
    input_ids = torch.cat([torch.full((3, image_tokens), 59), torch.randint(1, 50, (3, 6))], dim=1)
    labels = input_ids.clone()
    labels[:, :image_tokens] = -100
    labels[2, -2:] = -100
    check_against_model(model, {"input_ids": input_ids, "pixel_values": torch.randn(3, 3, 8, 8)}, labels,
                        equal_counts=False)


def test_image_classification_uses_the_sequence_classification_rules():
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )
    model = ViTForImageClassification(config)
    assert detect_model_kind(model) == "sequence_classification"
    check_against_model(model, {"pixel_values": torch.randn(3, 1, 8, 8)}, torch.tensor([0, 2, 1]), equal_counts=True)


def test_user_subclass_is_detected_through_its_base_class():
    class MyClassifier(BertForSequenceClassification):
        pass

    model = MyClassifier(bert_config(num_labels=2))
    assert detect_model_kind(model) == "sequence_classification"
    model.config.architectures = ["GPT2LMHeadModel"]  # the class itself wins over the saved architectures
    assert detect_model_kind(model) == "sequence_classification"


def test_ignored_single_label_gives_zero():
    model = BertForSequenceClassification(bert_config(num_labels=2)).eval()
    outputs = model(input_ids=torch.randint(1, 100, (3, 4)))
    losses = per_example_losses(model, outputs, torch.tensor([1, -100, 0]))
    assert losses[1].item() == 0.0 and losses[0].item() > 0


def test_outputs_as_dict_and_tuple_and_wrapped_model():
    model = BertForSequenceClassification(bert_config(num_labels=2)).eval()
    inputs = torch.randint(1, 100, (2, 4))
    labels = torch.tensor([0, 1])
    outputs = model(input_ids=inputs)
    reference = per_example_losses(model, outputs, labels)
    torch.testing.assert_close(per_example_losses(model, {"logits": outputs.logits}, labels), reference)
    torch.testing.assert_close(per_example_losses(model, (outputs.logits,), labels), reference)
    wrapped = torch.nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    torch.testing.assert_close(per_example_losses(wrapped, outputs, labels), reference)


def test_ambiguous_model_needs_kind():
    model = XLMWithLMHeadModel(XLMConfig(vocab_size=50, emb_dim=16, n_layers=1, n_heads=2, max_position_embeddings=16))
    with pytest.raises(ValueError, match="kind="):
        detect_model_kind(model)
    input_ids = torch.randint(1, 50, (2, 5))
    outputs = model(input_ids=input_ids)
    labels = torch.full_like(input_ids, -100)
    labels[:, 2] = input_ids[:, 2]
    losses = per_example_losses(model, outputs, labels, kind="masked_lm")
    assert losses.shape == (2,)


# ---------------------------------------------------------------- errors


def test_unknown_model_kind_tells_to_pass_compute_losses():
    model = BertModel(bert_config())
    outputs = model(input_ids=torch.randint(1, 100, (2, 4)))
    with pytest.raises(ValueError, match="compute_losses"):
        per_example_losses(model, outputs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="compute_losses"):
        detect_model_kind(torch.nn.Linear(2, 2))


def test_bad_arguments_raise():
    model = BertForSequenceClassification(bert_config(num_labels=2)).eval()
    outputs = model(input_ids=torch.randint(1, 100, (2, 4)))
    with pytest.raises(ValueError, match="kind must be one of"):
        per_example_losses(model, outputs, torch.tensor([0, 1]), kind="ranking")
    with pytest.raises(TypeError, match="torch.Tensor"):
        per_example_losses(model, outputs, [0, 1])
    with pytest.raises(ValueError, match="batch size"):
        per_example_losses(model, outputs, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="logits"):
        per_example_losses(model, {"hidden": outputs.logits}, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        per_example_losses(model, outputs, torch.tensor([[0, 1], [1, 0]]), kind="causal_lm")
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        per_example_losses(model, outputs, torch.tensor([[0, 1], [1, 0]]), kind="token_classification")
    with pytest.raises(ValueError, match="one label per example"):
        per_example_losses(model, outputs, torch.tensor([[0, 1], [1, 0]]))
    regression = BertForSequenceClassification(bert_config(num_labels=2, problem_type="regression")).eval()
    out = regression(input_ids=torch.randint(1, 100, (2, 4)))
    with pytest.raises(ValueError, match="one per output"):
        per_example_losses(regression, out, torch.randn(2, 3))


def _wav2vec2_ctc(reduction: str):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0,
        pad_token_id=0, ctc_loss_reduction=reduction, ctc_zero_infinity=True,
    )  # fmt: skip
    return Wav2Vec2ForCTC(config).eval()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ctc_speech_recognition(reduction):
    """Wav2Vec2ForCTC: each row is the CTC loss of the example's transcript over its valid frames (from the attention
    mask of its padded audio), scaled so that the mean of the rows is the model's loss for either reduction."""
    from hf_jd.trainer.losses import ctc_logit_lengths

    model = _wav2vec2_ctc(reduction)
    assert detect_model_kind(model) == "ctc"
    audio = torch.randn(3, 160)
    mask = torch.ones(3, 160, dtype=torch.long)
    mask[1, 100:] = 0
    audio[1, 100:] = 0.0
    labels = torch.tensor([[3, 4, 5, 4], [6, 7, -100, -100], [8, 8, 9, -100]])
    inputs = {"input_values": audio, "attention_mask": mask}
    lengths = ctc_logit_lengths(model, inputs)
    assert lengths is not None and lengths[1] < lengths[0]
    losses = per_example_losses(model, model(**inputs), labels, logit_lengths=lengths)
    scale = 3.0 if reduction == "sum" else 1.0
    for i in range(3):
        alone = model(input_values=audio[i : i + 1], attention_mask=mask[i : i + 1], labels=labels[i : i + 1]).loss
        torch.testing.assert_close(losses[i], scale * alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.mean(), model(**inputs, labels=labels).loss, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Label smoothing"):
        per_example_losses(model, model(**inputs), labels, label_smoothing=0.1)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("qwen2_moe", {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4}),
        ("granitemoe", {"num_local_experts": 4}),
    ],
)
def test_mixtures_of_experts_router_loss_split(model_type: str, extra: dict, monkeypatch) -> None:
    """The built-in causal LM losses of mixtures of experts with their load-balancing term (Mixtral's is tested through
    the trainer) are split by example (:func:`router_loss_split`): the Gramian is exact, without the engine's per-row
    pass."""
    import transformers
    from jd_trainer_helpers import count_per_row_passes, explicit_jacobian, trainable

    from hf_jd.autogram import Engine
    from hf_jd.trainer.losses import per_example_losses_and_router_term, router_loss_split

    per_row = count_per_row_passes(monkeypatch)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.3,
        num_experts_per_tok=2, **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    engine = Engine(model, batch_dim=0)
    ids = torch.randint(1, 100, (4, 8))
    outputs = model(input_ids=ids)
    own, term = per_example_losses_and_router_term(model, outputs, ids)
    assert term is not None
    split = router_loss_split(outputs, own, term)
    assert split is not None
    jacobian = explicit_jacobian(own + term, trainable(model))
    gramian = split.gramian(engine.compute_gramian(split.rows()))
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-4, atol=1e-5)
    assert per_row == []
