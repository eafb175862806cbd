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

SEED_PRESETS = {
    "cosmos_fsq": {"use_fsq": True, "fsq_levels": [8, 8, 8, 5, 5, 5], "use_post_quant_conv": True,
                   "post_quant_conv_kernel_size": 1},
    "standard_fsq": {"use_fsq": True, "fsq_levels": [8, 8, 8], "use_post_quant_conv": False},
    "vq": {"use_fsq": False, "num_embeddings": 16384},
}


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
