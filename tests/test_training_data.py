"""Datasets as they come: a folder or a dataset without a validation split has a share held out; sample caps;
validation images that cannot be read fail before training; a warm-up longer than the run is scaled down."""

import json
import logging
import os

import datasets
import pytest
import yaml

from conftest import photo_folder, records, run
from vqrae.image_data import _hold_out_fraction, example_identities, hold_out, load_image_dataset
from vqrae.training.run_files import HELD_OUT_FILE


def _ids(part):
    """The names of the examples of `part`, relative to their folder."""
    (folder,) = {os.path.dirname(row["image"]["path"]) for row in part}
    return example_identities(part, "image", root=folder)


def test_no_image_changes_side_when_the_folder_grows_or_shrinks(tmp_path):
    folder = photo_folder(tmp_path / "photos", 40)
    dataset, _ = load_image_dataset("train", train_dir=str(folder))
    train, held, info = hold_out(dataset, 20, "image", root=str(folder))
    assert info == {"percentage": 20.0, "num_examples": len(held), "of": 40} and 2 <= len(held) <= 16
    assert sorted(_ids(train) + _ids(held)) == [f"photo_{i:03d}.png" for i in range(40)]  # relative names
    assert _ids(hold_out(dataset, 20, "image", root=str(folder))[1]) == _ids(held)  # the same every time
    assert _ids(held) != _ids(dataset)[: len(held)]  # spread over the folder, not its first files (often one class)

    photo_folder(folder, 13, seed=1, start=40)  # 13 more images
    grown, _ = load_image_dataset("train", train_dir=str(folder))
    grown_train, grown_held, _ = hold_out(grown, 20, "image", root=str(folder))
    old = set(_ids(dataset))
    assert set(_ids(grown_held)) & old == set(_ids(held)) and set(_ids(grown_train)) & old == set(_ids(train))

    (folder / _ids(train)[0]).unlink()  # and one training image fewer
    shrunk, _ = load_image_dataset("train", train_dir=str(folder))
    assert _ids(hold_out(shrunk, 20, "image", root=str(folder))[1]) == _ids(grown_held)

    # A stream puts every example on the side a map-style split puts it.
    kept, held_stream, stream_info = hold_out(grown.to_iterable_dataset(num_shards=4), 20, "image", root=str(folder))
    assert stream_info["num_examples"] is None
    assert sorted(_ids(held_stream)) == sorted(_ids(grown_held)) and sorted(_ids(kept)) == sorted(_ids(grown_train))


def test_a_small_folder_keeps_one_held_out_image_and_a_single_image_is_refused(tmp_path):
    folder = photo_folder(tmp_path / "photos", 3)
    dataset, _ = load_image_dataset("train", train_dir=str(folder))
    train, held, info = hold_out(dataset, 1, "image", root=str(folder))  # 1% of 3: none falls under the threshold
    assert info["num_examples"] == 1 and len(train) == 2
    fractions = {name: _hold_out_fraction(name) for name in _ids(dataset)}
    assert _ids(held) == [min(fractions, key=fractions.get)]  # the lowest hash, the same every time
    one, _ = load_image_dataset("train", train_dir=str(photo_folder(tmp_path / "one", 1)))
    with pytest.raises(ValueError, match="Holding out 5% of 1 training image.* leaves none to train on"):
        hold_out(one, 5, "image")


def test_the_held_out_set_is_the_same_whatever_the_seed_and_written_to_the_run_folder(tmp_path):
    folder = photo_folder(tmp_path / "photos", 30)
    held = {}
    for seed in (1, 2):
        output = tmp_path / f"seed{seed}"
        run(output, "--train_dir", str(folder), "--validation_split_percentage", "20", "--seed", str(seed))
        held[seed] = (output / HELD_OUT_FILE).read_text().splitlines()
    assert held[1] == held[2] and held[1] and all(name.startswith("photo_") for name in held[1])
    assert (tmp_path / "seed1" / "training_config.yaml").read_text() != (
        tmp_path / "seed2" / "training_config.yaml"
    ).read_text()  # the seeds did differ


def test_train_dir_without_validation_folder_holds_out_a_share(tmp_path, caplog):
    folder = photo_folder(tmp_path / "photos", 40)
    with caplog.at_level(logging.INFO, logger="vqrae.training.data"):
        metrics = run(tmp_path / "out", "--train_dir", str(folder), "--validation_split_percentage", "10")
    count = metrics["held_out"]["num_examples"]
    assert metrics["held_out"] == {"percentage": 10.0, "num_examples": count, "of": 40} and 1 <= count <= 10
    assert metrics["num_images"] == count and metrics["dataset_name"] == str(folder)
    assert f"holding out 10% of the 40 training images for validation ({count} image(s))" in caplog.text
    assert len((tmp_path / "out" / HELD_OUT_FILE).read_text().splitlines()) == count
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
    assert metrics["held_out"]["percentage"] == 5.0 and metrics["held_out"]["of"] == 30
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
