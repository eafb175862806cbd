"""Nothing leaves the machine and nothing unsafe is loaded.

- The test session refuses outgoing connections (tests/conftest.py), in this process and in the processes tests
  start, so a test that would reach the Hub fails at once instead of hanging or quietly passing.
- The three model files, which travel to the Hub for `trust_remote_code` users, import only the standard library,
  torch, transformers and each other (`from .x import Y`).
- No code under src/ unpickles anything: every `torch.load` passes `weights_only=True`; no pickle, `np.load(...,
  allow_pickle=True)`, `yaml.load` or accelerate custom checkpoint objects (which accelerate reloads with
  `weights_only=False`).
- Model weights are written and read as safetensors only: a pickled `pytorch_model.bin` is never opened.
"""

import ast
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
import torch

from conftest import NetworkBlockedError, save_model, tiny_model
from vqrae import VQRAEModel

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vqrae"
MODEL_FILES = ("configuration_vqrae.py", "decoder.py", "modeling_vqrae.py", "quantizers.py")
OUTSIDE = ("93.184.216.34", 443)  # a public address; never reached

# ---------------------------------------------------------------------------------------------------------------
# No network
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(lambda: socket.create_connection(OUTSIDE, timeout=3), id="create_connection"),
        pytest.param(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(OUTSIDE), id="connect"),
        pytest.param(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect_ex(OUTSIDE), id="connect_ex"),
        pytest.param(lambda: socket.getaddrinfo("huggingface.co", 443), id="getaddrinfo"),
        pytest.param(lambda: urllib.request.urlopen("https://huggingface.co/api/models", timeout=3), id="urllib"),
    ],
)
def test_outgoing_connections_are_refused(attempt):
    socket.setdefaulttimeout(3)  # without the block this fails after 3 s at most, never hangs
    try:
        with pytest.raises(NetworkBlockedError, match="Tests may not reach the network"):
            attempt()
    finally:
        socket.setdefaulttimeout(None)


def test_loopback_stays_open():
    # Local servers (gloo's store, a test's own HTTP server) must keep working.
    server = socket.create_server(("127.0.0.1", 0))
    try:
        with socket.create_connection(server.getsockname(), timeout=3):
            connection, _ = server.accept()
            connection.close()
    finally:
        server.close()


def test_processes_started_by_tests_are_blocked_too():
    script = (
        "import socket\n"
        "socket.setdefaulttimeout(3)\n"
        "server = socket.create_server(('127.0.0.1', 0)); socket.create_connection(server.getsockname()).close()\n"
        "try:\n"
        f"    socket.create_connection({OUTSIDE!r})\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.startswith("NetworkBlockedError Tests may not reach the network"), run.stdout + run.stderr


def test_hugging_face_libraries_are_offline_with_an_empty_cache(session_dir):
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).is_relative_to(session_dir)
    with pytest.raises(OSError, match="google/siglip-base-patch16-224"):
        VQRAEModel.from_encoder_pretrained("google/siglip-base-patch16-224")


# ---------------------------------------------------------------------------------------------------------------
# The model files import only the standard library, torch and transformers
# ---------------------------------------------------------------------------------------------------------------


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.level, node.module or ""


@pytest.mark.parametrize("filename", MODEL_FILES)
def test_model_files_import_only_stdlib_torch_transformers(filename):
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    siblings = {name.removesuffix(".py") for name in MODEL_FILES}
    found = list(_imports(SRC / filename))
    assert found, "the AST walk found no imports: the check would prove nothing"
    for line, level, module in found:
        if level:
            # Only `from .sibling import Name`: other relative forms break `trust_remote_code` loading.
            assert level == 1 and module in siblings, f"{filename}:{line}: `from {'.' * level}{module} import ...`"
        else:
            assert module.split(".")[0] in allowed, f"{filename}:{line} imports {module!r}"


def test_saved_model_folder_holds_the_model_files_and_safetensors_only(tmp_path):
    save_model(tiny_model(0), tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert [name for name in names if name.endswith(".py")] == sorted(MODEL_FILES)
    assert "model.safetensors" in names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


# ---------------------------------------------------------------------------------------------------------------
# Nothing is unpickled
# ---------------------------------------------------------------------------------------------------------------


def _call_name(node: ast.Call) -> str:
    parts, target = [], node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name):
        parts.append(target.id)
    return ".".join(reversed(parts))


def _keyword_is(node: ast.Call, name: str, value) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value for kw in node.keywords
    )


def _unsafe_loads(source: str, filename: str) -> list[str]:
    found = []
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [alias.name for alias in node.names]
            if any(
                m.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib") for m in modules
            ):
                found.append(f"{filename}:{node.lineno} imports a pickle library")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in names:
                found.append(f"{filename}:{node.lineno} imports torch.load by name (its calls cannot be checked)")
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        where = f"{filename}:{node.lineno}"
        if name.endswith("torch.load") or name == "torch.serialization.load":
            if not _keyword_is(node, "weights_only", True):
                found.append(f"{where} calls {name} without weights_only=True")
        elif name in ("np.load", "numpy.load") and _keyword_is(node, "allow_pickle", True):
            found.append(f"{where} calls {name} with allow_pickle=True")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{where} calls {name} (use yaml.safe_load)")
        elif name.endswith("register_for_checkpointing"):
            found.append(
                f"{where} registers a custom checkpoint object, which accelerate reloads with "
                "torch.load(weights_only=False): save its state yourself (safetensors, JSON, or torch.save + "
                "torch.load(weights_only=True))"
            )
    return found


def test_the_unsafe_load_scanner_finds_what_it_looks_for():
    bad = (
        "import torch, pickle, yaml\nimport numpy as np\nfrom torch import load\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\nyaml.load(f)\n"
        "accelerator.register_for_checkpointing(state)\n"
    )
    good = (
        "import torch, yaml\nimport numpy as np\ntorch.load('x', weights_only=True)\nnp.load('x')\nyaml.safe_load(f)\n"
    )
    assert len(_unsafe_loads(bad, "bad.py")) == 7
    assert _unsafe_loads(good, "good.py") == []


def test_nothing_under_src_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 4
    found = [problem for path in files for problem in _unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_a_pickled_weights_file_is_never_opened(tmp_path):
    # A pytorch_model.bin whose unpickling would create a file: loading must refuse it without unpickling it.
    save_model(tiny_model(0), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"decoder.norm.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        VQRAEModel.from_pretrained(tmp_path)
    assert not marker.exists()
