"""Reading a token dataset written by `vqrae-tokenize`, and turning its rows back into images.

from vqrae.token_dataset import decode_token_rows, load_token_dataset

tokens = load_token_dataset("tokens/")                # a datasets.Dataset: index, id, indices (h x w), ...
images = decode_token_rows(model, tokens[:8])         # 8 PIL images
images = decode_token_rows(model, generated_indices)  # tokens from a generative model, (B, h, w) or (h, w)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_utils import to_pil_images

__all__ = ["decode_token_rows", "load_token_dataset", "token_rows_to_indices"]


def load_token_dataset(path: str | Path, split: str | None = None):
    """The token dataset in the folder `path` (the `--output_dir` of `vqrae-tokenize`) as a `datasets.Dataset`.

    It is read from its Parquet shards with `datasets.load_dataset("parquet", ...)`. The job must have finished
    (its `tokenize_manifest.json` exists); a folder from an interrupted job raises a `ValueError`.
    """
    import datasets

    folder = Path(path)
    manifest_path = folder / "tokenize_manifest.json"
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
        image_processor (*optional*): the processor whose `image_mean` / `image_std` undo the normalisation;
            defaults to the model's own (SigLIP: 0.5 / 0.5).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1 (got {batch_size!r}).")
    indices = token_rows_to_indices(rows)
    processor = image_processor if image_processor is not None else model.get_image_processor()
    mean, std = processor.image_mean, processor.image_std
    device = next(model.parameters()).device
    images = []
    with torch.inference_mode():
        for start in range(0, indices.shape[0], batch_size):
            batch = indices[start : start + batch_size].to(device)
            reconstruction = model.decode_from_indices(batch, return_dict=True).reconstruction
            images.extend(to_pil_images(reconstruction, mean, std))
    return images
