"""Web-scale image sets as webdataset tar shards (`--dataset_name webdataset --data_files 'shards/{0..1}.tar'`),
streamed, through vqrae-tokenize, vqrae-evaluate and a short training run; brace expansion of `--data_files`."""

import io
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from conftest import run, save_model, tiny_model
from vqrae.cli.tokenize import parse_tokenize_args
from vqrae.errors import UsageError
from vqrae.image_data import load_image_dataset
from vqrae.image_decoding import expand_braces
from vqrae.tokenize import tokenize

PER_SHARD = 5


def _jpeg(rng) -> bytes:
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((48, 40), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two tar shards of `key.jpg` members (webdataset's naming), and the same JPEGs as files of a folder."""
    root = tmp_path_factory.mktemp("webdataset")
    (root / "shards").mkdir()
    (root / "folder").mkdir()
    rng = np.random.default_rng(0)
    for shard in range(2):
        with tarfile.open(root / "shards" / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key, data = f"sample_{shard}_{i:03d}", _jpeg(rng)
                (root / "folder" / f"{key}.jpg").write_bytes(data)
                member = tarfile.TarInfo(f"{key}.jpg")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return root


def _pattern(root) -> str:
    return str(root / "shards" / "shard-{00000..00001}.tar")


def test_expand_braces():
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain/*.tar") == ["plain/*.tar"]
    assert expand_braces("{x}/{8..10}") == ["{x}/8", "{x}/9", "{x}/10"]
    with pytest.raises(UsageError, match="backwards"):
        expand_braces("{3..1}.tar")


def test_data_files_load_every_shard_streamed(shards):
    dataset, column = load_image_dataset(
        "train", dataset_name="webdataset", data_files=[_pattern(shards)], streaming=True
    )
    assert column == "jpg" and dataset.n_shards == 2
    assert [row["__key__"] for row in dataset] == sorted(path.stem for path in (shards / "folder").iterdir())


def test_data_files_without_a_builder_are_refused(shards):
    with pytest.raises(UsageError, match="`data_files`.*needs a `dataset_name`"):
        load_image_dataset("train", data_files=[_pattern(shards)])
    with pytest.raises(UsageError, match="`data_files` of 'webdataset' could not be loaded"):
        load_image_dataset("train", dataset_name="webdataset", data_files=[str(shards / "missing-{0..1}.tar")])


def test_tokenize_webdataset_shards_streamed(shards, tmp_path):
    save_model(tiny_model(seed=3), tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--shard_size", "3", "--batch_size", "2"]
    tokenize(parse_tokenize_args([*common, "--dataset_name", "webdataset", "--data_files", _pattern(shards),
                                  "--streaming", "--output_dir", str(tmp_path / "tar")]))  # fmt: skip
    tokenize(
        parse_tokenize_args([*common, "--train_dir", str(shards / "folder"), "--output_dir", str(tmp_path / "f")])
    )
    tables = [
        datasets.load_dataset("parquet", data_dir=str(tmp_path / name / "data"), split="train").with_format("numpy")
        for name in ("tar", "f")
    ]
    assert len(tables[0]) == 2 * PER_SHARD
    assert list(tables[0]["index"]) == list(range(2 * PER_SHARD))
    np.testing.assert_array_equal(tables[0]["indices"], tables[1]["indices"])  # the same JPEGs, the same tokens


def test_training_streams_webdataset_shards(shards, tmp_path):
    metrics = run(
        tmp_path / "run",
        *["--dataset_name", "webdataset", "--data_files", _pattern(shards), "--streaming"],
        *["--validation_split_percentage", "30", "--shuffle_buffer_size", "4"],
        max_steps=2,
    )
    assert metrics["step"] == 2 and metrics["num_images"] >= 1
