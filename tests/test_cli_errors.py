"""vqrae-train, vqrae-tokenize, vqrae-evaluate and vqrae-push: a user error is one line `PROG: error: ...` on stderr
and exit status 2, run as the user runs them (a real process); a bug keeps its traceback."""

import subprocess
import sys

import pytest

import vqrae.cli.evaluate as evaluate_module
import vqrae.cli.push as hub_module
import vqrae.cli.tokenize as tokenize_module
import vqrae.cli.train as train_cli
from vqrae.errors import UsageError
from vqrae.image_data import load_image_dataset

CASES = {
    # an option our own validation refuses
    "tokenize_bad_value": (
        "vqrae.cli.tokenize",
        ["--model", "m", "--output_dir", "{tmp}/out", "--dataset_name", "x", "--shard_size", "0"],
        "vqrae-tokenize: error: `--shard_size` must be an integer >= 1 (got 0).",
    ),
    # a model option that would do nothing (SimVQ with the default FSQ quantizer), refused by VQRAEConfig
    "train_option_without_effect": (
        "vqrae.cli.train",
        ["--use_simvq", "true", "--max_steps", "1", "--warmup_steps", "0", "--output_dir", "{tmp}/out"],
        "vqrae-train: error: `use_simvq=True` has no effect with `use_fsq=True`: it needs `use_fsq=False` "
        "(vqrae-train: --quantizer vq). Pass that, or leave `use_simvq` at its default False.",
    ),
    # a model folder that does not exist, relative to the working directory
    "evaluate_missing_model": (
        "vqrae.cli.evaluate",
        ["--model", "outputs/nope", "--output_dir", "{tmp}/eval"],
        "vqrae-evaluate: error: `--model` 'outputs/nope' is not a folder (looked for {tmp}/outputs/nope) and not a "
        "model in the Hub cache or reachable on the Hub: ",
    ),
    "push_missing_folder": (
        "vqrae.cli.push",
        ["{tmp}/missing", "--repo-id", "org/name"],
        "vqrae-push: error: `folder` must be a saved VQRAE model folder (got '{tmp}/missing', which is not a folder).",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_one_line_and_exit_status_2(case, tmp_path):
    module, argv, expected = CASES[case]
    tmp = str(tmp_path.resolve())
    command = [sys.executable, "-m", module, *(arg.format(tmp=tmp) for arg in argv)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected.format(tmp=tmp)), lines[0]


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        (
            tokenize_module,
            ["--model", "m", "--output_dir", "o", "--crop", "diagonal"],
            "vqrae-tokenize: error: argument --crop",
        ),
        (
            evaluate_module,
            ["--model", "m", "--output_dir", "o", "--batch_size", "two"],
            "vqrae-evaluate: error: argument --batch_size",
        ),
        (hub_module, ["folder"], "vqrae-push: error: the following arguments are required: --repo_id/--repo-id"),
    ],
    ids=["tokenize", "evaluate", "push"],
)
def test_an_option_argparse_refuses_is_one_line_too(module, argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err  # no usage block


@pytest.mark.parametrize(
    ("module", "prog"),
    [
        (train_cli, "vqrae-train"),
        (tokenize_module, "vqrae-tokenize"),
        (evaluate_module, "vqrae-evaluate"),
        (hub_module, "vqrae-push"),
    ],
    ids=["train", "tokenize", "evaluate", "push"],
)
def test_help_prints_every_option_and_exits_0(module, prog, capsys):
    """argparse %-formats help strings: a bare "%" in one made `--help` itself crash."""
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog}") and ("--output_dir" in out or "--repo_id" in out)


def _bug(*args, **kwargs):
    raise RuntimeError("a bug, not the user's mistake")


@pytest.mark.parametrize(
    ("module", "function", "argv"),
    [
        (tokenize_module, "tokenize", ["--model", "m", "--output_dir", "out", "--dataset_name", "x"]),
        (evaluate_module, "evaluate", ["--model", "m", "--output_dir", "out"]),
        (hub_module, "push_to_hub", ["folder", "--repo-id", "org/name"]),
    ],
    ids=["tokenize", "evaluate", "push"],
)
def test_a_bug_keeps_its_traceback(module, function, argv, monkeypatch):
    monkeypatch.setattr(module, function, _bug)
    with pytest.raises(RuntimeError, match="a bug, not the user's mistake"):
        module.main(argv)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"dataset_name": "org/no-such-dataset"},
            r"`dataset_name` 'org/no-such-dataset' is not a folder here and could not be loaded from the Hub",
        ),
        (
            {"validation_dir": "/no/such/folder"},
            r"`validation_dir` must be a folder of images \(got '/no/such/folder'",
        ),
    ],
)
def test_a_source_that_cannot_be_loaded_is_a_usage_error(kwargs, match):
    with pytest.raises(UsageError, match=match):
        load_image_dataset("validation", **kwargs)
