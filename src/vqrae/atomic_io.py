"""Writing files and folders so that a process killed at any moment leaves the old version or the new one, never a
mix, and so that what was written survives a power cut (fsync).

- `atomic_write(path, data)`: text or bytes, through a hidden temporary file in the same folder and one rename;
- `atomic_file(path)`: the same for writers that want a path (`pyarrow.parquet.write_table`, `savefig`, ...);
- `atomic_folder(target, keep=...)`: a whole folder (a saved model), written into a hidden sibling folder that then
  takes `target`'s place in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames);
- `save_pretrained_atomic(model, folder, *others)`: `save_pretrained` of a model (and, e.g., its image processor)
  through `atomic_folder`.

Every file written through them gets the mode a plain `open(path, "w")` gives (0o666 less the umask): some writers
(safetensors' `save_file`) create their files 0600, which would hide the weights from other users of the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator

__all__ = [
    "STAGING_MARK",
    "atomic_file",
    "atomic_folder",
    "atomic_write",
    "save_pretrained_atomic",
    "set_default_mode",
]

STAGING_MARK = ".vqrae-staging-"
_AT_FDCWD = -100
# Weight files that `save_pretrained` itself replaces; a new save never keeps stale ones.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
_RENAME_EXCHANGE = 2


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (changing it, even briefly, races with
    other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Give a freshly written file the mode a plain `open()` would have: 0o666 less the umask."""
    os.chmod(path, 0o666 & ~_umask())


def _finish_file(path: str) -> None:
    set_default_mode(path)
    _fsync(path)


def _fsync_folder(folder: str) -> None:
    """Make a rename inside `folder` durable (where the platform can open a folder)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a hidden temporary path next to `path`; once the block has written it, flush it to disk and rename it
    to `path` in one step. If the block raises, `path` is untouched and the temporary file is removed."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        yield temporary
        _finish_file(temporary)
        os.replace(temporary, path)
        _fsync_folder(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write `data` (text or bytes) to `path` atomically and durably."""
    with atomic_file(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data.encode(encoding) if isinstance(data, str) else data)


# ---------------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, keep: Callable[[str], bool] = lambda name: True) -> Iterator[str]:
    """Yield an empty hidden sibling folder of `target` to write into; once the block is done, its files get the mode
    `open()` gives, are flushed to disk, and the folder takes `target`'s place in one step. Entries of the old
    `target` that the block did not write are carried over when `keep(name)` is true (a model card, logs,
    checkpoints), so the swap loses nothing else. If the block raises, `target` is untouched. Staging folders of
    earlier, killed writes are removed first."""
    target = os.path.realpath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent, name)
    staging = os.path.join(parent, f".{name}{STAGING_MARK}{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(staging)
    try:
        yield staging
        for entry in os.scandir(staging):
            if entry.is_file(follow_symlinks=False):
                _finish_file(entry.path)
        _move_into_place(staging, target, keep)
        _fsync_folder(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_pretrained_atomic(model, folder: str | os.PathLike, *others, **kwargs) -> None:
    """`model.save_pretrained(folder, **kwargs)`, then `save_pretrained(folder)` of each of `others` (a model's
    image processor), as one atomic write: a save killed at any moment leaves either the old model or the new one,
    never a mix. Other files already in `folder` (a model card, logs, checkpoints) are kept; stale weight files are
    dropped, as `save_pretrained` does. To push to the Hub, save first, then upload the folder."""
    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained_atomic writes a local folder; push it to the Hub after saving.")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"Cannot save a model into {os.fspath(folder)!r}: it is a file, not a folder.")
    with atomic_folder(folder, keep=lambda name: not _WEIGHT_FILE.fullmatch(name)) as staging:
        model.save_pretrained(staging, **kwargs)
        for other in others:
            other.save_pretrained(staging)


def _remove_leftovers(parent: str, name: str) -> None:
    """Delete the staging folders of earlier writes into `parent/name` that were killed before they finished."""
    prefix = f".{name}{STAGING_MARK}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _exchange(first: str, second: str) -> bool:
    """Swap two folders in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), first, None, second)


def _move_into_place(staging: str, target: str, keep: Callable[[str], bool]) -> None:
    """Make `staging` become `target`. `staging` first receives hard links (copies where links are impossible) to
    what `target` holds that `staging` lacks and `keep` accepts. The swap itself is one atomic exchange of the two
    folders on Linux; elsewhere it is two renames, and a process killed between them leaves the old folder in the
    hidden `.<name>.vqrae-staging-*` sibling until the next write. `staging` ends up holding the old folder."""
    if not os.path.isdir(target):
        os.rename(staging, target)
        return
    os.chmod(staging, os.stat(target).st_mode & 0o7777)
    for entry in os.scandir(target):
        destination = os.path.join(staging, entry.name)
        if os.path.lexists(destination) or not keep(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, destination)
    if not _exchange(staging, target):
        parked = f"{staging}-old"
        os.rename(target, parked)
        os.rename(staging, target)
        os.rename(parked, staging)
