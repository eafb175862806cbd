"""Write files into a Hugging Face Hub cache folder, so `from_pretrained("org/name")` finds them offline.

The layout is the one `huggingface_hub` itself writes (and `scan_cache_dir` reads)::

    <cache_dir>/models--org--name/
        blobs/<sha256>                          the file contents, one blob per distinct content
        refs/main                               the 40-hex commit that `main` points at
        snapshots/<commit>/<path in repo>       relative symlinks into blobs/

With `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE=<cache_dir>` set before `huggingface_hub` is imported (tests/conftest.py
does this), `AutoModel.from_pretrained("org/name")` loads the snapshot without touching the network. There is no
public `huggingface_hub` helper that writes this layout.

    from hub_cache import write_hub_cache
    write_hub_cache(saved_folder, "google/siglip-tiny-test")                  # a folder
    write_hub_cache({"config.json": b"{...}", ...}, "org/name", cache_dir)   # captured uploads
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = ["write_hub_cache"]

_REPO_TYPES = ("model", "dataset", "space")


def _read_files(files: str | os.PathLike | Mapping[str, bytes | str | os.PathLike]) -> dict[str, bytes]:
    if isinstance(files, Mapping):
        contents = {}
        for path_in_repo, source in files.items():
            contents[str(path_in_repo)] = (
                bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
            )
        return contents
    folder = Path(files)
    if not folder.is_dir():
        raise ValueError(f"`files` must be a folder or a mapping of path in repo -> bytes or file (got {folder}).")
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and ".cache" not in path.relative_to(folder).parts
    }


def write_hub_cache(
    files: str | os.PathLike | Mapping[str, bytes | str | os.PathLike],
    repo_id: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    repo_type: str = "model",
    revision: str = "main",
    commit_hash: str | None = None,
) -> Path:
    """Store `files` as the snapshot that `revision` of `repo_id` points at in the Hub cache; returns the snapshot.

    Args:
        files: a folder (every file under it, sub-folders included) or a mapping `{path_in_repo: bytes or path}`,
            e.g. the `CommitOperationAdd`s captured from a patched `HfApi.create_commit`.
        repo_id: `"org/name"`.
        cache_dir: the Hub cache; defaults to the `HF_HUB_CACHE` that `huggingface_hub` read at import.
        repo_type: `"model"`, `"dataset"` or `"space"`.
        revision: the ref to point at the snapshot (`"main"` unless testing branches).
        commit_hash: the snapshot's 40-hex commit; by default derived from the contents, so the same files give
            the same commit. Writing a repo again replaces that snapshot and moves the ref.
    """
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"`repo_type` must be one of {_REPO_TYPES} (got {repo_type!r}).")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"`repo_id` must look like 'org/name' (got {repo_id!r}).")
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    contents = _read_files(files)
    if not contents:
        raise ValueError(f"Nothing to write for {repo_id!r}: `files` holds no file.")
    if commit_hash is None:
        digest = hashlib.sha1()
        for path_in_repo in sorted(contents):
            digest.update(path_in_repo.encode() + b"\0" + hashlib.sha256(contents[path_in_repo]).digest())
        commit_hash = digest.hexdigest()
    if len(commit_hash) != 40 or any(char not in "0123456789abcdef" for char in commit_hash):
        raise ValueError(f"`commit_hash` must be 40 lower-case hex digits (got {commit_hash!r}).")

    repo_dir = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit_hash
    if snapshot.exists():
        shutil.rmtree(snapshot)
    blobs.mkdir(parents=True, exist_ok=True)
    for path_in_repo, data in contents.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        target = snapshot / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:  # no symlinks (e.g. Windows without developer mode): huggingface_hub then copies too
            shutil.copyfile(blob, target)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit_hash)
    return snapshot
