"""Loading a saved VQRAE model with errors that say what to do.

`VQRAEModel.from_pretrained` itself is strict about the weights (see its docstring); `load_model` adds what a person
typing a path needs to read: a folder that does not exist, a name that is neither a folder nor a reachable Hub id,
and a truncated or corrupted weights file, each as an `OSError` naming the path and the fix.
"""

from __future__ import annotations

import os

from safetensors import SafetensorError

from .modeling_vqrae import VQRAEModel

__all__ = ["load_model"]


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
