"""Loading a saved VQRAE model with errors that say what to do, for Python callers (`load_model`) and for the
tools that run a model (`load_model_and_processor`: `vqrae-evaluate`, `vqrae-tokenize`).

`VQRAEModel.from_pretrained` itself is strict about the weights (see its docstring); `load_model` adds what a person
typing a path needs to read: a folder that does not exist, a name that is neither a folder nor a reachable Hub id,
and a truncated or corrupted weights file, each as an `OSError` naming the path and the fix.

`vqrae/__init__.py`, which runs before this module is imported, registers `VQRAEConfig` / `VQRAEModel` with the
Auto classes, so `AutoModel` finds them without `trust_remote_code`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from transformers import AutoImageProcessor, AutoModel
from transformers.utils import logging as hf_logging

from .errors import UsageError
from .modeling_vqrae import VQRAEModel

__all__ = ["load_model", "load_model_and_processor"]

logger = logging.getLogger(__name__)


def load_model(name_or_path: str | os.PathLike, **kwargs) -> VQRAEModel:
    """`VQRAEModel.from_pretrained(name_or_path, **kwargs)`, with one-line errors for a path that does not exist, a
    Hub id that cannot be reached and a damaged `model.safetensors`."""
    name = os.fspath(name_or_path)
    if _is_missing_local_path(name):
        raise OSError(
            f"{name!r} is not a folder: {os.path.abspath(os.path.expanduser(name))} does not exist. Give the path "
            "of a saved VQRAE folder (relative to the current directory) or a Hub id ('org/name')."
        )
    try:
        return VQRAEModel.from_pretrained(name, **kwargs)
    except SafetensorError as error:
        raise OSError(
            f"Could not read the weights of {name!r}: {error}. The weights file is truncated or corrupted (an "
            "interrupted download, copy or save?); download or save it again."
        ) from error
    except (OSError, ValueError) as error:
        if os.path.exists(name):
            raise
        # transformers would say "Repo id must be in the form ..." or that it could not connect to the Hub.
        raise OSError(
            f"{name!r} is not a folder here (no {os.path.abspath(name)}) and could not be loaded as a model from the "
            f"Hub ({type(error).__name__}: {error}). Give the path of a saved VQRAE folder or a Hub id that is "
            "reachable (or in the local Hub cache when offline)."
        ) from error


def _is_missing_local_path(name: str) -> bool:
    """`name` cannot be a Hub id and names no existing file or folder: it starts like a path (`/`, `./`, `~`) or
    its parent folder exists here (`outputs/typo` next to an `outputs/` folder)."""
    if os.path.exists(os.path.expanduser(name)):
        return False
    if name.startswith(("/", "./", "../", "~")) or (os.altsep and name.startswith(os.altsep)):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


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
    except (OSError, ValueError, SafetensorError) as error:  # no config.json, not found, offline, damaged weights
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
