"""`save_pretrained_atomic` (the trainer's model writer) is atomic: a save killed at any moment leaves the old model
or the new one.

The kill test runs a real save loop in a forked process and SIGKILLs it at several moments; every snapshot of the
folder taken after a kill must load (strictly: config and weights agree) and equal one of the two models exactly.
With the staging folder removed from `save_pretrained_atomic` (saving in place), about a third of the kills leave a
truncated config.json or config.json of one model beside the weights of the other, so ten kills catch it
(checked: that mutant fails this test).
"""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import SEED_PRESETS, tiny_config_kwargs, tiny_model
from vqrae import VQRAEModel
from vqrae.atomic_io import save_pretrained_atomic

MODEL_A = {"seed": 0, **SEED_PRESETS["standard_fsq"]}
MODEL_B = {"seed": 1, **SEED_PRESETS["cosmos_fsq"]}

# Runs in a fresh interpreter: saves model A, then for each delay forks a process that saves B, A, B, ... into the
# same folder without end, SIGKILLs it after the delay and copies the folder as it was left to a snapshot.
_KILL_LOOP = textwrap.dedent(
    """
    import json, os, shutil, signal, sys, time
    import torch
    torch.set_num_threads(1)  # no OpenMP pool in the parent, so forking is safe
    from transformers.utils import logging
    logging.disable_progress_bar()
    from vqrae import VQRAEConfig, VQRAEModel
    from vqrae.atomic_io import save_pretrained_atomic

    folder, snapshots, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    models = []
    for seed, kwargs in spec["models"]:
        torch.manual_seed(seed)
        models.append(VQRAEModel(VQRAEConfig(**kwargs)))
    save_pretrained_atomic(models[0], folder, models[0].get_image_processor())
    for trial, delay in enumerate(spec["delays"]):
        pid = os.fork()
        if pid == 0:
            turn = 1
            while True:
                model = models[turn % 2]
                save_pretrained_atomic(model, folder, model.get_image_processor())
                turn += 1
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.copytree(folder, os.path.join(snapshots, f"trial-{trial}"), symlinks=True)
    """
)


def _build(spec: dict) -> VQRAEModel:
    spec = dict(spec)
    return tiny_model(spec.pop("seed"), **spec).eval()


def _equals(model: VQRAEModel, reference: VQRAEModel) -> bool:
    for field in ("fsq_levels", "use_post_quant_conv"):
        if getattr(model.config, field) != getattr(reference.config, field):
            return False
    state, expected = model.state_dict(), reference.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[key], expected[key]) for key in expected)


def _save(model: VQRAEModel, folder) -> None:
    save_pretrained_atomic(model, folder, model.get_image_processor())


def test_the_model_saves_as_transformers_does():
    # Atomic saving is a library function any caller may use, not a change to `save_pretrained`.
    assert "save_pretrained" not in vars(VQRAEModel) and "save_pretrained" not in vars(VQRAEModel.__mro__[1])


def _staging_leftovers(folder: Path) -> list[str]:
    return [entry.name for entry in folder.parent.iterdir() if entry.name.startswith(f".{folder.name}.vqrae-staging-")]


def test_save_killed_at_any_moment_leaves_exactly_one_model(tmp_path):
    folder, snapshots = tmp_path / "model", tmp_path / "snapshots"
    snapshots.mkdir()
    folder.mkdir()
    (folder / "README.md").write_text("my own model card\n")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.txt").write_text("step 1\n")

    rng = random.Random(1234)
    delays = [rng.uniform(0.05, 0.5) for _ in range(10)]
    spec = {
        "models": [
            [spec["seed"], tiny_config_kwargs(**{k: v for k, v in spec.items() if k != "seed"})]
            for spec in (MODEL_A, MODEL_B)
        ],
        "delays": delays,
    }
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(
        [sys.executable, "-c", _KILL_LOOP, str(folder), str(snapshots), json.dumps(spec)],
        check=True,
        env=env,
        timeout=300,
    )

    model_a, model_b = _build(MODEL_A), _build(MODEL_B)
    matched = []
    for trial in range(len(delays)):
        snapshot = snapshots / f"trial-{trial}"
        loaded = VQRAEModel.from_pretrained(snapshot)
        is_a, is_b = _equals(loaded, model_a), _equals(loaded, model_b)
        assert is_a != is_b, f"trial {trial} (killed after {delays[trial]:.2f} s) left a model equal to neither"
        matched.append("A" if is_a else "B")
        assert (snapshot / "README.md").read_text() == "my own model card\n"
        assert (snapshot / "logs" / "events.txt").read_text() == "step 1\n"
        assert sorted(p.name for p in snapshot.glob("*.safetensors")) == ["model.safetensors"]

    # Kills may leave a hidden staging folder beside the model; the next save clears it away.
    _save(_build(MODEL_A), folder)
    assert _staging_leftovers(folder) == []
    assert _equals(VQRAEModel.from_pretrained(folder), model_a)


