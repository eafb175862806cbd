"""What the data loading says when the data is not what it takes: a column that holds no images, a dataset with no
image column, and unreadable images counted once each."""

import datasets
import pytest

from conftest import photo_folder, records, run, tiny_model
from vqrae.image_data import load_image_dataset, resolve_image_column
from vqrae.training.data import TrainingBatches


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A saved dataset with an `image` column, a `caption` (text) and a `label` (int), and one without images."""
    root = tmp_path_factory.mktemp("captioned")
    files = sorted(photo_folder(root / "photos", 6).iterdir())
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    rows = {
        "image": [{"bytes": path.read_bytes(), "path": None} for path in files],
        "caption": [f"a photo, number {i}" for i in range(6)],
        "label": list(range(6)),
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "with_images"))
    datasets.Dataset.from_dict({"caption": rows["caption"], "label": rows["label"]}).save_to_disk(str(root / "text"))
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_a_column_without_images_is_refused_naming_its_type_and_the_image_columns(captioned, streaming):
    folder = str(captioned / "with_images")
    for column, kind in (
        ("caption", r"Value\('string'\) \(e\.g\. 'a photo, number 0', not a file\)"),
        ("label", "int64"),
    ):
        match = rf"`image_column` '{column}' is not an image column: it holds .*{kind}.*"
        match += r"the columns that hold images: \['image'\]"
        with pytest.raises(ValueError, match=match):
            load_image_dataset("train", dataset_name=folder, image_column=column, streaming=streaming)


def test_the_trainer_refuses_a_text_image_column_before_training(captioned, tmp_path):
    with pytest.raises(ValueError, match="`image_column` 'caption' is not an image column"):
        run(tmp_path / "out", "--dataset_name", str(captioned / "with_images"), "--image_column", "caption")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_without_an_image_column_names_its_columns(captioned, streaming):
    match = r"the dataset has the columns \['caption', 'label'\], of which Image columns: \[\]; pass --image_column"
    with pytest.raises(ValueError, match=match):
        load_image_dataset("train", dataset_name=str(captioned / "text"), streaming=streaming)


def _folder_with_two_broken_files(folder):
    photo_folder(folder, 4)
    (folder / "broken_a.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "broken_b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return folder


def test_an_unreadable_image_is_counted_once_however_often_it_is_read(tmp_path):
    dataset, column = load_image_dataset("train", train_dir=str(_folder_with_two_broken_files(tmp_path / "photos")))
    processor = tiny_model().get_image_processor()
    batches = TrainingBatches(dataset, column, processor, batch_size=6, seed=0, cache_images=False)
    names = [name for k in range(5) for name in batches[k]["unreadable"]]  # 5 epochs, each read anew
    assert batches.counter.unreadable == 2 and sorted(names) == sorted(batches.counter.failed)
    assert {name.rsplit("/", 1)[-1] for name in names} == {"broken_a.png", "broken_b.jpg"}


def test_the_trainer_counts_each_unreadable_image_once_over_workers(tmp_path):
    folders = ["--train_dir", str(_folder_with_two_broken_files(tmp_path / "photos"))]
    folders += ["--validation_dir", str(photo_folder(tmp_path / "validation", 2, seed=1))]
    run(tmp_path / "out", *folders, "--dataloader_num_workers", "2", max_steps=6)
    (data,) = records(tmp_path / "out", "data")
    assert data["unreadable_train"] == 2 and data["unreadable_validation"] == 0


def test_a_stream_of_unknown_features_without_an_image_column_names_the_columns_it_has():
    def rows():
        yield from ({"caption": f"photo {i}", "label": i} for i in range(3))

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.features is None
    with pytest.raises(ValueError, match=r"the dataset has the columns \['caption', 'label'\]"):
        resolve_image_column(stream, None)
