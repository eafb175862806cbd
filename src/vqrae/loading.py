"""Load a trained VQRAE model and its image processor for a tool that runs it (`vqrae-evaluate`,
`vqrae-tokenize`), with a message that says why when `--model` cannot be loaded.

`vqrae/__init__.py`, which runs before this module is imported, registers `VQRAEConfig` / `VQRAEModel` with the
Auto classes, so `AutoModel` finds them without `trust_remote_code`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoImageProcessor, AutoModel
from transformers.utils import logging as hf_logging

from .errors import UsageError

__all__ = ["load_model_and_processor"]

logger = logging.getLogger(__name__)


def load_model_and_processor(name_or_path: str, revision: str | None = None, device: torch.device | str = "cpu"):
    """A VQRAE model (AutoModel; a folder or a Hub id, offline from the Hub cache) in eval mode, and its own image
    processor (AutoImageProcessor from the same place; the model's default one if the folder has none).

    A `--model` that cannot be loaded is a `UsageError` that says why: a path that is no folder (with the absolute
    path looked for) and no model in the Hub cache or on the Hub, a folder without a saved model, or a model that is
    not a VQRAE model."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        name_or_path = str(folder)
        what = f"`--model` {name_or_path!r} is a folder but holds no loadable model"
    else:
        what = f"`--model` {name_or_path!r} is not a folder (looked for {folder.resolve()})"
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            raise UsageError(f"{what} and not a Hub model id ('org/name').") from None
        what += " and not a model in the Hub cache or reachable on the Hub"
    # No loading bar: a rerun that is refused (other weights, source, precision) says so in one line.
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as error:  # transformers: no config.json, not found, offline; unknown model type
        raise UsageError(f"{what}: {error}") from error
    finally:
        if progress_bar:
            hf_logging.enable_progress_bar()
    if not hasattr(model, "decode_from_indices"):
        raise UsageError(f"`--model` {name_or_path!r} is a {type(model).__name__}, not a VQRAE model.")
    model = model.to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision)
    except OSError:
        logger.warning("%s has no preprocessor_config.json; using the model's default image processor.", name_or_path)
        processor = model.get_image_processor()
    return model, processor
