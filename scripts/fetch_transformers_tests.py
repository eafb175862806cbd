"""Fetch transformers' common model tests for tests/test_transformers_common.py.

transformers ships the tests every model of its own must pass (`tests/test_modeling_common.py`,
`tests/test_configuration_common.py`) in its source distribution. This script downloads the sdist of the installed
transformers version from the package index (`pip download --no-binary :all:`) and extracts its `tests/` folder into
`.transformers-tests/transformers_tests/` (git-ignored: transformers' tests are never copied into this repository).
Run again, it does nothing while the folder matches the installed version.

The sdist leaves out three modules the common tests import for features VQRAE does not have; the script writes an
empty stand-in for each (see `STAND_INS`), so the tests that need them are simply absent:
- `exporters/test_export.py`: `ExportTesterMixin`, the `torch.export` tests `ModelTesterMixin` inherits;
- `generation/test_utils.py`: `GenerationTesterMixin`, the `generate()` tests (VQRAE generates nothing);
- `utils/test_configuration_utils.py`: `config_common_kwargs`, read only for configs without sub-configs (VQRAE's
  has one).

    python scripts/fetch_transformers_tests.py
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESTINATION = ROOT / ".transformers-tests"
PACKAGE = "transformers_tests"  # not `tests`: that name is this repository's own test folder
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}
STAND_IN_NOTE = (
    '"""Stand-in written by scripts/fetch_transformers_tests.py: the transformers sdist lacks this module."""\n\n'
)


def fetch(version: str, destination: Path = DESTINATION) -> Path:
    """Extract the `tests/` of transformers `version`'s sdist into `destination / PACKAGE`; return that folder."""
    package = destination / PACKAGE
    marker = package / "VERSION"
    if marker.is_file() and marker.read_text().strip() == version:
        return package
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"transformers=={version}",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-q",
                "-d",
                download,
            ],
            check=True,
        )
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        staging = Path(tempfile.mkdtemp(dir=destination.parent if destination.parent.exists() else None))
        try:
            with tarfile.open(archive) as tar:
                prefix = f"transformers-{version}/tests/"
                members = [member for member in tar.getmembers() if member.name.startswith(prefix)]
                for member in members:
                    member.name = member.name[len(prefix) :]
                # Plain files and folders inside the folder only; Python before 3.11.4 has no extraction filters,
                # so the members are screened here as well.
                safe = [
                    member
                    for member in members
                    if member.name
                    and (member.isfile() or member.isdir())
                    and not member.name.startswith("/")
                    and ".." not in Path(member.name).parts
                ]
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=safe, filter="data")
                else:
                    tar.extractall(staging, members=safe)
            for name, text in STAND_INS.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    path.write_text(STAND_IN_NOTE + text)
            for folder in [staging, *(path for path in staging.rglob("*") if path.is_dir())]:
                (folder / "__init__.py").touch()
            (staging / "VERSION").write_text(version + "\n")
            destination.mkdir(exist_ok=True)
            shutil.rmtree(package, ignore_errors=True)
            staging.rename(package)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return package


if __name__ == "__main__":
    print(fetch(importlib.metadata.version("transformers")))
