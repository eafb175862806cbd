"""Each option is declared once: the model options come from VQRAEConfig's fields (name, type, documentation), and
what a resume may change or what changes the tokens is metadata on the option's field."""

import dataclasses

import pytest

from vqrae import VQRAEConfig, arguments, configuration_vqrae
from vqrae.cli.train import parse_train_args as parse_args
from vqrae.configuration_vqrae import NOT_TRAINING_OPTIONS
from vqrae.errors import UsageError
from vqrae.tokenize import CONTENT_ARGUMENTS, TokenizeArguments
from vqrae.training import run_files
from vqrae.training.args import ALL_ARGUMENT_CLASSES, MODEL_OPTIONS, RESUMABLE_OPTIONS
from vqrae.training.checkpointing import check_resume
from vqrae.training.config_files import read_training_config, write_training_config


def _argument_names() -> list[str]:
    return [item.name for cls in ALL_ARGUMENT_CLASSES for item in dataclasses.fields(cls)]


def test_every_config_field_is_one_option_or_named_as_set_otherwise():
    names = _argument_names()
    assert set(NOT_TRAINING_OPTIONS) <= set(VQRAEConfig.__annotations__)
    for name in VQRAEConfig.__annotations__:
        if name in NOT_TRAINING_OPTIONS:
            assert name not in MODEL_OPTIONS
        else:
            assert name in MODEL_OPTIONS and names.count(name) == 1, name
    assert len(names) == len(set(names))


def test_a_model_option_is_parsed_into_the_config_and_documented_by_it(capsys):
    model_args, _, _ = parse_args(["--quantizer", "vq", "--num_embeddings", "64", "--vq_cosine_lookup", "true"])
    kwargs = model_args.config_kwargs()
    assert kwargs["num_embeddings"] == 64 and kwargs["vq_cosine_lookup"] is True and kwargs["use_fsq"] is False
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Number of VQ codes (used when `use_fsq=False`), >= 2." in help_text


def test_an_option_of_the_config_cannot_be_declared_again():
    from vqrae.training.args import _with_model_options

    class Again:
        __annotations__ = {"fsq_levels": "list[int] | None"}

    with pytest.raises(TypeError, match="`fsq_levels` is a VQRAEConfig field"):
        _with_model_options(Again)


def _record(**options):
    base = {name: None for name in _argument_names()}
    return {
        "num_processes": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "dataset": {"kind": "builtin"},
        "options": {**base, **options},
    }


def test_resume_may_change_only_the_options_marked_resumable():
    assert not RESUMABLE_OPTIONS & set(MODEL_OPTIONS)
    check_resume(_record(logging_steps=10, eval_steps=5), _record(logging_steps=1, eval_steps=7), "ckpt")
    with pytest.raises(UsageError, match=r"--fsq_levels \[8, 8\] \(trained with \[8, 8, 8\]\)"):
        check_resume(_record(fsq_levels=[8, 8, 8]), _record(fsq_levels=[8, 8]), "ckpt")
    with pytest.raises(UsageError, match="--seed 2"):
        check_resume(_record(seed=1), _record(seed=2), "ckpt")


def test_the_content_arguments_are_every_tokenize_argument_not_marked_otherwise():
    every = {item.name for item in dataclasses.fields(TokenizeArguments)}
    not_content = {"output_dir", "overwrite_output_dir", "batch_size", "dataloader_num_workers", "streaming"}
    assert set(CONTENT_ARGUMENTS) == every - not_content


def test_run_outputs_name_every_file_a_run_writes():
    names = {value for key, value in vars(run_files).items() if key.endswith(("_FILE", "_DIR"))}
    assert names <= set(run_files.RUN_OUTPUTS)
    assert set(run_files.MODEL_FILES) <= set(run_files.RUN_OUTPUTS)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("max_steps: 2\nmax_step: 3\n", r"has unknown options \['max_step'\]"),
        ("- max_steps\n", "must hold a mapping of option names to values"),
        ("max_steps: [2\n", "is not valid YAML"),
    ],
)
def test_a_config_file_holds_only_known_options(tmp_path, text, match):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        parse_args(["--config", str(path)])


def test_a_written_training_config_trains_the_same_options_again(tmp_path):
    path = tmp_path / run_files.TRAINING_CONFIG_FILE
    options = {"max_steps": 7, "fsq_levels": [8, 5], "seed": 3}
    write_training_config(str(path), options, notes=["derived: nothing"])
    assert read_training_config(str(path)) == (options, ["derived: nothing"])
    model_args, _, training_args = parse_args(["--config", str(path)])
    assert (model_args.fsq_levels, training_args.max_steps, training_args.seed) == ([8, 5], 7, 3)


@pytest.mark.parametrize("value", [0, True, 1.0, "1", None])
def test_one_integer_check_serves_the_config_and_the_options(value):
    """The tools' check is the config's, as a UsageError naming the option: same values refused, same words."""
    with pytest.raises(ValueError) as from_config:
        configuration_vqrae.check_at_least("shard_size", value, 1)
    with pytest.raises(UsageError) as from_option:
        arguments.check_at_least("shard_size", value, 1)
    assert str(from_option.value) == str(from_config.value).replace("`shard_size`", "`--shard_size`")
    assert str(from_option.value) == f"`--shard_size` must be an integer >= 1 (got {value!r})."


def test_an_optional_integer_may_be_unset():
    configuration_vqrae.check_at_least("codebook_dim", None, 1, optional=True)
    arguments.check_at_least("max_images", None, 1, optional=True)
    with pytest.raises(UsageError, match=r"`--max_images` must be an integer >= 1 or unset \(got 0\)"):
        arguments.check_at_least("max_images", 0, 1, optional=True)


def test_ddp_timeout_is_transformers_option_and_a_resume_may_change_it(capsys):
    """`--ddp_timeout` (transformers' TrainingArguments name and default, seconds) only bounds how long a process
    waits for the others: it shapes no weights, so a resume may change it; 0 would abort every collective."""
    from vqrae.cli.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--ddp_timeout DDP_TIMEOUT" in capsys.readouterr().out
    assert parse_args([])[2].ddp_timeout == 1800 and parse_args(["--ddp_timeout", "60"])[2].ddp_timeout == 60
    assert "ddp_timeout" in RESUMABLE_OPTIONS
    with pytest.raises(UsageError, match="--ddp_timeout"):
        parse_args(["--ddp_timeout", "0"])
