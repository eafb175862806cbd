"""A resume continues the run it resumes or is refused: the same number of processes, batch, accumulation, data and
weight-shaping options, or a one-line error that says which value changed and what to pass. A larger --max_steps
extends the run; --init_from starts a new run from a checkpoint folder."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import photo_folder, records, run
from vqrae.training.checkpointing import resume_command


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
        (["--max_steps", "1"], r"--max_steps 1, fewer than the 2 .* Pass --max_steps 2 or more"),
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


def test_resume_on_data_changed_in_place_is_refused(folder_run):
    """The same number of images, one of them another picture: only the data's fingerprint can tell."""
    output, folders, train = folder_run
    before = (train / "photo_000.png").read_bytes()
    photo_folder(train, 1, seed=7, start=0)  # photo_000.png replaced by another photo
    assert (train / "photo_000.png").read_bytes() != before and len(os.listdir(train)) == 6
    with pytest.raises(ValueError, match=r"training data differs .*fingerprint .* -> "):
        _resume(output, folders)


def test_resume_with_another_number_of_processes_is_refused(folder_run):
    """One process resuming a checkpoint whose record says two (as a two-process run writes it)."""
    output, folders, _ = folder_run
    state_file = output / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["num_processes"] = state["record"]["num_processes"] = 2
    state["record"]["resume_command"] = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 x.py"
    state_file.write_text(json.dumps(state))
    match = r"written by a run of 2 process\(es\), and this run has 1: .*--init_from .*checkpoint-1.* launch 2 "
    with pytest.raises(ValueError, match=match + r"process\(es\) as the run was launched: ACCELERATE_USE_CPU=1 accel"):
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


