"""A resume continues the run it resumes or is refused: the same number of processes, batch, accumulation, data and
weight-shaping options, or a one-line error that says which value changed and what to pass."""

import os

import pytest
import yaml

from conftest import photo_folder, records, run


@pytest.fixture
def folder_run(tmp_path):
    """A 2-step run on an image folder, checkpointed at both steps."""
    train = photo_folder(tmp_path / "train", 6)
    validation = photo_folder(tmp_path / "validation", 2, seed=1)
    folders = ["--train_dir", str(train), "--validation_dir", str(validation)]
    output = tmp_path / "out"
    run(output, *folders, "--save_steps", "1")
    return output, folders, train


def _resume(output, folders, *extra):
    checkpoint = str(output / "checkpoints" / "checkpoint-1")
    return run(output, *folders, "--save_steps", "1", "--resume_from_checkpoint", checkpoint, *extra)


def test_resume_with_only_logging_options_changed_continues(folder_run):
    output, folders, _ = folder_run
    config = (output / "training_config.yaml").read_text()
    metrics = _resume(output, folders, "--logging_steps", "2", "--eval_steps", "50", "--save_total_limit", "3")
    assert metrics["step"] == 2 and [r["step"] for r in records(output)] == [1, 2]
    assert (output / "training_config.yaml").read_text() == config  # the record of the run it continued


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--learning_rate", "1e-3"],
            r"--learning_rate 0.001 \(trained with 0.002\).*pass them again \(--learning_rate",
        ),
        (["--fsq_levels", "8", "8", "8"], r"--fsq_levels \[8, 8, 8\] \(trained with None\).*\(no --fsq_levels\)"),
        (["--max_steps", "5"], r"--max_steps 5 \(trained with 2\)"),
        (["--per_device_train_batch_size", "2"], r"--per_device_train_batch_size 4 and this run asks for 2"),
        (["--gradient_accumulation_steps", "2"], r"Resume with --gradient_accumulation_steps 1"),
        (["--seed", "1"], r"--seed 1 \(trained with 42\)"),
    ],
)
def test_resume_that_changes_the_run_is_refused(folder_run, extra, match):
    output, folders, _ = folder_run
    with pytest.raises(ValueError, match=match):
        _resume(output, folders, *extra)


def test_resume_on_changed_data_is_refused(folder_run):
    output, folders, train = folder_run
    photo_folder(train, 1, seed=7, start=50)  # an image added to the training folder
    with pytest.raises(ValueError, match=r"training data differs .*num_examples 6 -> 7"):
        _resume(output, folders)


def test_a_missing_process_file_is_an_error(folder_run):
    output, folders, _ = folder_run
    os.remove(output / "checkpoints" / "checkpoint-1" / "process_0.json")
    with pytest.raises(ValueError, match="lacks process_0.json"):
        _resume(output, folders)


def test_resume_records_the_used_options(folder_run):
    output, _, _ = folder_run
    options = yaml.safe_load((output / "training_config.yaml").read_text())
    assert options["learning_rate"] == 0.002 and options["resume_from_checkpoint"] is None
