"""The token dataset format of `vqrae-tokenize`, in one place: writing its Parquet shards, its manifest and its
dataset card, reading it back, and turning its rows into images.

    tokens/data/train-00000.parquet, ...   shard k holds source rows [k S, (k + 1) S); written atomically
    tokens/tokenize_manifest.json          what the shards hold; written last, once every shard exists
    tokens/README.md                       the dataset card

from vqrae.token_dataset import decode_token_rows, load_token_dataset

tokens = load_token_dataset("tokens/")                # a datasets.Dataset: index, id, indices (h x w), ...
images = decode_token_rows(model, tokens[:8])         # 8 PIL images
images = decode_token_rows(model, generated_indices)  # tokens from a generative model, (B, h, w) or (h, w)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

from .atomic_io import atomic_file, atomic_write
from .configuration_vqrae import is_int
from .errors import UsageError
from .image_utils import to_pil_images

__all__ = [
    "DATA_DIR",
    "MANIFEST_FILE",
    "dataset_card",
    "decode_token_rows",
    "load_token_dataset",
    "output_features",
    "read_shard_info",
    "shard_file",
    "shard_is_complete",
    "token_rows_to_indices",
    "write_manifest",
    "write_shard",
]

MANIFEST_FILE = "tokenize_manifest.json"
CONFIG_FILE = "tokenize_config.json"
# What the shards were made from, recorded beside the content arguments and checked on every rerun.
MADE_FROM_KEYS = ("source", "precision", "weights_sha256")
DATA_DIR = "data"
SHARD_METADATA_KEY = b"vqrae_shard"


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def shard_file(data_dir: Path, split: str, shard: int) -> Path:
    return data_dir / f"{split}-{shard:05d}.parquet"


def empty_shard_marker(path: Path) -> Path:
    """Where a shard without rows (every image unreadable) is recorded instead: `datasets` cannot read a Parquet
    file with no rows, and a hidden file is not picked up as data."""
    return path.with_name(f".{path.name}.empty.json")


def shard_is_complete(data_dir: Path, split: str, shard: int) -> bool:
    path = shard_file(data_dir, split, shard)
    return path.exists() or empty_shard_marker(path).exists()


def output_features(
    grid: tuple[int, int], feature_shape: tuple[int, int], source_features, keep_columns, features_dtype: str | None
):
    """The `datasets.Features` of every shard: `index`, `id`, `indices` (the `h x w` grid), the kept source columns
    (with the source's own types) and, when `features_dtype` is given, the continuous `features`."""
    columns = {
        "index": datasets.Value("int64"),
        "id": datasets.Value("string"),
        "indices": datasets.Array2D(shape=grid, dtype="int32"),
    }
    for name in keep_columns:
        if source_features is None or name not in source_features:
            # Every shard must have the same schema, so the type cannot be guessed from one shard's values.
            raise UsageError(f"The source does not declare the type of `--keep_columns` column {name!r}.")
        columns[name] = source_features[name]
    if features_dtype:
        columns["features"] = datasets.Array2D(shape=feature_shape, dtype=features_dtype)
    return datasets.Features(columns)


def write_shard(path: Path, columns: dict, features, shard_info: dict) -> None:
    """Write one shard atomically: a hidden temporary file, flushed to disk, then renamed into place.

    A reader (or a resumed run) therefore sees either no file or a complete one. `shard_info` (first index,
    number of source images, the skipped ones) travels in the Parquet metadata, for the manifest.
    """
    if not columns["index"]:
        atomic_write(empty_shard_marker(path), json.dumps(shard_info))
        return
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    metadata = dict(table.schema.metadata or {})
    metadata[SHARD_METADATA_KEY] = json.dumps(shard_info).encode()
    table = table.replace_schema_metadata(metadata)
    with atomic_file(path) as temporary:
        pq.write_table(table, temporary)


def read_shard_info(path: Path) -> dict:
    if empty_shard_marker(path).exists():
        return {**json.loads(empty_shard_marker(path).read_text()), "num_rows": 0}
    schema = pq.read_schema(path)
    info = json.loads((schema.metadata or {}).get(SHARD_METADATA_KEY, b"{}"))
    info["num_rows"] = pq.read_metadata(path).num_rows
    return info


def remove_stale_temporaries(data_dir: Path, split: str, shards: list[int]) -> None:
    """Delete the temporary files a killed run left for these shards."""
    names = {shard_file(data_dir, split, shard).name for shard in shards}
    for temporary in data_dir.glob(".*.tmp-*"):
        if temporary.name[1:].split(".tmp-")[0] in names:
            temporary.unlink(missing_ok=True)


def write_manifest(
    output_dir: Path,
    config: dict,
    *,
    num_images: int,
    shard_size: int,
    token_grid: tuple[int, int],
    codebook_size: int,
    features,
) -> dict:
    """Check that every shard exists, then write `tokenize_manifest.json` and a dataset card (`README.md`). The
    manifest holds `config` (the job's content arguments, the source's identity `source`, the `precision` the
    encoder ran in, the digest of the model's weights `weights_sha256`, the `output_split`) and what was written."""
    data_dir, split = output_dir / DATA_DIR, config["output_split"]
    num_shards = math.ceil(num_images / shard_size)
    missing = [shard for shard in range(num_shards) if not shard_is_complete(data_dir, split, shard)]
    if missing:
        raise RuntimeError(f"Shards {missing} of {output_dir} are missing after every process finished.")
    infos = [read_shard_info(shard_file(data_dir, split, shard)) for shard in range(num_shards)]
    skipped = [identifier for info in infos for identifier in info.get("skipped", [])]
    manifest = {
        **config,
        "num_images": num_images,
        "num_rows": sum(info["num_rows"] for info in infos),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_shards": num_shards,
        "data_files": f"{DATA_DIR}/{split}-*.parquet",
        "token_grid": list(token_grid),
        "codebook_size": int(codebook_size),
        "features": features.to_dict(),
    }
    atomic_write(output_dir / "README.md", dataset_card(manifest))
    atomic_write(output_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def dataset_card(manifest: dict) -> str:
    source = manifest["dataset_name"] or "a folder of images"
    return (
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        f"  - split: {manifest['output_split']}\n"
        f"    path: {manifest['data_files']}\n"
        "tags:\n- vqrae\n- image-tokens\n"
        "---\n\n"
        f"# VQRAE tokens of {source}\n\n"
        f"Split `{manifest['split']}` of {source}, encoded by `{manifest['model']}` into "
        f"{manifest['token_grid'][0]} x {manifest['token_grid'][1]} tokens per image from a codebook of "
        f"{manifest['codebook_size']} codes: {manifest['num_rows']} rows ({manifest['num_skipped']} unreadable images "
        f"skipped).\n\n{_precision_sentence(manifest.get('precision'))}"
        "```python\n"
        "from vqrae.token_dataset import decode_token_rows, load_token_dataset\n"
        "tokens = load_token_dataset(path)\n"
        "images = decode_token_rows(model, tokens[:4])\n"
        "```\n"
    )


def _precision_sentence(precision: str | None) -> str:
    if precision == "bf16":
        return (
            "The encoder ran in bf16 (autocast; the FSQ step itself in float32). bf16 tokens may differ from float32 "
            "ones in a small share of tokens, because the encoder's features differ slightly in bf16.\n\n"
        )
    if precision == "float32":
        return "The encoder ran in float32.\n\n"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def load_token_dataset(path: str | Path, split: str | None = None):
    """The token dataset in the folder `path` (the `--output_dir` of `vqrae-tokenize`) as a `datasets.Dataset`.

    It is read from its Parquet shards with `datasets.load_dataset("parquet", ...)`. The job must have finished
    (its `tokenize_manifest.json` exists); a folder from an interrupted job raises a `ValueError`.
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(
            f"{folder} is not a finished token dataset (no tokenize_manifest.json); run (or resume) vqrae-tokenize "
            "with the same arguments to complete it."
        )
    manifest = json.loads(manifest_path.read_text())
    output_split = manifest["output_split"]
    if split is not None and split != output_split:
        raise ValueError(f"`split` must be {output_split!r}, the only split in {folder} (got {split!r}).")
    data_files = {output_split: str(folder / manifest["data_files"])}
    return datasets.load_dataset("parquet", data_files=data_files, split=output_split)


def token_rows_to_indices(rows) -> torch.Tensor:
    """The token grids of `rows` as one `(B, h, w)` int64 tensor.

    `rows` may be a `datasets.Dataset` of tokens, a batch of it (`dataset[2:5]`, a dict whose `indices` holds
    several grids), one row (`dataset[0]`), a list of rows, or the grids themselves (a tensor, array or nested list
    of shape `(B, h, w)` or `(h, w)`).
    """
    if hasattr(rows, "column_names") and hasattr(rows, "with_format"):  # a datasets.Dataset
        rows = rows.with_format("numpy")["indices"]
    elif isinstance(rows, Mapping):
        if "indices" not in rows:
            raise ValueError(f"`rows` must hold an `indices` column (got keys {sorted(rows)}).")
        rows = rows["indices"]
    elif isinstance(rows, Sequence) and rows and isinstance(rows[0], Mapping):
        rows = [row["indices"] for row in rows]
    if isinstance(rows, torch.Tensor):
        indices = rows
    elif isinstance(rows, Sequence) and rows and not isinstance(rows[0], (int, np.integer)):
        indices = torch.as_tensor(np.stack([np.asarray(row) for row in rows]))
    else:
        indices = torch.as_tensor(np.asarray(rows))
    if indices.ndim == 2:
        indices = indices.unsqueeze(0)
    if indices.ndim != 3 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            "`rows` must give integer token grids of shape (batch_size, h, w) or (h, w) "
            f"(got dtype {indices.dtype} and shape {tuple(indices.shape)})."
        )
    return indices.long()


def decode_token_rows(model, rows, batch_size: int = 32, image_processor=None) -> list[Image.Image]:
    """Decode token rows into RGB PIL images with `model.decode_from_indices`, `batch_size` grids at a time.

    Args:
        model (`VQRAEModel`): the tokenizer that made the tokens (or one with the same codebook and decoder).
        rows: what [`token_rows_to_indices`] accepts: dataset rows, a batch of them, or `(B, h, w)` token grids.
        batch_size (`int`, *optional*, defaults to 32): grids decoded per forward pass.
        image_processor (*optional*): the processor whose rescale, `image_mean` and `image_std` are undone;
            defaults to the model's own (`model.get_image_processor()`).
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1 (got {batch_size!r}).")
    indices = token_rows_to_indices(rows)
    processor = image_processor if image_processor is not None else model.get_image_processor()
    device = next(model.parameters()).device
    images = []
    with torch.inference_mode():
        for start in range(0, indices.shape[0], batch_size):
            batch = indices[start : start + batch_size].to(device)
            reconstruction = model.decode_from_indices(batch, return_dict=True).reconstruction
            images.extend(to_pil_images(reconstruction, processor))
    return images


# ---------------------------------------------------------------------------------------------------------------
# What the tokens were made from: checked before a rerun adds to them or calls them complete
# ---------------------------------------------------------------------------------------------------------------


def folder_identity(folder: str | os.PathLike, images_only: bool) -> dict:
    """`{"num_images", "digest"}` of the files under `folder` that `datasets` reads (hidden files and folders and
    `__*` folders left out, as `datasets` does; with `images_only`, the file types `imagefolder` loads): how many
    there are and a SHA-256 over their relative paths, sizes and modification times."""
    extensions = set(ImageFolder.EXTENSIONS)
    root = Path(folder)
    entries = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not name.startswith((".", "__"))]
        for name in files:
            if name.startswith(".") or (images_only and Path(name).suffix.lower() not in extensions):
                continue
            path = Path(directory) / name
            stat = path.stat()
            entries.append(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()
    return {"num_images": len(entries), "digest": digest}


def describe_source_change(saved: dict, current: dict) -> str | None:
    """`None` when `current` is the source `saved` describes; else what changed, in words."""
    if saved == current:
        return None
    kind = saved.get("kind")
    if kind != current.get("kind"):
        return f"{saved} -> {current}"
    if kind == "image_folder":
        if saved.get("num_images") != current["num_images"]:
            return f"{saved.get('num_images')} -> {current['num_images']} images"
        return f"{current['num_images']} images, but their names, sizes or modification times changed"
    if kind == "dataset":
        if saved.get("num_rows") != current["num_rows"]:
            return f"{saved.get('num_rows')} -> {current['num_rows']} rows"
        return f"{current['num_rows']} rows, fingerprint {saved.get('fingerprint')} -> {current['fingerprint']}"
    if saved.get("num_files") is not None and saved.get("num_files") != current.get("num_files"):
        return f"{saved.get('num_files')} -> {current.get('num_files')} files"
    changed = [key for key in current if saved.get(key) != current[key]]
    return ", ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in changed)


def saved_config(output_dir: str | os.PathLike) -> dict | None:
    """The `tokenize_config.json` of an earlier run into `output_dir`, or `None`."""
    path = Path(output_dir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_saved_arguments(output_dir: str | os.PathLike, saved: dict | None, content_config: dict) -> None:
    """Refuse to add to shards made with other content arguments (`content_config`, this run's; checked before the
    source is loaded) than the `saved` config of `output_dir`. The precision the
    encoder ran in is compared instead of `--mixed_precision` as spelled (`check_saved_source`): `auto` on a CPU and
    `no` make the same tokens."""
    if saved is None:
        return
    unrecorded = sorted(key for key in MADE_FROM_KEYS if key not in saved)
    if unrecorded:
        raise UsageError(
            f"{Path(output_dir) / CONFIG_FILE} lacks {unrecorded}, which vqrae-tokenize records: it was not "
            "written by vqrae-tokenize; pass --overwrite_output_dir to tokenize into this folder again."
        )
    current = dict(content_config)
    del current["mixed_precision"]
    changed = {key: (saved.get(key), current[key]) for key in current if saved.get(key) != current[key]}
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise UsageError(
            f"{output_dir} holds shards made with other arguments ({details}); resume with the same arguments "
            "or pass `--overwrite_output_dir` to start again."
        )


def check_saved_source(
    output_dir: str | os.PathLike, saved: dict, made_from: dict, *, mixed_precision: str, model: str
) -> None:
    """Refuse to resume (or to call complete) shards made in another precision, from another source or by other
    weights; `made_from` is this run's `{"source", "precision", "weights_sha256"}` (`MADE_FROM_KEYS`), which
    `--mixed_precision` and `--model` (named in the messages) gave."""
    precision = made_from["precision"]
    if saved["precision"] != precision:
        option = "bf16" if saved["precision"] == "bf16" else "no"
        raise UsageError(
            f"{output_dir} holds tokens computed in {saved['precision']}, but `--mixed_precision "
            f"{mixed_precision}` runs in {precision} here; resume with `--mixed_precision {option}` (bf16 "
            "autocast runs on a CPU too), or pass --overwrite_output_dir to tokenize it again."
        )
    change = describe_source_change(saved["source"], made_from["source"])
    if change is not None:
        raise UsageError(
            f"The source changed since the tokens in {output_dir} were made ({change}); pass "
            "--overwrite_output_dir to tokenize it again."
        )
    weights = made_from["weights_sha256"]
    if saved["weights_sha256"] != weights:
        raise UsageError(
            f"The weights of `--model` {model!r} changed since the tokens in {output_dir} were made "
            f"(weights_sha256 {saved['weights_sha256'][:16]}... -> {weights[:16]}...); resume with the model that "
            "made them, or pass --overwrite_output_dir to tokenize it again."
        )
