"""Option groups that several tools and the training share, as dataclasses for `transformers.HfArgumentParser`
(where the model comes from, where the images come from, how they are computed), the checks they run, and which
process of a multi-process launch speaks for the others. Bad values raise `vqrae.errors.UsageError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from . import configuration_vqrae
from .errors import UsageError

__all__ = [
    "ComputeArguments",
    "ImageSourceArguments",
    "ModelSourceArguments",
    "check_at_least",
    "check_output_dir",
    "default_num_workers",
    "is_main_process",
]


def check_at_least(name: str, value, minimum: int, optional: bool = False) -> None:
    """The config's integer range check (`configuration_vqrae.check_at_least`) of the option `--name`, as a
    `UsageError`."""
    try:
        configuration_vqrae.check_at_least(f"--{name}", value, minimum, optional)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_output_dir(output_dir: str) -> None:
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UsageError(f"`--output_dir` must be a folder (got {output_dir!r}, which is a file).")


@dataclass(kw_only=True)
class ModelSourceArguments:
    """Which trained VQRAE model a tool runs."""

    model: str = field(metadata={"help": "A VQRAE model: a local folder or a Hub id."})
    revision: str | None = field(default=None, metadata={"help": "Revision of `--model` on the Hub."})


@dataclass(kw_only=True)
class ImageSourceArguments:
    """Where the images come from: a `datasets` dataset (a Hub id or a local dataset folder; by default the built-in
    photos where a tool has them). Each tool adds its folder option and split."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` Hub id or local dataset folder ('builtin:photos': the built-in photos; "
            "'builtin:photos+colour': with two synthetic colour images among the training photos)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Data files of --dataset_name, passed to `datasets.load_dataset` (paths or globs; `{a..b}` "
            "ranges and `{x,y}` lists are expanded), e.g. `--dataset_name webdataset --data_files "
            "'shards/{00000..00999}.tar'` for tar shards of key.jpg members."
        },
    )
    dataset_revision: str | None = field(default=None, metadata={"help": "The dataset's revision (branch, commit)."})
    image_column: str | None = field(
        default=None, metadata={"help": "The column holding the images (default: the dataset's only Image column)."}
    )
    streaming: bool = field(
        default=False, metadata={"changes_tokens": False, "help": "Stream the dataset instead of downloading it."}
    )
    # How this tool's command line chooses a split (named when a split is missing).
    SPLIT_OPTION: ClassVar[str] = "--split"

    def source_kwargs(self) -> dict:
        """These options as the keyword arguments of `vqrae.image_data.load_image_dataset`."""
        return {
            "dataset_name": self.dataset_name,
            "dataset_config_name": self.dataset_config_name,
            "data_files": self.data_files,
            "revision": self.dataset_revision,
            "image_column": self.image_column,
            "streaming": self.streaming,
            "split_option": self.SPLIT_OPTION,
        }


def default_num_workers() -> int:
    """DataLoader workers by default: half the CPUs (the other half runs the model on a CPU machine), 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass(kw_only=True)
class ComputeArguments:
    """How the images are pushed through the model."""

    batch_size: int = field(default=32, metadata={"help": "Images per forward pass (per process)."})
    dataloader_num_workers: int = field(
        default_factory=default_num_workers,
        metadata={
            "changes_tokens": False,
            "help": "Processes that decode and prepare images while the model encodes (default: half the CPUs, "
            "1 to 4; 0: in the main process). The order of the images does not depend on it.",
        },
    )

    def __post_init__(self):
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("dataloader_num_workers", self.dataloader_num_workers, 0)


def is_main_process() -> bool:
    """Whether this is the main process (rank 0) of a run launched in several processes, or the only one."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
