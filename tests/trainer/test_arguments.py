"""Tests of JDTrainingArguments: defaults, validation, command line and serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_jd import JDTrainingArguments
from hf_jd.aggregation import available_aggregators, is_gramian_based


def make(tmp_path, **kwargs) -> JDTrainingArguments:
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("use_cpu", True)
    return JDTrainingArguments(output_dir=str(tmp_path), **kwargs)


def test_defaults(tmp_path):
    args = make(tmp_path)
    assert isinstance(args, TrainingArguments)
    assert args.jd_mode == "iwrm"
    assert args.jd_aggregator == "upgrad"
    assert args.jd_aggregator_kwargs == {}
    assert args.jd_engine == "auto"
    assert args.jd_resolved_engine == "autogram"
    assert args.jd_update_weights_every == 1
    assert args.jd_nonfinite == "raise"
    assert args.jd_log_weights is True
    assert args.jd_ddp_gramian == "auto"
    assert args.jd_modules is None and args.jd_task_names is None
    assert args.jd_freeze_batch_norm is False


def test_every_jd_field_has_help():
    for field in dataclasses.fields(JDTrainingArguments):
        if field.name.startswith("jd_"):
            assert field.metadata.get("help"), field.name


def test_auto_engine_follows_aggregator(tmp_path):
    non_gramian = [name for name in available_aggregators() if not is_gramian_based(name)]
    assert non_gramian, "the registry should hold at least one non-Gramian aggregator"
    args = make(tmp_path, jd_aggregator=non_gramian[0])
    assert args.jd_resolved_engine == "autojac"
    assert make(tmp_path, jd_engine="autojac").jd_resolved_engine == "autojac"


def test_aggregator_name_is_normalised(tmp_path):
    assert make(tmp_path, jd_aggregator="UPGrad").jd_aggregator == "upgrad"
    assert make(tmp_path, jd_aggregator="imtl-g").jd_aggregator == "imtl_g"


def test_kwargs_json_string_is_parsed(tmp_path):
    args = make(tmp_path, jd_aggregator="upgrad", jd_aggregator_kwargs='{"norm_eps": 0.001, "reg_eps": 0.0001}')
    assert args.jd_aggregator_kwargs == {"norm_eps": 0.001, "reg_eps": 0.0001}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"jd_aggregator": "nope"}, "Unknown jd_aggregator 'nope'. Valid names are: "),
        ({"jd_aggregator": "upgrad", "jd_aggregator_kwargs": {"not_a_kwarg": 1}}, "not_a_kwarg"),
        ({"jd_aggregator_kwargs": "{not json"}, "JSON object"),
        ({"jd_aggregator_kwargs": "[1, 2]"}, "must be a dict"),
        ({"jd_mode": "mtl"}, "needs jd_task_names"),
        ({"jd_mode": "iwmtl"}, "needs jd_task_names"),
        ({"jd_mode": "other"}, "jd_mode='other' is not valid"),
        ({"jd_engine": "fast"}, "jd_engine='fast' is not valid"),
        ({"jd_nonfinite": "ignore"}, "jd_nonfinite='ignore' is not valid"),
        ({"jd_ddp_gramian": "all"}, "jd_ddp_gramian='all' is not valid"),
        ({"jd_update_weights_every": 0}, "must be >= 1"),
        ({"jd_update_weights_every": 1.5}, "must be an integer"),
        ({"jd_task_names": ["a", "a"], "jd_mode": "mtl"}, "duplicates"),
        ({"jd_modules": []}, "jd_modules is empty"),
        ({"jd_freeze_batch_norm": "yes"}, "jd_freeze_batch_norm must be a bool"),
        ({"deepspeed": {"train_batch_size": 8}}, "does not support DeepSpeed"),
        ({"fsdp": "full_shard"}, "does not support FSDP"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=None) as info:
        make(tmp_path, **kwargs)
    assert message in str(info.value)


def test_unknown_aggregator_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as info:
        make(tmp_path, jd_aggregator="nope")
    for name in available_aggregators():
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "suggestion"),
    [
        ({"jd_aggregator": "upgrd"}, "Did you mean 'upgrad'?"),
        ({"jd_aggregator": "pc_grad"}, "Did you mean 'pcgrad'?"),
        ({"jd_aggregator": "nashmtl"}, "Did you mean 'nash_mtl'?"),
        ({"jd_aggregator": "IMTL-G2"}, "Did you mean 'imtl_g'?"),
        ({"jd_mode": "iwmt"}, "Did you mean 'iwmtl'?"),
        ({"jd_engine": "autograd"}, "Did you mean 'autogram'?"),
        ({"jd_nonfinite": "skipp"}, "Did you mean 'skip'?"),
        ({"jd_ddp_gramian": "lcal"}, "Did you mean 'local'?"),
    ],
)
def test_misspelled_names_get_a_suggestion(tmp_path, kwargs, suggestion):
    with pytest.raises(ValueError) as info:
        make(tmp_path, **kwargs)
    assert suggestion in str(info.value)


def test_far_off_names_get_no_suggestion(tmp_path):
    with pytest.raises(ValueError) as info:
        make(tmp_path, jd_aggregator="adamw")
    assert "Did you mean" not in str(info.value)


def test_non_gramian_aggregator_rejects_autogram_and_weight_reuse(tmp_path):
    name = next(name for name in available_aggregators() if not is_gramian_based(name))
    with pytest.raises(ValueError, match="needs a Gramian-based aggregator"):
        make(tmp_path, jd_aggregator=name, jd_engine="autogram")
    with pytest.raises(ValueError, match="not Gramian-based and has no weights"):
        make(tmp_path, jd_aggregator=name, jd_update_weights_every=2)


def test_bad_constructor_value_is_reported(tmp_path):
    with pytest.raises(ValueError, match="jd_aggregator_kwargs=.*not valid for aggregator 'constant'"):
        make(tmp_path, jd_aggregator="constant", jd_aggregator_kwargs={"weights": "abc"})


def _parse(argv: list[str]) -> JDTrainingArguments:
    (args,) = HfArgumentParser((JDTrainingArguments,)).parse_args_into_dataclasses(args=argv)
    return args


def test_command_line_round_trip(tmp_path):
    argv = [
        "--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu",
        "--jd_mode", "mtl", "--jd_task_names", "a", "b",
        "--jd_aggregator", "mgda", "--jd_aggregator_kwargs", '{"epsilon": 1e-4}',
        "--jd_engine", "autojac", "--jd_update_weights_every", "3",
        "--jd_modules", "encoder.*", "head_a",
        "--jd_nonfinite", "skip", "--no_jd_log_weights", "--jd_ddp_gramian", "local",
        "--learning_rate", "0.01",
    ]  # fmt: skip
    args = _parse(argv)
    assert args.jd_mode == "mtl"
    assert args.jd_task_names == ["a", "b"]
    assert args.jd_aggregator == "mgda"
    assert args.jd_aggregator_kwargs == {"epsilon": 1e-4}
    assert args.jd_engine == "autojac"
    assert args.jd_update_weights_every == 3
    assert args.jd_modules == ["encoder.*", "head_a"]
    assert args.jd_nonfinite == "skip"
    assert args.jd_log_weights is False
    assert args.jd_ddp_gramian == "local"
    assert args.learning_rate == 0.01
    # And back: the serialised arguments, fed to the parser as a dict, give the same JD options.
    (again,) = HfArgumentParser((JDTrainingArguments,)).parse_dict(
        {k: v for k, v in json.loads(args.to_json_string()).items() if k.startswith("jd_") or k == "output_dir"}
    )
    assert {k: getattr(again, k) for k in _jd_fields()} == {k: getattr(args, k) for k in _jd_fields()}


def test_command_line_rejects_bad_choice(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["--output_dir", str(tmp_path), "--jd_mode", "bogus"])
    assert "jd_mode" in capsys.readouterr().err


def _jd_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(JDTrainingArguments) if f.name.startswith("jd_")]


def test_serialisation_round_trip(tmp_path):
    args = make(
        tmp_path,
        jd_mode="iwmtl",
        jd_task_names=["x", "y"],
        jd_aggregator="upgrad",
        jd_aggregator_kwargs={"norm_eps": 1e-3},
        jd_modules=["encoder"],
        jd_update_weights_every=2,
    )
    as_dict = args.to_dict()
    assert {k: as_dict[k] for k in _jd_fields()} == {k: getattr(args, k) for k in _jd_fields()}
    as_json = json.loads(args.to_json_string())
    assert as_json["jd_aggregator_kwargs"] == {"norm_eps": 1e-3}
    assert as_json["jd_task_names"] == ["x", "y"]

    rebuilt = JDTrainingArguments(**{k: as_json[k] for k in _jd_fields()}, output_dir=str(tmp_path), use_cpu=True)
    assert {k: getattr(rebuilt, k) for k in _jd_fields()} == {k: getattr(args, k) for k in _jd_fields()}

    path = tmp_path / "training_args.bin"
    torch.save(args, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded, JDTrainingArguments)
    assert {k: getattr(loaded, k) for k in _jd_fields()} == {k: getattr(args, k) for k in _jd_fields()}


def test_task_names_are_ignored_with_a_warning_in_iwrm(tmp_path):
    with pytest.warns(UserWarning, match="jd_task_names.*ignored with jd_mode='iwrm'.*iwmtl"):
        make(tmp_path, jd_mode="iwrm", jd_task_names=["a", "b"])


@pytest.mark.parametrize("flag", ["--jd_task_names", "--jd_modules"])
def test_command_line_comma_separated_lists_are_split(tmp_path, flag):
    argv = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "--jd_mode", "mtl"]
    if flag == "--jd_modules":
        argv += ["--jd_task_names", "a", "b"]
    args = _parse([*argv, flag, "a, b", "c"])
    values = args.jd_task_names if flag == "--jd_task_names" else args.jd_modules
    assert values == ["a", "b", "c"]


def test_list_items_with_commas_are_split_like_a_string(tmp_path):
    from_list = make(tmp_path, jd_mode="mtl", jd_task_names=["a,b", "c"])
    from_string = make(tmp_path, jd_mode="mtl", jd_task_names="a,b,c")
    assert from_list.jd_task_names == from_string.jd_task_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="jd_task_names has duplicates: \\['a'\\]"):
        make(tmp_path, jd_mode="mtl", jd_task_names=["a,b", "a"])


def test_commas_inside_fnmatch_brackets_are_not_split(tmp_path):
    """`layer.[0,1]` is one fnmatch pattern (a character set), not two names."""
    from hf_jd.trainer.arguments import _split_commas

    assert _split_commas("bert.encoder.layer.[0,1].*, classifier") == ["bert.encoder.layer.[0,1].*", "classifier"]
    assert _split_commas("a,[b,c],d]") == ["a", "[b,c]", "d]"]


def test_tensor_and_numpy_aggregator_kwargs_serialise(tmp_path):
    import numpy as np

    args = make(
        tmp_path,
        jd_mode="mtl",
        jd_task_names=["a", "b"],
        jd_aggregator_kwargs={"pref_vector": torch.tensor([1.0, 2.0]), "norm_eps": np.float64(1e-4)},
    )
    assert args.jd_aggregator_kwargs == {"pref_vector": [1.0, 2.0], "norm_eps": 1e-4}
    assert type(args.jd_aggregator_kwargs["norm_eps"]) is float
    as_json = json.loads(args.to_json_string())  # what the TensorBoard callback calls
    assert as_json["jd_aggregator_kwargs"] == {"pref_vector": [1.0, 2.0], "norm_eps": 1e-4}
    nested = make(tmp_path, jd_mode="mtl", jd_task_names=["a", "b"], jd_aggregator="constant",
                  jd_aggregator_kwargs={"weights": np.array([0.5, 1.5])})  # fmt: skip
    assert nested.jd_aggregator_kwargs == {"weights": [0.5, 1.5]}


@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_fused_backward_optimizers_are_rejected(tmp_path, optim):
    with pytest.raises(ValueError, match=f"optim='{optim}' is not supported by JDTrainer.*adamw_torch"):
        make(tmp_path, optim=optim)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_kwargs` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"])
def test_reentrant_checkpointing_is_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="Reentrant gradient checkpointing.*use_reentrant': False.*both engines"):
        make(tmp_path, jd_engine="autojac", activation_checkpointing=True, **{name: {"use_reentrant": True}})
    with pytest.raises(ValueError, match="Reentrant gradient checkpointing"):
        make(tmp_path, jd_engine="autojac", activation_checkpointing=True, **{name: '{"use_reentrant": true}'})
    args = make(tmp_path, jd_engine="autojac", activation_checkpointing=True, **{name: {"use_reentrant": False}})
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_non_reentrant_checkpointing_is_accepted_with_both_engines(tmp_path):
    for engine in ("autogram", "autojac"):
        args = make(tmp_path, jd_engine=engine, activation_checkpointing=True)
        assert args.jd_resolved_engine == engine


def test_choices_are_accepted_in_any_case_like_aggregator_names(tmp_path):
    args = make(tmp_path, jd_mode="IWRM", jd_engine="Autogram", jd_nonfinite="Skip", jd_ddp_gramian="Local",
                jd_aggregator="UPGrad")  # fmt: skip
    assert (args.jd_mode, args.jd_engine, args.jd_nonfinite, args.jd_ddp_gramian, args.jd_aggregator) == (
        "iwrm", "autogram", "skip", "local", "upgrad"
    )


@pytest.mark.parametrize(
    ("aggregator", "kwargs", "message"),
    [
        ("constant", {"weights": [0.5, 0.3, 0.2]}, "does not fit the 2 tasks of jd_task_names"),
        ("upgrad", {"pref_vector": [1.0, 1.0, 1.0]}, "does not fit the 2 tasks"),
        ("krum", {"n_byzantine": 1}, "does not fit the 2 tasks"),
    ],
)
def test_an_aggregator_that_cannot_take_the_number_of_tasks_fails_when_the_arguments_are_built(
    tmp_path, aggregator, kwargs, message
):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, jd_mode="mtl", jd_task_names=["a", "b"], jd_aggregator=aggregator, jd_aggregator_kwargs=kwargs)


def test_checking_the_aggregator_against_the_tasks_leaves_the_random_state_alone(tmp_path):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make(tmp_path, jd_mode="mtl", jd_task_names=["a", "b"], jd_aggregator="random")
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("iwrm", {"weights": [0.5, 0.5]}, "does not fit the 4 examples of a batch"),
        ("iwmtl", {"weights": [0.25] * 4}, "does not fit the 4 examples x 2 tasks of a batch"),
    ],
)
def test_an_aggregator_that_cannot_take_a_full_batch_fails_when_the_arguments_are_built(
    tmp_path, mode, kwargs, message
):
    names = {"jd_task_names": ["a", "b"]} if mode == "iwmtl" else {}
    with pytest.raises(ValueError, match=message):
        make(tmp_path, jd_mode=mode, jd_aggregator="constant", jd_aggregator_kwargs=kwargs,
             per_device_train_batch_size=4, **names)  # fmt: skip
    make(tmp_path, jd_mode=mode, jd_aggregator="constant", jd_aggregator_kwargs=kwargs,
         per_device_train_batch_size=4, auto_find_batch_size=True, **names)  # fmt: skip  (the size may change)
    weights = [0.25] * 4 if mode == "iwrm" else [0.125] * 8
    make(tmp_path, jd_mode=mode, jd_aggregator="constant", jd_aggregator_kwargs={"weights": weights},
         per_device_train_batch_size=4, **names)  # fmt: skip
