"""Turn an image dataset into a dataset of VQRAE tokens: `vqrae-tokenize` / `python -m vqrae.cli.tokenize`.

    vqrae-tokenize --model org/vqrae-cosmos --dataset_name org/images --split train --output_dir tokens/
    vqrae-tokenize --model out/stage1 --train_dir photos/ --output_dir tokens/
    accelerate launch -m vqrae.cli.tokenize --model ... --output_dir tokens/ # several processes, one dataset

The output is a `datasets` dataset in Parquet shards, one row per image, in the order of the source split:

    index      int64                  position of the image in the source split
    id         string                 the image's file (relative to `--train_dir` or to a local `--dataset_name`
                                      folder) or its name in the source
    indices    Array2D(h, w) int32    the token grid
    features   Array2D(h*w, D)        the continuous semantic features (only with `--save_features`)
    ...                               any `--keep_columns` of the source (e.g. `label`)

    tokens/data/train-00000.parquet, train-00001.parquet, ...     shard k holds source rows [k S, (k + 1) S)
    tokens/tokenize_config.json                                   what the shards were made from (checked on resume)
    tokens/tokenize_manifest.json, README.md                      written by the main process once every shard exists

Load it with `datasets.load_dataset("parquet", data_dir="tokens/data", split="train")` (or
`load_token_dataset("tokens")`), push it with `push_to_hub`, and turn rows back into images with
`vqrae.token_dataset.decode_token_rows`.

Resuming: each shard is written to a temporary file and renamed into place, so a shard file exists only when it is
complete. A rerun with the same arguments skips the complete shards, so a killed job resumes with nothing lost and
nothing duplicated. Under `accelerate launch`, process `r` of `n` takes the shards `k` with `k % n == r`: the shard
boundaries depend only on `--shard_size`, so any number of processes (or a resume with a different number) makes
the same dataset. With `--streaming`, every process reads the whole stream in order and decodes only the images
of its own shards.

A changed source or model is refused: `tokenize_config.json` (and the manifest) record the source's identity (a
folder: its number of image files and a digest of their paths, sizes and modification times; a map-style dataset:
its number of rows and `datasets` fingerprint; a stream: its name, config, split and `--dataset_revision`), the
model's weights (`weights_sha256`, a SHA-256 of its state dict, `weights_digest`) and the precision the encoder ran
in (`precision`: `float32` or `bf16`, `--mixed_precision auto` resolved). A rerun, of a complete or a partial
output, whose source, weights or precision differs stops with an error instead of mixing old and new tokens or
calling a stale dataset complete. bf16 tokens may differ from float32 ones in a small share of tokens (the encoder's
features differ in bf16; the FSQ step itself is always float32); the dataset card says which precision was used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from itertools import count, islice
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from .arguments import ComputeArguments, ImageSourceArguments, ModelSourceArguments, check_at_least, check_output_dir
from .atomic_io import atomic_write
from .errors import UsageError
from .image_data import (
    load_image_dataset,
)
from .loading import load_model_and_processor
from .token_dataset import (
    CONFIG_FILE,
    DATA_DIR,
    MANIFEST_FILE,
    check_saved_arguments,
    check_saved_source,
    folder_identity,
    output_features,
    remove_stale_temporaries,
    saved_config,
    shard_file,
    shard_is_complete,
    write_manifest,
    write_shard,
)
from .token_encoding import (
    ImagePreparation,
    ShardBatches,
    autocast_context,
    collate_rows,
    resolve_precision,
    token_grid,
    weights_digest,
)

logger = logging.getLogger(__name__)

FEATURES_DTYPES = ("float16", "float32")
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16")
CROP_CHOICES = ("center", "none")


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TokenizeArguments(ModelSourceArguments, ImageSourceArguments, ComputeArguments):
    """Arguments of `vqrae-tokenize` (see `--help`): the model, the source images (one of `--dataset_name` /
    `--train_dir`), the output and the compute."""

    output_dir: str = field(metadata={"changes_tokens": False, "help": "Where the token dataset is written."})
    train_dir: str | None = field(
        default=None, metadata={"help": "A folder of images (loaded as an `imagefolder`), instead of --dataset_name."}
    )
    split: str = field(default="train", metadata={"help": "Split to tokenize; slices such as `train[:1000]` work."})
    keep_columns: list[str] = field(
        default_factory=list, metadata={"help": "Source columns copied to the output (e.g. `label`)."}
    )
    max_images: int | None = field(default=None, metadata={"help": "Tokenize only the first N images."})
    crop: Literal["center", "none"] = field(
        default="center",
        metadata={
            "help": "`center`: the largest centred square, resized to the model's resolution (as validation images "
            "are, and as the model's saved image processor does); `none`: the whole image, squeezed to that square."
        },
    )
    shard_size: int = field(default=1000, metadata={"help": "Images per Parquet shard (the resume unit)."})
    save_features: bool = field(default=False, metadata={"help": "Also store the continuous features."})
    features_dtype: Literal["float16", "float32"] = field(
        default="float16", metadata={"help": "dtype of the stored features."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"changes_tokens": False, "help": "Delete earlier output first."}
    )
    batch_size: int = field(
        default=64, metadata={"changes_tokens": False, "help": "Images per forward pass (per process)."}
    )
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        default="auto",
        metadata={
            "help": "`auto`: bf16 autocast on a GPU that supports it, float32 otherwise. FSQ indices are always "
            "float32; bf16 features differ slightly, so a small share of tokens differs from a float32 run. The "
            "manifest records the precision used."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if (self.dataset_name is None) == (self.train_dir is None):
            raise UsageError(
                "Give exactly one source of images: `--dataset_name` (a Hub id or a local dataset folder) or "
                f"`--train_dir` (a folder of images) (got dataset_name={self.dataset_name!r}, "
                f"train_dir={self.train_dir!r})."
            )
        if self.train_dir is not None and not Path(self.train_dir).is_dir():
            raise UsageError(f"`--train_dir` must be an existing folder of images (got {self.train_dir!r}).")
        check_output_dir(self.output_dir)
        check_at_least("shard_size", self.shard_size, 1)
        check_at_least("max_images", self.max_images, 1, optional=True)
        for name, allowed in (
            ("features_dtype", FEATURES_DTYPES),
            ("crop", CROP_CHOICES),
            ("mixed_precision", MIXED_PRECISION_CHOICES),
        ):
            if getattr(self, name) not in allowed:
                raise UsageError(f"`--{name}` must be one of {allowed} (got {getattr(self, name)!r}).")
        reserved = {"index", "id", "indices", "features"}
        if reserved & set(self.keep_columns):
            raise UsageError(
                f"`--keep_columns` may not name the output's own columns {sorted(reserved)} "
                f"(got {self.keep_columns!r})."
            )

    @property
    def output_split(self) -> str:
        """The split name of the output: the source split without any slice (`train[:10%]` -> `train`)."""
        name = re.split(r"[\[+]", self.split, maxsplit=1)[0].strip()
        return re.sub(r"[^A-Za-z0-9_]", "_", name) or "train"

    @property
    def source_folder(self) -> Path | None:
        """The local folder the images are files of (`--train_dir`, or `--dataset_name` naming a folder), else
        None: image ids are stored relative to it, and its files are the identity of a stream."""
        folder = self.train_dir if self.train_dir is not None else self.dataset_name
        return Path(folder).resolve() if folder is not None and Path(folder).is_dir() else None

    def content_config(self) -> dict:
        config = {name: getattr(self, name) for name in CONTENT_ARGUMENTS}
        if config["train_dir"] is not None:
            config["train_dir"] = str(Path(config["train_dir"]).resolve())
        return config


# Arguments that decide the content of the shards (all not marked `"changes_tokens": False`): a resume must keep them.
CONTENT_ARGUMENTS = tuple(item.name for item in fields(TokenizeArguments) if item.metadata.get("changes_tokens", True))


# ---------------------------------------------------------------------------------------------------------------
# Source images
# ---------------------------------------------------------------------------------------------------------------


def load_source(args: TokenizeArguments, identity: dict | None = None):
    """The source split, through the library's loader (`vqrae.image_data.load_image_dataset`: a Hub id, the
    built-in photos, or an image folder; optionally streamed), with its image column *not* decoded, so the images
    of shards that are complete or belong to another process are never decoded. Returns `(dataset, image_column,
    identity)`, `identity` what `source_identity` records of the whole source (before `--max_images`), unless it is
    passed in (already computed: a folder is not walked twice)."""
    split = "train" if args.train_dir is not None else args.split
    dataset, image_column = load_image_dataset(split, train_dir=args.train_dir, **args.source_kwargs())
    if identity is None:
        identity = source_identity(args, dataset)
    missing = [name for name in args.keep_columns if name not in (dataset.column_names or [])]
    if missing:
        raise UsageError(
            f"`--keep_columns` names {missing}, which the source lacks (columns: {dataset.column_names})."
        )
    dataset = dataset.select_columns([image_column, *args.keep_columns])
    if args.max_images is not None:
        dataset = (
            dataset.take(args.max_images)
            if args.streaming
            else dataset.select(range(min(args.max_images, len(dataset))))
        )
    return dataset, image_column, identity


def source_identity(args: TokenizeArguments, dataset=None) -> dict:
    """What identifies the source, so a rerun can tell that it changed (see the module docstring):

    - `--train_dir`: `{"kind": "image_folder", "num_images", "digest"}` over every image file under the folder
      (`folder_identity`);
    - a map-style dataset: `{"kind": "dataset", "num_rows", "fingerprint"}`, `datasets`' own fingerprint, which
      follows the data files (their commit on the Hub, their modification times locally); only this one needs the
      loaded (unsliced) `dataset`;
    - a stream: `{"kind": "stream", "dataset_name", "dataset_config_name", "split", "revision"}`, plus the folder's
      `num_files` and `digest` when `--dataset_name` is a local folder. An unpinned Hub stream (no
      `--dataset_revision`) cannot be checked further: its length is unknown until it is read.
    """
    if args.train_dir is not None:
        return {"kind": "image_folder", **folder_identity(args.train_dir, images_only=True)}
    if not args.streaming:
        return {"kind": "dataset", "num_rows": len(dataset), "fingerprint": dataset._fingerprint}
    identity = {
        "kind": "stream",
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "split": args.split,
        "revision": args.dataset_revision,
    }
    if args.source_folder is not None:
        files = folder_identity(args.source_folder, images_only=False)
        identity.update(num_files=files["num_images"], digest=files["digest"])
    return identity


# ---------------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------------


def owned_shards(num_shards: int, process_index: int, num_processes: int) -> list[int]:
    """The shards process `process_index` of `num_processes` writes: a fixed round-robin over the global shard
    numbers, so the output never depends on how many processes made it."""
    return list(range(process_index, num_shards, num_processes))


def iter_shard_rows(dataset, streaming: bool, shard_size: int, wanted) -> Iterator[tuple[int, list[dict]]]:
    """`(shard, rows)` in shard order, images not decoded. A map-style source yields the `wanted` shards only, read
    by position; a streamed source is read once, front to back, and yields every shard (so the caller can count
    the images and pass over the shards it does not want)."""
    if not streaming:
        for shard in sorted(wanted):
            start = shard * shard_size
            batch = dataset[start : min(start + shard_size, len(dataset))]
            names = list(batch)
            yield shard, [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]
        return
    iterator = iter(dataset)
    for shard in count():
        rows = list(islice(iterator, shard_size))
        if not rows:
            return
        yield shard, rows


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def process_state():
    """accelerate's view of the processes. Several CPU processes (`ACCELERATE_USE_CPU=1 accelerate launch
    --multi_gpu ...`, or `torchrun` on a machine without a GPU) need `cpu=True` to join one gloo group; without it
    each would believe it is alone and tokenize everything."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def prepare_token_dir(args: TokenizeArguments, state, made_from: dict) -> Path:
    """Create (or check, on resume) the output folder: its `tokenize_config.json` records the content arguments and
    `made_from` (the source's identity, the precision and the weights' digest), and a rerun must match them all.
    Returns its `data/` folder."""
    output_dir = Path(args.output_dir)
    config_path = output_dir / CONFIG_FILE
    if state.is_main_process:
        if args.overwrite_output_dir and output_dir.exists():
            shutil.rmtree(output_dir)
        (output_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
        if not config_path.exists():
            atomic_write(config_path, json.dumps({**args.content_config(), **made_from}, indent=2) + "\n")
    state.wait_for_everyone()
    saved = saved_config(output_dir)
    check_saved_arguments(output_dir, saved, args.content_config())
    check_saved_source(output_dir, saved, made_from, mixed_precision=args.mixed_precision, model=args.model)
    return output_dir / DATA_DIR


def encode_shard(
    model, batches: ShardBatches, args: TokenizeArguments, device, progress, precision: str = "float32"
) -> tuple[dict, list[str]]:
    """Encode one shard (the encoder in `precision`, see `resolve_precision`); returns its columns (rows in source
    order) and the ids of the images it skipped."""
    columns = {"index": [], "id": [], "indices": [], **{name: [] for name in args.keep_columns}}
    if args.save_features:
        columns["features"] = []
    skipped = []
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=args.batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=collate_rows,
        pin_memory=torch.device(device).type == "cuda",
    )
    features_dtype = np.dtype(args.features_dtype)
    for items, pixel_values in loader:
        readable = [item for item in items if item[2] is not None]
        skipped.extend(item[1] for item in items if item[2] is None)
        if readable:
            pixel_values = pixel_values.to(device, non_blocking=True)
            with torch.inference_mode(), autocast_context(precision, device):
                encoded = model.encode(pixel_values)
            indices = encoded.indices.to(torch.int32).cpu().numpy()
            features = (
                encoded.last_hidden_state.float().cpu().numpy().astype(features_dtype) if args.save_features else None
            )
            for position, (index, identifier, _, kept) in enumerate(readable):
                columns["index"].append(index)
                columns["id"].append(identifier)
                columns["indices"].append(indices[position])
                for name in args.keep_columns:
                    columns[name].append(kept[name])
                if features is not None:
                    columns["features"].append(features[position])
        progress.update(len(items))
    return columns, skipped


def tokenize(args: TokenizeArguments) -> dict:
    """Run the job in this process (one of several under `accelerate launch`). Returns a summary of this run:
    `images` and `seconds` tokenized by all processes, `images_per_second`, and the manifest once complete."""
    state = process_state()
    precision = resolve_precision(args.mixed_precision, state.device)
    if not args.overwrite_output_dir:
        # Before loading a source that may be large.
        check_saved_arguments(args.output_dir, saved_config(args.output_dir), args.content_config())
    if args.train_dir is None and not args.streaming:
        dataset, image_column, source = load_source(args)  # its identity is its length and fingerprint
    else:
        dataset, source = None, source_identity(args)  # a folder or a stream: checked before anything is loaded
    # The model is loaded first, even for a complete output: its weights must be those that made the tokens.
    model, processor = load_model_and_processor(args.model, args.revision, state.device)
    made_from = {"source": source, "precision": precision, "weights_sha256": weights_digest(model)}
    data_dir = prepare_token_dir(args, state, made_from)
    manifest_path = Path(args.output_dir) / MANIFEST_FILE
    if manifest_path.exists():
        logger.info("%s is complete (%s exists); nothing to do.", args.output_dir, MANIFEST_FILE)
        return {
            "images": 0,
            "seconds": 0.0,
            "images_per_second": 0.0,
            "manifest": json.loads(manifest_path.read_text()),
        }

    grid, feature_shape = token_grid(model, processor)
    if dataset is None:
        dataset, image_column, _ = load_source(args, identity=source)
    features_dtype = args.features_dtype if args.save_features else None
    features = output_features(grid, feature_shape, dataset.features, args.keep_columns, features_dtype)
    prepare = ImagePreparation(processor, image_column, list(args.keep_columns), args.crop, args.source_folder)
    writer = _ShardWriter(args, state, data_dir, model, prepare, features, precision)
    wanted, to_do = writer.shards_to_write(dataset)
    started = time.perf_counter()
    with tqdm(
        total=to_do,
        unit="img",
        desc=f"tokenize [{state.process_index}/{state.num_processes}]",
        disable=not state.is_local_main_process,
        dynamic_ncols=True,
    ) as progress:
        done, num_images = writer.write(dataset, wanted, progress)
    counts = gather_object([(done, time.perf_counter() - started, num_images)])
    state.wait_for_everyone()
    total_done, wall = sum(count[0] for count in counts), max(count[1] for count in counts)
    summary = {"images": total_done, "seconds": wall, "images_per_second": total_done / wall if wall > 0 else 0.0}
    if state.is_main_process:
        summary["manifest"] = write_manifest(
            Path(args.output_dir),
            {**args.content_config(), **made_from, "output_split": args.output_split},
            num_images=max(count[2] for count in counts),
            shard_size=args.shard_size,
            token_grid=grid,
            codebook_size=model.codebook_size,
            features=features,
        )
        logger.info(
            "Tokenized %d images in %.1f s (%.1f images/s) over %d process(es); %d rows in %s.",
            total_done,
            wall,
            summary["images_per_second"],
            state.num_processes,
            summary["manifest"]["num_rows"],
            args.output_dir,
        )
    state.wait_for_everyone()
    return summary


@dataclass
class _ShardWriter:
    """This process's part of the job: which shards it writes, and writing them."""

    args: TokenizeArguments
    state: object
    data_dir: Path
    model: object
    prepare: ImagePreparation
    features: object
    precision: str

    def shards_to_write(self, dataset):
        """`(wanted, images to do)`: the shards of this process that are not complete yet (a set, or for a stream
        of unknown length a `_StreamingShardSet`), and how many images they hold (None for a stream)."""
        args, state, split = self.args, self.state, self.args.output_split
        if args.streaming:
            return _StreamingShardSet(self.data_dir, split, state.process_index, state.num_processes), None
        num_images = len(dataset)
        candidates = owned_shards(math.ceil(num_images / args.shard_size), state.process_index, state.num_processes)
        remaining = [shard for shard in candidates if not shard_is_complete(self.data_dir, split, shard)]
        remove_stale_temporaries(self.data_dir, split, remaining)
        return set(remaining), sum(min(args.shard_size, num_images - s * args.shard_size) for s in remaining)

    def write(self, dataset, wanted, progress) -> tuple[int, int]:
        """Encode and write the `wanted` shards; returns the images done here and the source's number of images
        (for a stream, known once it has been read to the end)."""
        args, split = self.args, self.args.output_split
        done, num_images = 0, None if args.streaming else len(dataset)
        for shard, rows in iter_shard_rows(dataset, args.streaming, args.shard_size, wanted):
            first_index = shard * args.shard_size
            if args.streaming:
                num_images = first_index + len(rows)
            if shard not in wanted:  # streaming: a shard that is complete or another process's
                continue
            if args.streaming:
                remove_stale_temporaries(self.data_dir, split, [shard])
            batches = ShardBatches(rows, first_index, self.prepare)
            columns, skipped = encode_shard(self.model, batches, args, self.state.device, progress, self.precision)
            shard_info = {"shard": shard, "first_index": first_index, "num_images": len(rows), "skipped": skipped}
            write_shard(shard_file(self.data_dir, split, shard), columns, self.features, shard_info)
            done += len(rows)
        return done, num_images or 0


class _StreamingShardSet:
    """The shards this process still has to write, in a stream of unknown length: `k % num_processes ==
    process_index` and no complete file yet."""

    def __init__(self, data_dir: Path, split: str, process_index: int, num_processes: int):
        self.data_dir, self.split = data_dir, split
        self.process_index, self.num_processes = process_index, num_processes

    def __contains__(self, shard: int) -> bool:
        owned = shard % self.num_processes == self.process_index
        return owned and not shard_is_complete(self.data_dir, self.split, shard)
