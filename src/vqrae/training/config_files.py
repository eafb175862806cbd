"""The YAML files of `vqrae-train`'s options: the presets shipped in `vqrae/configs/` (or any file) that `--config`
reads, and the `training_config.yaml` a run writes, from which `vqrae-train --config` trains it again."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from importlib import resources
from pathlib import Path

import yaml

from ..atomic_io import atomic_write
from ..errors import UsageError

__all__ = ["load_config_file", "preset_config_dir", "read_training_config", "write_training_config"]

TRAINING_CONFIG_HEADER = (
    "Every option of this run, resolved. `vqrae-train --config training_config.yaml --output_dir NEW_DIR`",
    "trains it again (same seed, same data, same weights on CPU float32).",
)


def preset_config_dir() -> Path:
    """The YAML presets, shipped inside the package (`vqrae/configs/`; the repository's `configs/` links to it)."""
    return Path(str(resources.files("vqrae").joinpath("configs")))


def _resolve_config_path(config: str) -> Path:
    path = Path(config)
    if path.is_file():
        return path
    folder = preset_config_dir()
    presets = sorted(p.stem for p in folder.glob("*.yaml"))
    if config in presets:
        return folder / f"{config}.yaml"
    raise UsageError(f"`config` must be a YAML file or the name of a preset (got {config!r}; presets: {presets}).")


def load_config_file(config: str, option_names: Collection[str]) -> dict:
    """The options of a YAML config file (a path, or a preset name such as `cosmos_fsq`), each of which must be one
    of `option_names` (`vqrae.training.args.OPTION_NAMES`)."""
    path = _resolve_config_path(config)
    with open(path, encoding="utf-8") as handle:
        try:
            options = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"The config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(options, dict):
        raise UsageError(f"The config file {str(path)!r} must hold a mapping of option names to values.")
    unknown = sorted(set(options) - set(option_names))
    if unknown:
        raise UsageError(f"The config file {str(path)!r} has unknown options {unknown}.")
    return options


def write_training_config(path: str, options: dict, notes: Sequence[str] = ()) -> None:
    """Write the options of a run, as given, to `training_config.yaml`, from which `vqrae-train --config` trains it
    again; `notes` (what was derived from them, how a resume extended the run) become comment lines."""
    header = "".join(f"# {line}\n" for line in (*TRAINING_CONFIG_HEADER, *notes))
    atomic_write(path, header + yaml.safe_dump(options, sort_keys=False))


def read_training_config(path: str) -> tuple[dict, list[str]]:
    """The options of a `training_config.yaml` and the notes written with them."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    comments = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    return yaml.safe_load(text) or {}, comments[len(TRAINING_CONFIG_HEADER) :]
