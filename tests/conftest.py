"""Test session set-up: no network, an empty Hub cache, offline Hugging Face libraries, and tiny configs.

`huggingface_hub` reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so they are set here, before any
test module imports it.
"""

import os
import socket
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

import pytest  # noqa: E402
import torch  # noqa: E402

from vqrae.presets import QUANTIZER_PRESETS  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

_LOOPBACK = ("127.", "::1", "localhost")


class NetworkBlockedError(RuntimeError):
    pass


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = str(address[0]) if address else ""
    return host.startswith(_LOOPBACK) or host == ""


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_create_connection = socket.create_connection


def _guarded_connect(self, address):
    if not _is_local(address):
        raise NetworkBlockedError(f"Tests may not reach the network (tried to connect to {address!r}).")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise NetworkBlockedError(f"Tests may not reach the network (tried to connect to {address!r}).")
    return _real_connect_ex(self, address)


def _guarded_create_connection(address, *args, **kwargs):
    if not _is_local(address):
        raise NetworkBlockedError(f"Tests may not reach the network (tried to connect to {address!r}).")
    return _real_create_connection(address, *args, **kwargs)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_local((host,)):
        raise NetworkBlockedError(f"Tests may not reach the network (tried to resolve {host!r}).")
    return _real_getaddrinfo(host, *args, **kwargs)


_real_getaddrinfo = socket.getaddrinfo
socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.create_connection = _guarded_create_connection
socket.getaddrinfo = _guarded_getaddrinfo

# Processes that tests start (CLIs, `accelerate launch`, the kill tests) get the same block from a sitecustomize.py
# on PYTHONPATH, installed when their interpreter starts. The machine's own host name counts as local there, since
# torchrun resolves it to set up its rendezvous.
_SUBPROCESS_GUARD = """
import socket

_LOCAL_PREFIXES = ("127.", "::1", "localhost")
_HOST_NAME = socket.gethostname()


class NetworkBlockedError(RuntimeError):
    pass


def _is_local(address):
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = str(address[0]) if address else ""
    return host in ("", _HOST_NAME) or host.startswith(_LOCAL_PREFIXES)


def _guard(real, action, target_of):
    def guarded(*args, **kwargs):
        target = target_of(*args, **kwargs)
        if target is not None and not _is_local(target):
            raise NetworkBlockedError(f"Tests may not reach the network (tried to {action} {target!r}).")
        return real(*args, **kwargs)

    return guarded


socket.socket.connect = _guard(socket.socket.connect, "connect to", lambda self, address, *a, **k: address)
socket.socket.connect_ex = _guard(socket.socket.connect_ex, "connect to", lambda self, address, *a, **k: address)
socket.create_connection = _guard(socket.create_connection, "connect to", lambda address, *a, **k: address)
socket.getaddrinfo = _guard(socket.getaddrinfo, "resolve", lambda host, *a, **k: None if host is None else (host,))
"""
_GUARD_DIR = os.path.join(_SESSION_DIR, "network_guard")
os.makedirs(_GUARD_DIR, exist_ok=True)
with open(os.path.join(_GUARD_DIR, "sitecustomize.py"), "w") as _guard_file:
    _guard_file.write(_SUBPROCESS_GUARD)
os.environ["PYTHONPATH"] = os.pathsep.join(path for path in (_GUARD_DIR, os.environ.get("PYTHONPATH")) if path)


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
    from vqrae.training.args import parse_args
    from vqrae.training.trainer import train

    return train(*parse_args(argv))


def records(output_dir, kind="train"):
    import json

    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == kind]


def photo_folder(folder, count: int, size: int = 48, seed: int = 0, start: int = 0):
    """`count` PNG files of real photos in `folder` (crops of the built-in training photos), named
    `photo_{start + i:03d}.png`. Returns the folder."""
    import numpy as np

    from vqrae.image_data import builtin_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = builtin_photos("train")
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = photos[int(rng.integers(len(photos)))]["image"].convert("RGB")
        left, top = int(rng.integers(image.width - size)), int(rng.integers(image.height - size))
        image.crop((left, top, left + size, top + size)).save(folder / f"photo_{start + i:03d}.png")
    return folder