def _rate(lr_scheduler_type: str, warmup: int, max_steps: int, step: int) -> float:
    """The learning rate after `step` optimiser steps of a schedule built as the trainer builds it."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


def _decoder(checkpoint):
    weights = load_file(str(checkpoint / "model.safetensors"))
    return {name: value for name, value in weights.items() if name.startswith("decoder.")}


def test_a_larger_max_steps_extends_the_run(folder_run):
    """Resuming the finished 2-step run with --max_steps 4 trains steps 3 and 4 on the schedule rebuilt for 4 steps
    (same warm-up), records the new max_steps, and a resume of the extended run continues it."""
    output, folders, _ = folder_run
    keep = ["--save_steps", "1", "--save_total_limit", "3"]
    metrics = run(output, *folders, *keep, "--resume_from_checkpoint", "latest", max_steps=4)
    assert metrics["step"] == 4 and [r["step"] for r in records(output)] == [1, 2, 3, 4]
    rates = [r["learning_rate"] for r in records(output)]
    assert rates[:2] == pytest.approx([_rate("cosine", 1, 2, step) for step in (1, 2)])
    assert rates[2:] == pytest.approx([_rate("cosine", 1, 4, step) for step in (3, 4)])
    # Step 3 trained at the new schedule's rate: the 2-step schedule had ended at 0, which would change nothing.
    checkpoints = output / "checkpoints"
    before, after = _decoder(checkpoints / "checkpoint-2"), _decoder(checkpoints / "checkpoint-3")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    text = (output / "training_config.yaml").read_text()
    assert yaml.safe_load(text)["max_steps"] == 4 and "# Extended on resume at step 2: --max_steps 2 -> 4" in text
    record = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())["record"]
    assert record["options"]["max_steps"] == 4 and record["warmup_steps_used"] == 1

    extended = load_file(str(output / "model.safetensors"))
    run(output, *folders, *keep, "--resume_from_checkpoint", str(checkpoints / "checkpoint-3"), max_steps=4)
    again = load_file(str(output / "model.safetensors"))
    assert all(torch.equal(extended[name], again[name]) for name in extended)


def test_extending_a_run_keeps_its_derived_warmup_and_names_only_given_options(tmp_path):
    """--warmup_steps 3 with --max_steps 2 warms up for 0 steps (derived from --max_steps). Resumed with the same
    --warmup_steps and a larger --max_steps, the run keeps that warm-up; a refusal names only options as given."""
    output = tmp_path / "out"
    run(output, "--warmup_steps", "3", "--save_steps", "1", max_steps=2)
    assert "the run warms up for 0 steps, derived from --max_steps" in (output / "training_config.yaml").read_text()
    resume = ["--warmup_steps", "3", "--save_steps", "1", "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match="cannot honour") as refused:
        run(output, *resume, "--learning_rate", "1e-3", max_steps=4)
    message = str(refused.value)
    assert "--learning_rate 0.001 (trained with 0.002)" in message and "warmup" not in message
    with pytest.raises(ValueError, match=r"--warmup_steps 2 \(trained with 3\)"):
        run(output, *resume[2:], "--warmup_steps", "2", max_steps=4)

    run(output, *resume, max_steps=4)
    rates = [r["learning_rate"] for r in records(output)]
    assert rates[2:] == pytest.approx([_rate("cosine", 0, 4, step) for step in (3, 4)])
    assert yaml.safe_load((output / "training_config.yaml").read_text())["warmup_steps"] == 3  # as given


def test_init_from_a_checkpoint_folder_uses_its_config(tmp_path):
    """A checkpoint folder is a model folder (its config and trained weights); a run folder without a model yet
    (interrupted) is refused with the checkpoint to pass."""
    output = tmp_path / "out"
    run(output, "--decoder_num_hidden_layers", "1", "--quantizer", "vq", "--num_embeddings", "64", "--save_steps",
        "1", max_steps=1)  # fmt: skip
    checkpoint = output / "checkpoints" / "checkpoint-1"
    for name in ("config.json", "model.safetensors"):  # as if interrupted before the end
        (output / name).unlink()
    with pytest.raises(ValueError, match=f"holds no model yet .* --init_from {checkpoint}, or finish") as refused:
        run(tmp_path / "new", "--init_from", str(output), sizes=False, max_steps=1)
    assert "\n" not in str(refused.value)

    new = tmp_path / "new"
    run(new, "--init_from", str(checkpoint), sizes=False, max_steps=1)
    config = json.loads((new / "config.json").read_text())
    assert config["decoder_num_hidden_layers"] == 1 and config["num_embeddings"] == 64
    start, trained = load_file(str(checkpoint / "model.safetensors")), load_file(str(new / "model.safetensors"))
    encoder = [name for name in start if name.startswith("encoder.")]
    assert encoder and all(torch.equal(start[name], trained[name]) for name in encoder)  # stage 1: kept frozen


def test_resume_command_relaunches_the_way_the_run_was_launched():
    script = "scripts/train.py"
    two = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    two.update(ACCELERATE_MIXED_PRECISION="no", ACCELERATE_DYNAMO_BACKEND="NO", ACCELERATE_USE_CPU="1")
    assert resume_command([script, "--output_dir", "out/run"], two) == (
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
        "--dynamo_backend no scripts/train.py --output_dir out/run --resume_from_checkpoint latest"
    )
    gpus = {**two, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0", "MASTER_PORT": "1234"}
    del gpus["ACCELERATE_USE_CPU"]
    assert resume_command([script, "--resume_from_checkpoint", "out/run/checkpoints/checkpoint-3"], gpus) == (
        "accelerate launch --multi_gpu --num_processes 8 --num_machines 2 --machine_rank 0 --main_process_ip "
        "127.0.0.1 --mixed_precision no --dynamo_backend no --main_process_port 1234 scripts/train.py "
        "--resume_from_checkpoint latest"
    )
    assert resume_command([script, "--resume_from_checkpoint=x", "--output_dir", "a b"], {}) == (
        "python scripts/train.py --resume_from_checkpoint=latest --output_dir 'a b'"
    )
    assert resume_command(["vqrae-train", "--max_steps", "9"], {"ACCELERATE_USE_CPU": "1"}) == (
        "vqrae-train --max_steps 9 --resume_from_checkpoint latest"
    )


def test_a_resumed_run_takes_the_fsq_noise_of_the_uninterrupted_run(tmp_path):
    """FSQ noise is drawn from torch's generator, which checkpoints save. Resumed from checkpoint 1, a 3-step run
    with noise ends with the uninterrupted run's weights, bit for bit: starting the data iterator of a resume draws
    nothing from that generator (if it did, steps 2 and 3 would take other noise)."""
    output = tmp_path / "out"
    keep = ["--fsq_noise_probability", "0.5", "--save_steps", "1", "--save_total_limit", "3"]
    run(output, *keep, max_steps=3)
    uninterrupted = load_file(str(output / "model.safetensors"))
    run(output, *keep, "--resume_from_checkpoint", str(output / "checkpoints" / "checkpoint-1"), max_steps=3)
    resumed = load_file(str(output / "model.safetensors"))
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    # The noise reaches the weights: without it the same run ends elsewhere.
    run(tmp_path / "plain", "--fsq_noise_probability", "0", max_steps=3)
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert not all(torch.equal(plain[name], resumed[name]) for name in plain)
