"""A `--dataset_name` folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` is read with
`datasets.load_from_disk` by every tool (train, tokenize, evaluate), and a missing split names the tool's own
option."""

import json

import datasets
import pytest

from conftest import photo_folder, run, save_model, tiny_model
from vqrae.cli.evaluate import main as evaluate_main
from vqrae.cli.tokenize import main as tokenize_main
from vqrae.image_data import load_image_dataset


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`(model folder, a saved Dataset of 12 images, a saved DatasetDict with train (12) and validation (3))`."""
    root = tmp_path_factory.mktemp("saved")
    save_model(tiny_model(seed=2), root / "model")
    files = sorted(photo_folder(root / "photos", 15).iterdir())
    features = datasets.Features({"image": datasets.Image()})

    def part(paths):
        images = [{"bytes": path.read_bytes(), "path": path.name} for path in paths]
        return datasets.Dataset.from_dict({"image": images}, features=features)

    part(files[:12]).save_to_disk(str(root / "dataset"))
    datasets.DatasetDict({"train": part(files[:12]), "validation": part(files[12:])}).save_to_disk(str(root / "dict"))
    return root / "model", root / "dataset", root / "dict"


def test_the_loader_reads_saved_folders_and_their_splits(saved):
    _, dataset, dataset_dict = saved
    assert len(load_image_dataset("train", dataset_name=str(dataset))[0]) == 12
    assert len(load_image_dataset("train[:5]", dataset_name=str(dataset))[0]) == 5
    assert len(load_image_dataset("validation", dataset_name=str(dataset_dict))[0]) == 3
    stream, column = load_image_dataset("validation", dataset_name=str(dataset_dict), streaming=True)
    assert column == "image" and len(list(stream)) == 3
    with pytest.raises(ValueError, match=r"has no split 'test' \(splits: \['train', 'validation'\]\); .* --split\."):
        load_image_dataset("test", dataset_name=str(dataset_dict))


def test_vqrae_train_on_saved_folders(saved, tmp_path):
    _, dataset, dataset_dict = saved
    metrics = run(tmp_path / "dict", "--dataset_name", str(dataset_dict))
    assert metrics["dataset_split"] == "validation" and metrics["num_images"] == 3
    metrics = run(tmp_path / "one", "--dataset_name", str(dataset), "--validation_split_percentage", "20")
    assert metrics["held_out"]["of"] == 12  # one split saved: a share of it is held out


def test_vqrae_tokenize_and_evaluate_on_saved_folders(saved, tmp_path, capsys):
    model, dataset, dataset_dict = saved
    tokens = tmp_path / "tokens"
    argv = ["--model", str(model), "--dataset_name", str(dataset), "--output_dir", str(tokens), "--batch_size", "4"]
    assert tokenize_main(argv) == 0
    rows = datasets.load_dataset("parquet", data_dir=str(tokens / "data"), split="train")
    assert len(rows) == 12

    output = tmp_path / "eval"
    argv = ["--model", str(model), "--dataset_name", str(dataset_dict), "--output_dir", str(output), "--no_rfid"]
    assert evaluate_main(argv) == 0
    assert json.loads((output / "eval_results.json").read_text())["num_images"] == 3

    # A saved Dataset is one split, `train`: evaluate's default `validation` is refused, naming evaluate's option.
    argv = ["--model", str(model), "--dataset_name", str(dataset), "--output_dir", str(tmp_path / "e2"), "--no_rfid"]
    assert _error(capsys, evaluate_main, argv).endswith(
        "has no split 'validation' (splits: ['train']); choose one with --split."
    )
    # So is a dataset folder `datasets` reads with one split.
    argv[3] = str(model.parent / "photos")
    error = _error(capsys, evaluate_main, argv)
    assert "has no split 'validation'" in error and error.endswith("choose one with --split.")


def _error(capsys, main, argv) -> str:
    """The one error line `main(argv)` prints, with exit status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"vqrae-{main.__module__.rsplit('.', 1)[-1]}: error: ") and "--train_split" not in line
    return line
