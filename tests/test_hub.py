"""Publishing: the exact files of one commit, a push -> Hub cache -> load round trip offline, fail-fast errors."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from conftest import save_model, tiny_model
from hub_cache import write_hub_cache
from test_model_card import make_run_folder, picture_links, quickstart_code
from vqrae.cli import push as push_cli
from vqrae.training import hub
from vqrae.training.hub import HubPublishError, push_to_hub
from vqrae.training.model_card import render_model_card

REPO_ID = "org/vqrae-tiny"
PUBLISHED = {
    "README.md",
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "configuration_vqrae.py",
    "decoder.py",
    "modeling_vqrae.py",
    "quantizers.py",
    "eval_results.json",
    "training_config.yaml",
    "reconstructions.png",
    "training_curves.png",
    "codebook_usage.png",
}


class FakeHub:
    """Stands in for the three `HfApi` calls that write to the Hub and records what they were sent."""

    def __init__(self):
        self.repos, self.branches, self.commits, self.commit_urls = [], [], [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, api, repo_id, **kwargs):
        self.branches.append({"repo_id": repo_id, **kwargs})

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            with operation.as_file() as file:
                files[operation.path_in_repo] = file.read()
        oid = hashlib.sha1(b"".join(files[name] for name in sorted(files))).hexdigest()
        self.commits.append({"repo_id": repo_id, "files": files, "token": api.token, **kwargs})
        self.commit_urls.append(f"https://huggingface.co/{repo_id}/commit/{oid}")
        return CommitInfo(
            commit_url=self.commit_urls[-1],
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid=oid,
        )


@pytest.fixture
def fake_hub(monkeypatch):
    fake = FakeHub()
    for name in ("create_repo", "create_branch", "create_commit"):
        method = getattr(fake, name)
        monkeypatch.setattr(HfApi, name, lambda api, *args, _method=method, **kwargs: _method(api, *args, **kwargs))
    return fake


@pytest.fixture
def online(monkeypatch):
    """What a logged-in user has: offline mode off (huggingface_hub read it at import) and a token."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = make_run_folder(tmp_path_factory.mktemp("hub") / "vqrae-run")
    (folder / "README.md").write_text("a stale card that must not be published\n")
    (folder / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint_0" / "model.safetensors").write_bytes(b"not published")
    return folder


def test_push_sends_one_commit_with_exactly_the_model_files(run_folder, fake_hub, online):
    info = push_to_hub(run_folder, REPO_ID)
    assert info.commit_url == fake_hub.commit_urls[0]
    assert fake_hub.repos == [{"repo_id": REPO_ID, "private": False, "exist_ok": True, "repo_type": "model"}]
    assert fake_hub.branches == []
    (commit,) = fake_hub.commits
    assert set(commit["files"]) == PUBLISHED
    assert commit["revision"] is None and commit["token"] == "hf_test_token"
    assert commit["commit_message"] == "Upload VQRAE tokenizer (13 files) with vqrae-push"
    for name in PUBLISHED - {"README.md"}:
        assert commit["files"][name] == (run_folder / name).read_bytes(), name
    card = commit["files"]["README.md"].decode()
    assert card == render_model_card(run_folder, repo_id=REPO_ID).content
    links = picture_links(card)
    assert links == ["reconstructions.png", "training_curves.png", "codebook_usage.png"]
    assert set(links) <= set(commit["files"])


def test_pushed_repo_loads_offline_from_the_hub_cache_with_and_without_vqrae(run_folder, fake_hub, online, tmp_path):
    """Push, copy what was sent into a Hub cache, and load `org/name` in a fresh offline process: first with
    trust_remote_code and vqrae blocked, then through `import vqrae`; both reconstruct like the model here."""
    push_to_hub(run_folder, REPO_ID)
    cache = tmp_path / "hub"
    write_hub_cache(fake_hub.commits[0]["files"], REPO_ID, cache)

    model = AutoModel.from_pretrained(run_folder).eval()
    pixel_values = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        output = model(pixel_values)
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel

        pixel_values = load_file({str(tmp_path / "inputs.safetensors")!r})["pixel_values"]
        sys.modules["vqrae"] = None  # the Hub's copy of the code must be enough
        remote = AutoModel.from_pretrained({REPO_ID!r}, trust_remote_code=True)
        assert type(remote).__module__.startswith("transformers_modules"), type(remote).__module__
        del sys.modules["vqrae"]
        import vqrae
        native = AutoModel.from_pretrained({REPO_ID!r})
        assert type(native) is vqrae.VQRAEModel, type(native)
        outputs = {{}}
        with torch.no_grad():
            for name, model in (("remote", remote), ("native", native)):
                indices = model.encode(pixel_values).indices
                outputs[name + "_indices"] = indices
                outputs[name] = model.decode_from_indices(indices).reconstruction
        save_file(outputs, {str(tmp_path / "outputs.safetensors")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = load_file(tmp_path / "outputs.safetensors")
    for name in ("remote", "native"):
        assert torch.equal(loaded[name + "_indices"], output.indices)
        torch.testing.assert_close(loaded[name], output.reconstruction, rtol=0, atol=1e-6)


def test_card_quickstart_runs_against_the_published_repo(run_folder, fake_hub, online, tmp_path):
    push_to_hub(run_folder, REPO_ID)
    files = fake_hub.commits[0]["files"]
    cache = tmp_path / "hub"
    write_hub_cache(files, REPO_ID, cache)
    code = quickstart_code(files["README.md"].decode())
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in code
    Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8)).save(tmp_path / "image.jpg")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "reconstruction.png").size == (32, 32)