def test_save_into_new_folder_creates_it_and_leaves_nothing_beside_it(tmp_path):
    folder = tmp_path / "nested" / "model"
    model = _build(MODEL_B)
    _save(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "configuration_vqrae.py",
        "decoder.py",
        "model.safetensors",
        "modeling_vqrae.py",
        "preprocessor_config.json",
        "quantizers.py",
    ]
    assert [p.name for p in folder.parent.iterdir()] == ["model"]
    assert _equals(VQRAEModel.from_pretrained(folder), model)


def test_save_over_a_model_keeps_other_files_and_drops_stale_weight_shards(tmp_path):
    folder = tmp_path / "model"
    _save(_build(MODEL_A), folder)
    (folder / "README.md").write_text("card\n")
    (folder / "checkpoints" / "step-10").mkdir(parents=True)
    (folder / "checkpoints" / "step-10" / "state.bin").write_bytes(b"\x00" * 16)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    (folder / "model.safetensors.index.json").write_text("{}")
    os.chmod(folder, 0o750)

    model_b = _build(MODEL_B)
    _save(model_b, folder)

    assert (folder / "README.md").read_text() == "card\n"
    assert (folder / "checkpoints" / "step-10" / "state.bin").read_bytes() == b"\x00" * 16
    assert not (folder / "model-00002-of-00002.safetensors").exists()
    assert not (folder / "model.safetensors.index.json").exists()
    assert os.stat(folder).st_mode & 0o777 == 0o750
    assert _staging_leftovers(folder) == []
    assert _equals(VQRAEModel.from_pretrained(folder), model_b)


def test_save_through_a_symlink_updates_the_real_folder(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    _save(_build(MODEL_A), real)
    link.symlink_to(real, target_is_directory=True)
    model_b = _build(MODEL_B)
    _save(model_b, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _equals(VQRAEModel.from_pretrained(real), model_b)


def test_save_onto_a_file_is_refused_and_leaves_the_file(tmp_path):
    path = tmp_path / "not-a-folder"
    path.write_text("keep me")
    with pytest.raises(OSError, match="it is a file, not a folder"):
        _save(_build(MODEL_A), path)
    assert path.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]


@pytest.mark.parametrize("spec", [MODEL_A, MODEL_B], ids=["standard_fsq", "cosmos_fsq"])
def test_models_of_the_kill_test_differ(spec):
    # The kill test can only tell A from B (and catch a mix) if their configs and weights differ.
    other = MODEL_B if spec is MODEL_A else MODEL_A
    assert not _equals(_build(spec), _build(other))


def test_save_over_a_model_without_an_atomic_exchange(tmp_path, monkeypatch):
    # Where renameat2(RENAME_EXCHANGE) is missing (not Linux, or a filesystem without it), two renames do the swap.
    import vqrae.atomic_io

    monkeypatch.setattr(vqrae.atomic_io, "_exchange", lambda first, second: False)
    folder = tmp_path / "model"
    _save(_build(MODEL_A), folder)
    (folder / "README.md").write_text("card\n")
    model_b = _build(MODEL_B)
    _save(model_b, folder)
    assert (folder / "README.md").read_text() == "card\n"
    assert _staging_leftovers(folder) == []
    assert _equals(VQRAEModel.from_pretrained(folder), model_b)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_honour_the_umask(umask, tmp_path):
    # safetensors writes its file 0600; others on a shared machine must be able to read the weights when the umask
    # lets them, as they can read config.json. The second umask shows the modes follow it rather than a constant.
    from vqrae.atomic_io import atomic_write

    previous = os.umask(umask)
    try:
        _save(_build(MODEL_A), tmp_path / "model")
        atomic_write(tmp_path / "notes.txt", "text\n")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "model").iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and "model.safetensors" in modes
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "notes.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_files_honour_the_umask(tmp_path):
    # accelerate's save_state writes the checkpoint's model.safetensors through safetensors (0600) too.
    from conftest import run

    previous = os.umask(0o022)
    try:
        run(tmp_path / "run", "--save_steps", "1", max_steps=1)
    finally:
        os.umask(previous)
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    modes = {path.name: path.stat().st_mode & 0o777 for path in checkpoint.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644) and "model.safetensors" in modes
