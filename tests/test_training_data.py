"""Datasets as they come: a folder or a dataset without a validation split has a share held out; sample caps;
validation images that cannot be read fail before training; a warm-up longer than the run is scaled down."""

import json
import logging

import datasets
import pytest
import yaml

from conftest import photo_folder, records, run
from vqrae.image_data import HOLD_OUT_SEED, hold_out, load_image_dataset


def test_hold_out_is_deterministic_disjoint_and_seed_independent(tmp_path):
    dataset, _ = load_image_dataset("train", train_dir=str(photo_folder(tmp_path / "photos", 40)))
    train, held, info = hold_out(dataset, 5)
    assert info == {"percentage": 5.0, "num_examples": 2, "of": 40}
    ids = lambda part: [row["image"]["path"] for row in part]  # noqa: E731
    assert len(set(ids(train)) | set(ids(held))) == 40 and not set(ids(train)) & set(ids(held))
    assert ids(hold_out(dataset, 5)[1]) == ids(held)  # the same images every time (not tied to --seed)
    assert ids(held) != ids(dataset)[:2]  # spread over the folder, not its first files (often one class)
    streamed = dataset.to_iterable_dataset()
    kept, held_stream, info = hold_out(streamed, 25)
    kept_ids, held_ids = ids(kept), ids(held_stream)
    assert info["num_examples"] is None and sorted(kept_ids + held_ids) == sorted(ids(dataset))
    assert 3 <= len(held_ids) <= 17 and held_ids == ids(hold_out(streamed, 25)[1])
    assert isinstance(HOLD_OUT_SEED, int)


def test_train_dir_without_validation_folder_holds_out_a_share(tmp_path, caplog):
    folder = photo_folder(tmp_path / "photos", 40)
    with caplog.at_level(logging.INFO, logger="vqrae.training.trainer"):
        metrics = run(tmp_path / "out", "--train_dir", str(folder), "--validation_split_percentage", "10")
    assert metrics["held_out"] == {"percentage": 10.0, "num_examples": 4, "of": 40}
    assert metrics["num_images"] == 4 and metrics["dataset_name"] == str(folder)
    assert "holding out 10% of the 40 training images for validation (4 image(s))" in caplog.text
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["held_out"] == metrics["held_out"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "10% held out, never trained on" in card
    options = yaml.safe_load((tmp_path / "out" / "training_config.yaml").read_text())
    assert options["validation_split_percentage"] == 10


def test_dataset_without_validation_split_holds_out_and_caps_samples(tmp_path):
    # A dataset folder `datasets` reads as one `train` split (as most Hub image datasets are).
    folder = photo_folder(tmp_path / "dataset", 30)
    metrics = run(
        tmp_path / "out", "--dataset_name", str(folder), "--max_train_samples", "5", "--max_eval_samples", "1"
    )
    assert metrics["held_out"] == {"percentage": 5.0, "num_examples": 2, "of": 30}
    assert metrics["num_images"] == 1  # --max_eval_samples of the held-out images
    with pytest.raises(ValueError, match="no 'validation' split, and --validation_split_percentage is 0"):
        run(tmp_path / "zero", "--dataset_name", str(folder), "--validation_split_percentage", "0")


def test_max_train_samples_caps_the_training_images(tmp_path):
    from vqrae.training.checkpointing import read_checkpoint_record

    folder = photo_folder(tmp_path / "photos", 20)
    validation = photo_folder(tmp_path / "validation", 2, seed=1)
    run(tmp_path / "out", "--train_dir", str(folder), "--validation_dir", str(validation), "--max_train_samples", "3")
    record = read_checkpoint_record(str(tmp_path / "out" / "checkpoints" / "checkpoint-2"))
    assert record["dataset"]["num_examples"] == 3 and record["dataset"]["max_train_samples"] == 3


def test_unreadable_validation_fails_before_training(tmp_path):
    validation = tmp_path / "validation"
    validation.mkdir()
    (validation / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (validation / "also.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    folders = ["--train_dir", str(photo_folder(tmp_path / "train", 4)), "--validation_dir", str(validation)]
    with pytest.raises(ValueError, match="None of the validation images .* can be read"):
        run(tmp_path / "out", *folders, max_steps=50)
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_warmup_longer_than_the_run_is_scaled_down(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vqrae.training.trainer"):
        run(tmp_path / "out", "--warmup_steps", "200", "--lr_scheduler_type", "linear", max_steps=20)
    assert "--warmup_steps 200 is not below --max_steps 20" in caplog.text and "warming up for 2 steps" in caplog.text
    text = (tmp_path / "out" / "training_config.yaml").read_text()
    assert yaml.safe_load(text)["warmup_steps"] == 200  # as given, with the value the run used in a note
    assert "# --warmup_steps 200 is not below --max_steps 20: the run warms up for 2 steps, derived from" in text
    rates = [r["learning_rate"] for r in records(tmp_path / "out")]
    assert rates[1] == pytest.approx(2e-3)  # the peak, reached after the 2 warm-up steps
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(0.0)


def test_a_dataset_name_that_is_not_there_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="`dataset_name` 'org/no-such-images' is not a folder here"):
        run(tmp_path / "out", "--dataset_name", "org/no-such-images")
    assert datasets.config.HF_DATASETS_OFFLINE
