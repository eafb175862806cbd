"""vqrae-tokenize: the token dataset, resuming after SIGKILL, two processes, streaming, Hub ids; decoding rows."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import vqrae.token_dataset as token_dataset
from conftest import save_model, tiny_model
from hub_cache import write_hub_cache
from vqrae import to_pil_images
from vqrae.cli.tokenize import parse_tokenize_args
from vqrae.errors import UsageError
from vqrae.loading import load_model_and_processor
from vqrae.token_dataset import decode_token_rows, load_token_dataset, token_rows_to_indices
from vqrae.token_encoding import weights_digest
from vqrae.tokenize import MANIFEST_FILE, tokenize

NUM_READABLE = 23
NUM_IMAGES = NUM_READABLE + 2  # one unreadable file inside a shard, one alone in the last shard
SHARD_SIZE = 4  # -> 7 shards, the last of them without a readable image
BROKEN = ["photo_05b_broken.png", "photo_99_broken.png"]  # source indices 6 and 24
COMMON = ["--shard_size", str(SHARD_SIZE), "--batch_size", "3"]


def main(argv: list[str]) -> dict:
    return tokenize(parse_tokenize_args(argv))


def _run(tmp_dir: Path, model: str, images: Path, name: str, *extra: str) -> Path:
    output = tmp_dir / name
    main(["--model", model, "--train_dir", str(images), "--output_dir", str(output), *COMMON, *extra])
    return output


def _table(folder: Path) -> dict:
    dataset = datasets.load_dataset("parquet", data_dir=str(folder / "data"), split="train")
    return {
        "index": dataset["index"],
        "id": dataset["id"],
        "indices": np.stack([np.asarray(grid) for grid in dataset.with_format("numpy")["indices"]]),
    }


def _assert_same_dataset(left: dict, right: dict) -> None:
    assert left["index"] == right["index"]
    assert left["id"] == right["id"]
    np.testing.assert_array_equal(left["indices"], right["indices"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize")
    model = tiny_model(seed=3)
    save_model(model, root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM_READABLE):
        height, width = 24 + 3 * (i % 7), 40 - 2 * (i % 5)  # various sizes and aspect ratios
        mode = "L" if i % 6 == 5 else "RGB"  # some grayscale images, converted to RGB
        array = rng.integers(0, 256, (height, width) if mode == "L" else (height, width, 3), dtype=np.uint8)
        Image.fromarray(array, mode=mode).save(images / f"photo_{i:02d}.png")
    for name in BROKEN:
        (images / name).write_bytes(b"this is not a PNG file")
    reference = _run(root, str(root / "model"), images, "reference")
    return root, str(root / "model"), images, reference


def test_rows_hold_the_tokens_of_each_image(setup):
    root, model_dir, images, reference = setup
    manifest = json.loads((reference / MANIFEST_FILE).read_text())
    assert manifest["num_images"] == NUM_IMAGES and manifest["num_rows"] == NUM_READABLE
    assert manifest["num_shards"] == 7 and manifest["skipped"] == BROKEN
    # The last shard holds no readable image: a hidden marker records it (datasets cannot read an empty Parquet).
    data_files = sorted(p.name for p in (reference / "data").iterdir())
    assert data_files == [".train-00006.parquet.empty.json"] + [f"train-{k:05d}.parquet" for k in range(6)]

    dataset = load_token_dataset(reference)
    assert dataset.features["indices"] == datasets.Array2D(shape=(4, 4), dtype="int32")
    assert dataset["id"] == [f"photo_{i:02d}.png" for i in range(NUM_READABLE)]
    assert dataset["index"] == [i if i <= 5 else i + 1 for i in range(NUM_READABLE)]

    # The tokens are the README quickstart's: the model's saved image processor alone (centre square), encoded.
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    for row in (dataset[0], dataset[6], dataset[17]):
        image = Image.open(images / row["id"]).convert("RGB")
        assert image.width != image.height
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            expected = model.encode(pixel_values).indices[0]
        np.testing.assert_array_equal(np.asarray(row["indices"]), expected.numpy())


def test_a_non_square_photo_is_prepared_alike_by_the_quickstart_tokenize_and_evaluate(tmp_path):
    """One preprocessing: `AutoImageProcessor` of the saved model (the quickstart), `vqrae-tokenize` and
    `vqrae-evaluate`'s validation images cut the same centred square of a 451 x 300 photo, pixel for pixel."""
    from skimage import data
    from transformers import AutoImageProcessor

    from vqrae.image_data import load_image_dataset, load_validation_images
    from vqrae.token_encoding import ImagePreparation

    photo = Image.fromarray(data.chelsea())
    (tmp_path / "photos").mkdir()
    photo.save(tmp_path / "photos" / "chelsea.png")
    save_model(tiny_model(seed=3, preprocessor_config={"resample": 2}), tmp_path / "model")
    output = _run(tmp_path, str(tmp_path / "model"), tmp_path / "photos", "tokens")

    model, processor = load_model_and_processor(str(tmp_path / "model"))
    quickstart = AutoImageProcessor.from_pretrained(tmp_path / "model")(images=photo, return_tensors="pt")
    tokenized = ImagePreparation(processor, "image", [], "center", None)({"image": photo}, 0)[2]
    torch.testing.assert_close(tokenized, quickstart.pixel_values[0], rtol=0, atol=0)
    with torch.inference_mode():
        expected = model.encode(quickstart.pixel_values).indices[0].numpy()
    np.testing.assert_array_equal(np.asarray(load_token_dataset(output)[0]["indices"]), expected)
    dataset, column = load_image_dataset("train", train_dir=str(tmp_path / "photos"))
    validation = load_validation_images(dataset, column, 32, dataset_name="photos", dataset_split="train", resample=2)
    evaluated = processor(images=validation.images, return_tensors="pt").pixel_values
    torch.testing.assert_close(evaluated, quickstart.pixel_values, rtol=0, atol=0)
    # Squeezing the whole photo instead would give other pixels: the test tells the two apart.
    squeezed = processor(images=photo.resize((32, 32), 2), return_tensors="pt").pixel_values
    assert not torch.equal(squeezed, quickstart.pixel_values)
    # `--crop none` squeezes the whole photo, though the processor itself would cut the square.
    torch.testing.assert_close(
        ImagePreparation(processor, "image", [], "none", None)({"image": photo}, 0)[2], squeezed[0]
    )


