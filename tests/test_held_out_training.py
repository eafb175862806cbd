"""The held-out share stays out of training: what the trainer's data loading gives the training stream never contains
a held-out example, for an image folder, a multi-shard stream in one process, and the same stream over two processes
under `accelerate launch`."""

import json
import os
import subprocess
import sys

import datasets
import pytest
from accelerate import Accelerator

from conftest import TINY_RUN_ARGS, TINY_SIZE_ARGS, photo_folder, tiny_model
from test_training_processes import _free_port
from vqrae.cli.train import parse_train_args
from vqrae.image_data import example_identities, example_identity, hold_out, id_column
from vqrae.training.data import StreamingTrainingBatches, load_training_data
from vqrae.training.run_files import HELD_OUT_FILE


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory):
    """A dataset folder of 4 Parquet files of 12 images each (bytes, no file names, no id column): a 4-shard stream."""
    root = tmp_path_factory.mktemp("shards")
    photos = photo_folder(root / "photos", 48)
    folder = root / "dataset"
    (folder / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image()})
    files = sorted(photos.iterdir())
    for shard in range(4):
        images = [{"bytes": path.read_bytes(), "path": None} for path in files[shard * 12 : (shard + 1) * 12]]
        part = datasets.Dataset.from_dict({"image": images}, features=features)
        part.to_parquet(str(folder / "data" / f"train-{shard:05d}-of-00004.parquet"))
    return folder


def _stream_ids(stream) -> list[str]:
    """The identities of one pass over `stream` (what a training pass reads), undecoded."""
    return [example_identity(row, "image", id_name=id_column(stream)) for row in stream]


def _load(output_dir, *extra):
    output_dir.mkdir(parents=True, exist_ok=True)
    model_args, data_args, args = parse_train_args(
        [*TINY_SIZE_ARGS, *TINY_RUN_ARGS, "--output_dir", str(output_dir), *extra]
    )
    processor = tiny_model().get_image_processor()
    return load_training_data(data_args, args, processor, 32, Accelerator())


def test_the_training_stream_of_a_folder_leaves_the_held_out_images_out(tmp_path):
    folder = photo_folder(tmp_path / "photos", 30)
    data = _load(tmp_path / "out", "--train_dir", str(folder), "--validation_split_percentage", "20")
    trained = example_identities(data.batches.dataset, data.batches.image_column, root=str(folder))
    held = (tmp_path / "out" / HELD_OUT_FILE).read_text().splitlines()
    assert held and not set(trained) & set(held)
    assert sorted(trained + held) == sorted(path.name for path in folder.iterdir())


def test_a_multi_shard_stream_leaves_the_held_out_images_out_in_one_process(tmp_path, parquet_shards):
    source = ["--dataset_name", str(parquet_shards), "--streaming", "--validation_split_percentage", "25"]
    data = _load(tmp_path / "out", *source, "--shuffle_buffer_size", "8", "--max_eval_samples", "100")
    assert data.batches.dataset.n_shards == 4
    trained = _stream_ids(data.batches.dataset)
    held = (tmp_path / "out" / HELD_OUT_FILE).read_text().splitlines()
    assert held and not set(trained) & set(held) and len(set(trained) | set(held)) == 48

    # The function that builds each process's stream, for two processes: shards and shuffling keep the sides apart.
    stream = datasets.load_dataset(str(parquet_shards), split="train", streaming=True)
    stream = stream.cast_column("image", datasets.Image(decode=False))
    kept, held_stream, _ = hold_out(stream, 25, "image")
    assert sorted(_stream_ids(held_stream)) == sorted(held)
    processor = tiny_model().get_image_processor()
    ranks = [
        StreamingTrainingBatches(
            kept, "image", processor, batch_size=2, seed=0, process_index=r, num_processes=2, shuffle_buffer_size=8
        )
        for r in range(2)
    ]
    per_rank = [_stream_ids(rank.dataset) for rank in ranks]
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(trained)


DUMP_SCRIPT = """
import json, os, sys
from accelerate import Accelerator
from vqrae.image_data import example_identity, id_column
from vqrae.cli.train import parse_train_args
from vqrae.training.data import load_training_data
from vqrae.training.trainer import build_model

model_args, data_args, args = parse_train_args(sys.argv[1:])
accelerator = Accelerator()
model = build_model(model_args)
data = load_training_data(data_args, args, model.get_image_processor(), 32, accelerator)
stream = data.batches.dataset
ids = [example_identity(row, data.batches.image_column, id_name=id_column(stream)) for row in stream]
with open(os.path.join(args.output_dir, f"trained-{accelerator.process_index}.json"), "w") as file:
    json.dump(ids, file)
"""


def test_a_multi_shard_stream_leaves_the_held_out_images_out_over_two_processes(tmp_path, parquet_shards):
    script = tmp_path / "dump_training_ids.py"
    script.write_text(DUMP_SCRIPT)
    output = tmp_path / "out"
    output.mkdir()
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    argv = [*TINY_SIZE_ARGS, *TINY_RUN_ARGS, "--output_dir", str(output), "--dataset_name", str(parquet_shards)]
    argv += [
        "--streaming",
        "--validation_split_percentage",
        "25",
        "--shuffle_buffer_size",
        "8",
        "--max_eval_samples",
        "100",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, str(script), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = [json.loads((output / f"trained-{rank}.json").read_text()) for rank in range(2)]
    held = (output / HELD_OUT_FILE).read_text().splitlines()
    assert held and trained[0] and trained[1]
    assert not set(trained[0]) & set(held) and not set(trained[1]) & set(held)
    assert not set(trained[0]) & set(trained[1]) and len(set(trained[0]) | set(trained[1]) | set(held)) == 48
