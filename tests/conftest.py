"""Test session set-up: no network, an empty Hub cache, offline Hugging Face libraries, and tiny configs.

`huggingface_hub` reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so they are set here, before any
test module imports it.
"""

import os
import runpy
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="vqrae-tests-")
os.environ["HF_HOME"] = os.path.join(_SESSION_DIR, "hf_home")
os.environ["HF_HUB_CACHE"] = os.path.join(_SESSION_DIR, "hub")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_SESSION_DIR, "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The network guard: one file, run here for this process and imported as `sitecustomize` by every process tests start.
_GUARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "network_guard")
NetworkBlockedError = runpy.run_path(os.path.join(_GUARD_DIR, "sitecustomize.py"))["NetworkBlockedError"]
os.environ["PYTHONPATH"] = os.pathsep.join(path for path in (_GUARD_DIR, os.environ.get("PYTHONPATH")) if path)

import pytest  # noqa: E402
import torch  # noqa: E402

from vqrae.presets import QUANTIZER_PRESETS  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------------------------------------------------------
# Tiny configurations (hidden 32, 2 layers, 4 heads, odd intermediate size 37 to expose shape bugs)
# ---------------------------------------------------------------------------------------------------------------

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}

# The quantizers of the seed's three configurations (vqrae.presets, as training and the benchmarks use them).
SEED_PRESETS = QUANTIZER_PRESETS


def tiny_config_kwargs(**overrides) -> dict:
    kwargs = {"vision_config": dict(TINY_VISION), "decoder_intermediate_size": 37}
    kwargs.update(overrides)
    return kwargs


def tiny_config(**overrides):
    from vqrae import VQRAEConfig

    return VQRAEConfig(**tiny_config_kwargs(**overrides))


def tiny_model(seed: int = 0, **overrides):
    from vqrae import VQRAEModel

    torch.manual_seed(seed)
    return VQRAEModel(tiny_config(**overrides))


@pytest.fixture(scope="session")
def session_dir():
    return _SESSION_DIR


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """`(wheel, site)`: vqrae built as a wheel from this checkout and installed into the folder `site` (put it on
    PYTHONPATH to run the installed package, away from the checkout's `src/` and top-level folders)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not run from a source checkout")
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    shutil.copy(root / "pyproject.toml", source)
    shutil.copy(root / "README.md", source)
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "wheel"), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (work / "wheel").glob("vqrae-*.whl")
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(work / "site"), str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    return wheel, work / "site"


# ---------------------------------------------------------------------------------------------------------------
# Training runs in this process
# ---------------------------------------------------------------------------------------------------------------

# A tiny model (conftest's TINY_VISION) on 32-px crops of the built-in photos, evaluated on 8 validation images.
TINY_SIZE_ARGS = [
    *(item for key, value in TINY_VISION.items() for item in (f"--{key}", str(value))),
    "--decoder_intermediate_size", "37",
]  # fmt: skip
TINY_RUN_ARGS = [
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "8",
    "--max_eval_samples", "8",
    "--num_reconstructions", "4",
    "--warmup_steps", "1",
    "--logging_steps", "1",
    "--dataloader_num_workers", "0",
    "--disable_tqdm",
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each training run builds its own Accelerator (mixed precision differs between presets)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run(output_dir, *extra, config=None, max_steps=2, sizes=True):
    """Train in this process; `sizes=False` leaves the model size to --init_from."""
    argv = ([] if config is None else ["--config", config]) + (TINY_SIZE_ARGS if sizes else [])
    argv += [*TINY_RUN_ARGS, "--output_dir", str(output_dir)]
    argv += ["--max_steps", str(max_steps), "--eval_steps", "100", "--save_steps", "100", *extra]
    from vqrae.cli.train import parse_train_args
    from vqrae.training.trainer import train

    return train(*parse_train_args(argv))


def records(output_dir, kind="train"):
    import json

    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == kind]


def photo_folder(folder, count: int, size: int = 48, seed: int = 0, start: int = 0):
    """`count` PNG files of real photos in `folder` (crops of the built-in training photos), named
    `photo_{start + i:03d}.png`. Returns the folder."""
    import numpy as np

    from vqrae.builtin_photos import builtin_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = builtin_photos("train")
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = photos[int(rng.integers(len(photos)))]["image"].convert("RGB")
        left, top = int(rng.integers(image.width - size)), int(rng.integers(image.height - size))
        image.crop((left, top, left + size, top + size)).save(folder / f"photo_{start + i:03d}.png")
    return folder


def save_model(model, folder, **kwargs) -> None:
    """Save a model as vqrae-train does: weights, model code and image processor, in one atomic write."""
    from vqrae.atomic_io import save_pretrained_atomic

    save_pretrained_atomic(model, folder, model.get_image_processor(), **kwargs)