def test_sigkill_halfway_then_resume_equals_one_run(setup):
    root, model_dir, images, reference = setup
    output = root / "killed"
    # The child dies by SIGKILL in the middle of writing its third shard, after the temporary file exists.
    launcher = (
        "import os, signal, sys\n"
        "import vqrae.tokenize as job\n"
        "from vqrae.cli.tokenize import main\n"
        "real_write, written = job.write_shard, []\n"
        "def write_then_die(path, *args):\n"
        "    if len(written) == 2:\n"
        "        path.with_name(f'.{path.name}.tmp-{os.getpid()}').write_bytes(b'PAR1 half a shard')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real_write(path, *args)\n"
        "    written.append(path)\n"
        "job.write_shard = write_then_die\n"
        "main(sys.argv[1:])\n"
    )
    argv = ["--model", model_dir, "--train_dir", str(images), "--output_dir", str(output), *COMMON]
    killed = subprocess.run([sys.executable, "-c", launcher, *argv], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    data = output / "data"
    assert sorted(p.name for p in data.glob("*.parquet")) == ["train-00000.parquet", "train-00001.parquet"]
    assert len(list(data.glob(".*.tmp-*"))) == 1
    assert not (output / MANIFEST_FILE).exists()
    with pytest.raises(ValueError, match="not a finished token dataset"):
        load_token_dataset(output)

    summary = main(argv)
    assert summary["images"] == NUM_IMAGES - 2 * SHARD_SIZE  # the two complete shards were not redone
    assert not list(data.glob(".*.tmp-*"))
    resumed = _table(output)
    assert len(set(resumed["id"])) == len(resumed["id"]) == NUM_READABLE
    _assert_same_dataset(resumed, _table(reference))

    assert main(argv)["images"] == 0  # complete: a third run does nothing


def test_resume_with_other_arguments_is_refused(setup):
    root, model_dir, images, reference = setup
    argv = ["--model", model_dir, "--train_dir", str(images), "--output_dir", str(reference)]
    with pytest.raises(ValueError, match="shard_size: 4 -> 5"):
        main([*argv, "--shard_size", "5"])


def test_two_processes_make_the_same_dataset(setup):
    root, model_dir, images, reference = setup
    output = root / "two_processes"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vqrae.cli.tokenize",
        "--model", model_dir, "--train_dir", str(images), "--output_dir", str(output), *COMMON,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 process(es)" in result.stderr
    _assert_same_dataset(_table(output), _table(reference))
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert manifest["num_rows"] == NUM_READABLE and manifest["skipped"] == BROKEN


def test_streaming_source_makes_the_same_dataset(setup):
    root, model_dir, images, reference = setup
    _assert_same_dataset(_table(_run(root, model_dir, images, "streamed", "--streaming")), _table(reference))


def test_model_from_a_hub_id_offline(setup):
    root, model_dir, images, reference = setup
    write_hub_cache(model_dir, "org/vqrae-tiny")  # into the session's HF_HUB_CACHE; HF_HUB_OFFLINE=1
    output = _run(root, "org/vqrae-tiny", images, "from_hub", "--save_features", "--max_images", "6")
    dataset = load_token_dataset(output)
    assert len(dataset) == 6
    np.testing.assert_array_equal(np.stack(dataset.with_format("numpy")["indices"]), _table(reference)["indices"][:6])
    assert dataset.features["features"] == datasets.Array2D(shape=(16, 32), dtype="float16")


def test_decoding_rows_gives_the_images_of_decode_from_indices(setup):
    root, model_dir, images, reference = setup
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    dataset = load_token_dataset(reference)
    batch = dataset[3:8]
    with torch.inference_mode():
        tokens = torch.as_tensor(np.stack([np.asarray(grid) for grid in batch["indices"]])).long()
        expected = to_pil_images(model.decode_from_indices(tokens).reconstruction, model)
    decoded = decode_token_rows(model, batch, batch_size=2)
    assert len(decoded) == 5 and decoded[0].size == (32, 32) and decoded[0].mode == "RGB"
    for got, want in zip(decoded, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # A single row, a Dataset and a list of rows give the same images.
    np.testing.assert_array_equal(np.asarray(decode_token_rows(model, dataset[3])[0]), np.asarray(expected[0]))
    from_dataset = decode_token_rows(model, dataset.select(range(3, 5)))
    from_list = decode_token_rows(model, [dataset[3], dataset[4]])
    for got, want in zip(from_dataset + from_list, expected[:2] * 2):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_an_interrupted_shard_write_leaves_no_shard(setup, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def write_half_then_fail(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    features = datasets.Features({"index": datasets.Value("int64")})
    target = tmp_path / "train-00000.parquet"
    with pytest.raises(KeyboardInterrupt):
        token_dataset.write_shard(target, {"index": [0, 1]}, features, {"shard": 0})
    assert not target.exists() and not token_dataset.shard_is_complete(tmp_path, "train", 0)
    assert list(tmp_path.iterdir()) == []  # the half-written temporary file is removed too (a SIGKILL's is removed
    # by the next run: test_sigkill_halfway_then_resume_equals_one_run)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ({"tokens": [[1, 2], [3, 4]]}, "must hold an `indices` column"),
        (np.zeros((2, 2), dtype=np.float32), "integer token grids"),
        ([1, 2, 3], "integer token grids"),
    ],
)
def test_bad_token_rows_are_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        token_rows_to_indices(rows)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ([], "exactly one source of images"),
        (["--train_dir", "/nonexistent/folder"], "must be an existing folder"),
        (["--dataset_name", "x", "--shard_size", "0"], "`--shard_size` must be an integer >= 1"),
        (["--dataset_name", "x", "--batch_size", "0"], "`--batch_size` must be an integer >= 1"),
        (["--dataset_name", "x", "--max_images", "0"], "`--max_images` must be an integer >= 1"),
        (["--dataset_name", "x", "--keep_columns", "indices"], "may not name the output's own columns"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        main(["--model", "unused", "--output_dir", str(tmp_path / "out"), *extra])


# -- what a rerun checks: the source and the precision ---------------------------------------------------------------


def _small_folder(images: Path, folder: Path, count: int = 3) -> Path:
    folder.mkdir()
    for i in range(count):
        (folder / f"photo_{i:02d}.png").write_bytes((images / f"photo_{i:02d}.png").read_bytes())
    return folder


def test_a_rerun_after_images_were_added_is_refused(setup, tmp_path):
    root, model_dir, images, reference = setup
    folder = _small_folder(images, tmp_path / "photos")
    output = tmp_path / "tokens"
    argv = ["--model", model_dir, "--train_dir", str(folder), "--output_dir", str(output), "--shard_size", "2"]
    main(argv)
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert manifest["source"]["kind"] == "image_folder" and manifest["source"]["num_images"] == 3
    assert json.loads((output / "tokenize_config.json").read_text())["source"] == manifest["source"]
    assert main(argv)["images"] == 0  # unchanged: complete, nothing to do

    (folder / "photo_03.png").write_bytes((images / "photo_03.png").read_bytes())
    command = [sys.executable, "-m", "vqrae.cli.tokenize", *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"vqrae-tokenize: error: The source changed since the tokens in {output} were made (3 -> 4 images); pass "
        "--overwrite_output_dir to tokenize it again."
    ]

    # A partial output (the last shard and the manifest gone) is refused as well, before any shard is added.
    (output / MANIFEST_FILE).unlink()
    (output / "data" / "train-00001.parquet").unlink()
    with pytest.raises(UsageError, match=r"\(3 -> 4 images\)"):
        main(argv)
    assert not (output / "data" / "train-00001.parquet").exists()

    # Same number of files, one of them replaced: refused too.
    (folder / "photo_03.png").unlink()
    (folder / "photo_00.png").write_bytes((images / "photo_05.png").read_bytes())
    with pytest.raises(UsageError, match=r"\(3 images, but their names, sizes or modification times changed\)"):
        main(argv)
    assert main([*argv, "--overwrite_output_dir"])["images"] == 3


def _one_line_refusal(argv: list[str]) -> str:
    """Run `vqrae-tokenize` as a user does; it must refuse with exit status 2 and one line. Returns the line."""
    result = subprocess.run(
        [sys.executable, "-m", "vqrae.cli.tokenize", *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_rerun_with_other_weights_is_refused(setup, tmp_path):
    root, model_dir, images, reference = setup
    model = tiny_model(seed=3)
    save_model(model, tmp_path / "model")
    folder = _small_folder(images, tmp_path / "photos")
    output = tmp_path / "tokens"
    argv = ["--model", str(tmp_path / "model"), "--train_dir", str(folder), "--output_dir", str(output)]
    argv += ["--shard_size", "2"]
    main(argv)
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    # The digest of the state dict: the same for the saved folder and the model object it was saved from.
    assert manifest["weights_sha256"] == weights_digest(model) != weights_digest(tiny_model(seed=4))
    assert json.loads((output / "tokenize_config.json").read_text())["weights_sha256"] == manifest["weights_sha256"]

    perturbed = tiny_model(seed=3)
    with torch.no_grad():
        perturbed.decoder.in_proj.weight[0, 0] += 1e-3  # one number of one tensor
    save_model(perturbed, tmp_path / "model")
    line = _one_line_refusal(argv)
    assert line.startswith(
        f"vqrae-tokenize: error: The weights of `--model` '{tmp_path / 'model'}' changed since the "
    )
    assert f"(weights_sha256 {manifest['weights_sha256'][:16]}... -> {weights_digest(perturbed)[:16]}...)" in line

    # A killed job (the manifest and its last shard gone) is not finished with the other weights either.
    (output / MANIFEST_FILE).unlink()
    (output / "data" / "train-00001.parquet").unlink()
    with pytest.raises(UsageError, match=r"The weights of `--model` .* changed since the tokens in "):
        main(argv)
    assert not (output / "data" / "train-00001.parquet").exists() and not (output / MANIFEST_FILE).exists()

    save_model(model, tmp_path / "model")  # the weights that made the tokens, in a new file: resumes
    assert main(argv)["images"] == 1
    assert main(argv)["images"] == 0  # and then is complete


def test_a_local_dataset_folder_gives_relative_ids_and_a_changed_one_is_refused(setup, tmp_path):
    root, model_dir, images, reference = setup
    folder = _small_folder(images, tmp_path / "photos")
    output = tmp_path / "tokens"
    argv = ["--model", model_dir, "--dataset_name", str(folder), "--output_dir", str(output), "--shard_size", "2"]
    main(argv)
    # The ids are the files' paths inside the folder: no absolute path of this machine goes out with the tokens.
    expected = [f"photo_{i:02d}.png" for i in range(3)]
    ids = load_token_dataset(output)["id"]
    assert ids == expected and not any(Path(i).is_absolute() or tmp_path.name in i for i in ids)
    streamed = tmp_path / "streamed"
    main(["--model", model_dir, "--dataset_name", str(folder), "--output_dir", str(streamed), "--streaming"])
    assert load_token_dataset(streamed)["id"] == expected

    # A map-style source is identified by its `datasets` fingerprint: the same number of images, one of them
    # replaced, is another dataset.
    saved = json.loads((output / MANIFEST_FILE).read_text())["source"]
    assert saved["kind"] == "dataset" and saved["num_rows"] == 3
    assert main(argv)["images"] == 0  # unchanged: complete
    (folder / "photo_01.png").write_bytes((images / "photo_05.png").read_bytes())
    with pytest.raises(UsageError, match=rf"\(3 rows, fingerprint {saved.get('fingerprint')} -> \w+\)"):
        main(argv)


@pytest.mark.parametrize("key", ["source", "precision", "weights_sha256"])
def test_a_config_without_what_the_tokens_were_made_from_is_refused(setup, tmp_path, key):
    """No vqrae-tokenize ever wrote a config without these: such a folder is not resumed on trust."""
    root, model_dir, images, reference = setup
    output = tmp_path / "foreign"
    shutil.copytree(reference, output)
    saved = json.loads((output / "tokenize_config.json").read_text())
    saved.pop(key)
    (output / "tokenize_config.json").write_text(json.dumps(saved))
    argv = ["--model", model_dir, "--train_dir", str(images), "--output_dir", str(output), *COMMON]
    with pytest.raises(UsageError, match=rf"lacks \['{key}'\], which vqrae-tokenize records"):
        main(argv)


def test_the_precision_is_recorded_in_the_manifest_and_the_card(setup, tmp_path):
    root, model_dir, images, reference = setup
    assert json.loads((reference / MANIFEST_FILE).read_text())["precision"] == "float32"  # auto, on a CPU
    card = (reference / "README.md").read_text()
    assert "The encoder ran in float32." in card and "bf16" not in card

    folder = _small_folder(images, tmp_path / "photos")
    output = tmp_path / "bf16"
    argv = ["--model", model_dir, "--train_dir", str(folder), "--output_dir", str(output), "--mixed_precision", "bf16"]
    main(argv)
    assert json.loads((output / MANIFEST_FILE).read_text())["precision"] == "bf16"
    card = (output / "README.md").read_text()
    assert "The encoder ran in bf16" in card
    assert "bf16 tokens may differ from float32 ones in a small share of tokens" in card
    # Resuming is checked against the precision used, not the option as spelled: `--mixed_precision auto` output
    # made on a GPU (bf16) is refused on a CPU (float32), and resumes there with `--mixed_precision bf16`.
    output = tmp_path / "auto_on_a_gpu"
    shutil.copytree(reference, output)
    config = json.loads((output / "tokenize_config.json").read_text())
    (output / "tokenize_config.json").write_text(json.dumps({**config, "precision": "bf16"}))
    (output / MANIFEST_FILE).unlink()
    argv = ["--model", model_dir, "--train_dir", str(images), "--output_dir", str(output), *COMMON]
    with pytest.raises(UsageError, match=r"computed in bf16, but `--mixed_precision auto` runs in float32 here; "):
        main(argv)
    assert main([*argv, "--mixed_precision", "bf16"])["images"] == 0  # every shard is there: only the manifest
    assert json.loads((output / MANIFEST_FILE).read_text())["precision"] == "bf16"


def test_a_model_path_that_does_not_exist_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    looked_for = re.escape(str(tmp_path.resolve() / "outputs" / "nope"))
    with pytest.raises(
        UsageError,
        match=rf"`--model` 'outputs/nope' is not a folder \(looked for {looked_for}\) and not a model in the Hub "
        "cache or reachable on the Hub: ",
    ):
        load_model_and_processor("outputs/nope")
    with pytest.raises(UsageError, match=r"`--model` './outputs/nope' is not a folder .* and not a Hub model id"):
        load_model_and_processor("./outputs/nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"`--model` 'empty' is a folder but holds no loadable model: "):
        load_model_and_processor("empty")


def test_one_pass_preparation_equals_the_centre_square_then_the_processor(setup, tmp_path):
    """The saved processor cuts the centred square itself, so tokenize runs it once on the decoded image: the same
    pixels as `center_square` followed by the processor, for wide, tall, small (upscaled) and grayscale images."""
    from vqrae.image_data import center_square, processor_resample, processor_size
    from vqrae.token_encoding import ImagePreparation, cuts_center_square

    _, model_dir, _, _ = setup
    _, processor = load_model_and_processor(model_dir, None, torch.device("cpu"))
    side = processor_size(processor, None)
    assert cuts_center_square(processor, side) and not cuts_center_square(processor, side + 1)
    prepare = ImagePreparation(processor, "image", [], "center", None)
    rng = np.random.default_rng(1)
    for shape in [(30, 71, 3), (90, 20, 3), (7, 9, 3), (45, 33)]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        path = tmp_path / f"{shape}.png"
        image.save(path)
        square = center_square(image.convert("RGB"), side, processor_resample(processor))
        expected = processor(images=[square], return_tensors="pt")["pixel_values"][0].float()
        assert torch.equal(prepare({"image": {"path": str(path), "bytes": None}}, 0)[2], expected)
