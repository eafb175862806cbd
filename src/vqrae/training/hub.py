"""Publish a saved VQRAE folder to the Hugging Face Hub: the model, its code, its image processor, its model card and
the run's pictures and results, in one commit.

From Python::

    from vqrae.training.hub import push_to_hub
    push_to_hub("out/stage2", "org/vqrae-cosmos")

From the command line::

    vqrae-push out/stage2 --repo-id org/vqrae-cosmos [--private] [--revision BRANCH]

The published repository loads with `AutoModel.from_pretrained("org/vqrae-cosmos", trust_remote_code=True)`, and,
with `vqrae` installed, `import vqrae` and no `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token, is_offline_mode

from .model_card import check_repo_id, render_model_card
from .run_files import EVAL_RESULTS_FILE, PICTURES, TRAINING_CONFIG_FILE

__all__ = ["HubPublishError", "files_to_publish", "push_to_hub"]

logger = logging.getLogger(__name__)

# What a saved model folder holds besides the weights (`save_pretrained_atomic(model, folder,
# model.get_image_processor())`, as vqrae-train saves); all of it is needed to load the repository.
MODEL_FILES = ("config.json", "preprocessor_config.json")
MODEL_CODE_FILES = ("configuration_vqrae.py", "decoder.py", "modeling_vqrae.py", "quantizers.py")
# What a training run adds; published when present. Checkpoints, logs (metrics.jsonl) and anything else stay local.
RUN_FILES = (EVAL_RESULTS_FILE, TRAINING_CONFIG_FILE, *PICTURES)
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubPublishError(RuntimeError):
    """Publishing cannot start (offline mode, no token) or the Hub cannot be reached; nothing was committed."""


def files_to_publish(folder: str | os.PathLike) -> list[str]:
    """The files of a saved VQRAE folder that go to the Hub (besides the freshly rendered README.md card).

    Raises `ValueError` naming what is missing when the folder cannot be loaded from the Hub as it is.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"`folder` must be a saved VQRAE model folder (got {str(folder)!r}, which is not a folder).")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        weights = [index.name, *shards]
    else:
        weights = ["model.safetensors"]
    required = [*MODEL_FILES, *weights, *MODEL_CODE_FILES]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} lacks {missing}, which a published VQRAE model needs. Save the model with "
            "`vqrae.atomic_io.save_pretrained_atomic(model, folder, model.get_image_processor())` after `import "
            "vqrae` (it writes the weights, the model code and preprocessor_config.json)."
        )
    return required + [name for name in RUN_FILES if (folder / name).is_file()]


def _check_can_publish(token: str | None) -> str:
    """Fail before any network call when the Hub cannot be written to; return the token to use."""
    if is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        raise HubPublishError(
            "Cannot publish to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1), so nothing was uploaded. "
            "Unset it (`unset HF_HUB_OFFLINE`, or run `HF_HUB_OFFLINE=0 vqrae-push ...`) and try again."
        )
    token = token or get_token()
    if not token:
        raise HubPublishError(
            "Cannot publish to the Hugging Face Hub: no token found, so nothing was uploaded. Log in with "
            "`hf auth login`, or set the HF_TOKEN environment variable, or pass `token=` to push_to_hub; the token "
            "needs write access to the repository's namespace."
        )
    return token


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Publish a saved VQRAE folder to `repo_id` in one commit and return the commit's `CommitInfo`.

    Sends the weights, `config.json`, `preprocessor_config.json`, the three model code files (for
    `trust_remote_code`), a model card rendered from the folder as `README.md` (any README.md in the folder is not
    sent: the card is rebuilt from the folder's files), and, when present, `eval_results.json`,
    `training_config.yaml` and the pictures the card shows.

    Args:
        folder: a saved model folder (written by `save_pretrained_atomic`, and the training run).
        repo_id: `"org/name"`; the repository is created when it does not exist.
        private: create the repository private (an existing repository keeps its visibility).
        revision: a branch to commit to instead of `main`; created from `main` when missing.
        token: a Hub token with write access; defaults to the logged-in token or `HF_TOKEN`.
        commit_message: defaults to a message naming the number of files.

    Raises:
        ValueError: the folder is not a publishable VQRAE model, or `repo_id` is malformed.
        HubPublishError: offline mode is on, there is no token, or the Hub cannot be reached; nothing was
            committed.
    """
    check_repo_id(repo_id)
    if not isinstance(private, bool):
        raise TypeError(f"`private` must be a bool (got {private!r}).")
    files = files_to_publish(folder)
    token = _check_can_publish(token)
    folder = Path(folder)
    card = render_model_card(folder, repo_id=repo_id)
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.content.encode("utf-8"))]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]

    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload VQRAE tokenizer ({len(operations)} files) with vqrae-push",
            revision=revision,
            repo_type="model",
        )
    except Exception as error:
        if not _is_connection_error(error):
            raise
        raise HubPublishError(
            f"Cannot publish {folder} to {repo_id!r}: the Hugging Face Hub ({constants.ENDPOINT}) could not be "
            f"reached ({type(error).__name__}: {error}), so nothing was committed. Check the network connection "
            "(and HF_ENDPOINT, a proxy) and try again."
        ) from error
    logger.info("Published %s to %s", folder, info.commit_url)
    return info


def _is_connection_error(error: BaseException) -> bool:
    """A failure to reach the Hub: the built-in `ConnectionError` (huggingface_hub's `OfflineModeIsEnabled` is one),
    `requests`' `ConnectionError`, or an httpx transport error (connect, read timeout, proxy), matched by class name
    so no HTTP client is imported here; also when it is the cause of the error raised."""
    while error is not None:
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, ConnectionError) or names & {"ConnectionError", "TransportError"}:
            return True
        error = error.__cause__
    return False