def test_private_repo_on_a_branch_and_sharded_weights(tmp_path, fake_hub, online):
    folder = tmp_path / "sharded"
    save_model(tiny_model(0), folder, max_shard_size="100KB")
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) >= 2
    push_to_hub(folder, REPO_ID, private=True, revision="dev", token="hf_explicit", commit_message="tokenizer v2")
    assert fake_hub.repos[0]["private"] is True
    assert fake_hub.branches == [{"repo_id": REPO_ID, "branch": "dev", "exist_ok": True, "repo_type": "model"}]
    (commit,) = fake_hub.commits
    assert commit["revision"] == "dev" and commit["token"] == "hf_explicit"
    assert commit["commit_message"] == "tokenizer v2"
    assert set(commit["files"]) == {
        "README.md",
        "config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
        *shards,
        "configuration_vqrae.py",
        "decoder.py",
        "modeling_vqrae.py",
        "quantizers.py",
    }


# -- failing fast ----------------------------------------------------------------------------------------------------


def test_offline_fails_at_once_and_sends_nothing(run_folder, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert constants.HF_HUB_OFFLINE  # conftest turns offline mode on
    with pytest.raises(HubPublishError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\).*Unset it"):
        push_to_hub(run_folder, REPO_ID, token="hf_explicit")
    # Set after huggingface_hub was imported, the variable is still honoured.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPublishError, match="nothing was uploaded"):
        push_to_hub(run_folder, REPO_ID)
    assert fake_hub.repos == fake_hub.branches == fake_hub.commits == []


def test_no_token_fails_at_once_and_sends_nothing(run_folder, fake_hub, online, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPublishError, match=r"no token found.*`hf auth login`.*HF_TOKEN"):
        push_to_hub(run_folder, REPO_ID)
    assert fake_hub.repos == fake_hub.commits == []


def test_bad_folder_or_arguments_are_named(run_folder, tmp_path, fake_hub, online):
    folder = tmp_path / "no_code"
    save_model(tiny_model(0), folder)
    (folder / "quantizers.py").unlink()
    with pytest.raises(ValueError, match=r"lacks \['quantizers.py'\].*save_pretrained"):
        push_to_hub(folder, REPO_ID)
    with pytest.raises(ValueError, match="not a folder"):
        push_to_hub(tmp_path / "missing", REPO_ID)
    with pytest.raises(ValueError, match="`repo_id` must be a Hub repository id"):
        push_to_hub(run_folder, "org/bad name")
    with pytest.raises(TypeError, match="`private` must be a bool"):
        push_to_hub(run_folder, REPO_ID, private="yes")
    assert fake_hub.repos == fake_hub.commits == []


# -- the command line ------------------------------------------------------------------------------------------------


def test_cli_publishes_and_prints_the_commit_url(run_folder, fake_hub, online, capsys):
    assert push_cli.main([str(run_folder), "--repo-id", REPO_ID, "--private", "--revision", "dev"]) == 0
    (commit,) = fake_hub.commits
    assert set(commit["files"]) == PUBLISHED and commit["revision"] == "dev"
    assert fake_hub.repos[0]["private"] is True
    assert capsys.readouterr().out == fake_hub.commit_urls[0] + "\n"


def test_cli_fails_fast_offline_with_a_clear_message(run_folder, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert push_cli.main([str(run_folder), "--repo-id", REPO_ID]) == 2  # a user error: argparse's exit status
    captured = capsys.readouterr()
    assert captured.err.startswith("vqrae-push: error: Cannot publish to the Hugging Face Hub: offline mode is on")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == "" and fake_hub.repos == fake_hub.commits == []


def test_vqrae_push_console_script_is_installed():
    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "vqrae-push"]
    assert script.value == "vqrae.cli.push:main"
    assert script.load() is push_cli.main


def test_cli_without_a_connection_to_the_hub_is_one_line(run_folder, tmp_path):
    # The real client against an endpoint that refuses connections (a local port nothing listens on), as a user
    # with a token but no network gets: one line naming the repository, not huggingface_hub's 50-line traceback.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_TOKEN="hf_test_token", HF_ENDPOINT=endpoint)
    command = [sys.executable, "-m", "vqrae.cli.push", str(run_folder), "--repo-id", REPO_ID]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(
        f"vqrae-push: error: Cannot publish {run_folder} to '{REPO_ID}': the Hugging Face Hub ({endpoint}) could not "
        "be reached ("
    ), result.stderr
    assert "nothing was committed" in result.stderr and result.stdout == ""


def test_what_counts_as_not_reaching_the_hub():
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = httpx2.ReadTimeout("timed out")
    for error in (OfflineModeIsEnabled("offline"), ConnectionRefusedError(111, "refused"), wrapped):
        assert hub._is_connection_error(error), error
    for error in (
        ValueError("bad repo"),
        RuntimeError("a bug"),
        httpx2.HTTPStatusError("403", request=None, response=None),
    ):
        assert not hub._is_connection_error(error), error
