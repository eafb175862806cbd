"""The commands of README.md and the pages under docs/ run as written: the quickstart against the default model,
printing what the README says it prints, and every fenced bash block, each by a named test here or, where none can
run it as written, listed with the reason and the tests that cover what it does."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import save_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def quickstart() -> tuple[str, str]:
    """The quickstart's code and the output the README promises for it."""
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"```\n\nprints `([^`]+)`", section).group(1)
    return code, printed


def test_readme_quickstart_runs_as_written(tmp_path):
    from vqrae.cli.train import parse_train_args
    from vqrae.training.trainer import build_model

    code, printed = quickstart()
    folder = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    # What `vqrae-train` with no arguments saves there: the default model's own config (weights untrained).
    model_args, _, training_args = parse_train_args([])
    assert training_args.output_dir == folder
    save_model(build_model(model_args), tmp_path / folder)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == printed == "(1, 8, 8) torch.int64 64000"
    from PIL import Image

    assert Image.open(tmp_path / "reconstruction.png").size == (64, 64)


def _pages() -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in [README, *sorted(ROOT.glob("docs/*.md"))]}


def _sections(text: str) -> dict[str, str]:
    """{heading line: its text up to the next heading}, headings outside fenced blocks only."""
    sections, heading, lines, fenced = {}, "", [], False
    for line in text.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            sections[heading], heading, lines = "".join(lines), line.strip(), []
        lines.append(line)
    sections[heading] = "".join(lines)
    return sections


def _bash_blocks(page: str, heading: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", _sections(_pages()[page])[heading], re.S)


# Shortened so the commands finish in seconds here; everything else is as the README writes it.
SHORT = (
    " --max_steps 3 --per_device_train_batch_size 4 --warmup_steps 1 --max_eval_samples 4 --num_reconstructions 2"
    " --dataloader_num_workers 0 --mixed_precision no --report_to none --disable_tqdm"
)


def _command_lines(commands: str, replacements: dict, extra: str = "") -> list[str]:
    """The block's commands, one per line (continuations joined, trailing comments dropped), with `replacements`
    made (each must occur) and `extra` appended."""
    for old, new in replacements.items():
        assert old in commands, old
        commands = commands.replace(old, new)
    lines = commands.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+#.*$", "", line) + extra for line in lines if line.strip()]


def _run_line(line: str, cwd: Path) -> None:
    import os

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"


def _run_commands(commands: str, cwd: Path, replacements: dict) -> None:
    for line in _command_lines(commands, replacements, SHORT):
        _run_line(line, cwd)


def test_readme_two_stage_commands_run_as_written(tmp_path):
    import json
    import shutil

    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from conftest import TINY_VISION, photo_folder
    from hub_cache import write_hub_cache

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "siglip")
    photo_folder(tmp_path / "images", 24)
    two_stages = _bash_blocks("docs/training.md", "## Two stages, from a pretrained encoder")[0]
    # The Hub id of the README's encoder resolves, offline, to a tiny SigLIP in the test session's Hub cache.
    write_hub_cache(tmp_path / "siglip", "google/siglip2-base-patch16-256")
    _run_commands(two_stages, tmp_path, {"org/images": str(tmp_path / "images")})
    stage1 = json.loads((tmp_path / "out" / "stage1" / "config.json").read_text())
    assert stage1["encoder_name_or_path"] == "google/siglip2-base-patch16-256"
    options = yaml.safe_load((tmp_path / "out" / "stage2" / "training_config.yaml").read_text())
    assert options["stage"] == 2 and options["learning_rate"] == 2e-5 and options["dataset_name"].endswith("images")
    results = json.loads((tmp_path / "out" / "stage2" / "eval_results.json").read_text())
    assert results["held_out"]["num_examples"] == 1  # the folder has no validation split: 5 % held out


def test_readme_own_images_commands_run_as_written(tmp_path):
    import json

    from conftest import photo_folder

    photo_folder(tmp_path / "photos", 20)
    photo_folder(tmp_path / "dataset", 20, seed=1)
    _run_commands(_bash_blocks("README.md", "## Train on your own images")[0], tmp_path, {"org/images": "dataset"})
    for name in ("photos", "images"):
        results = json.loads((tmp_path / "out" / name / "eval_results.json").read_text())
        assert results["held_out"] == {"percentage": 5.0, "num_examples": 1, "of": 20}


def _model_folders(tmp_path: Path) -> Path:
    """A tiny model saved as a folder, and as `org/vqrae-cosmos` in the test session's offline Hub cache."""
    from conftest import tiny_model
    from hub_cache import write_hub_cache

    tiny_model(seed=0).save_pretrained(tmp_path / "model")
    write_hub_cache(tmp_path / "model", "org/vqrae-cosmos")
    return tmp_path / "model"


def _alternatives(block: str, tmp_path: Path, model: Path, replacements: dict, extra: str = "") -> list[Path]:
    """Run each line of a block of alternatives in a folder of its own that holds `out/stage1` (the model) and
    `photos/`; return the folders."""
    import shutil

    from conftest import photo_folder

    folders = []
    for i, line in enumerate(_command_lines(block, replacements, extra)):
        folder = tmp_path / f"line{i}"
        shutil.copytree(model, folder / "out" / "stage1")
        photo_folder(folder / "photos", 5, seed=i)
        _run_line(line, folder)
        folders.append(folder)
    return folders


def test_tokenize_commands_run_as_written(tmp_path):
    import datasets

    from conftest import photo_folder

    model = _model_folders(tmp_path)
    for label in ("cats", "dogs"):  # class folders: the dataset has a `label` column to keep
        photo_folder(tmp_path / "images" / label, 3, seed=len(label), start=len(label))
    block = _bash_blocks("docs/tokenizing.md", "## vqrae-tokenize")[0]
    folders = _alternatives(block, tmp_path, model, {"org/images": str(tmp_path / "images")})
    counts = []
    for folder in folders:
        rows = datasets.load_dataset("parquet", data_dir=str(folder / "tokens" / "data"), split="train")
        assert {"index", "id", "indices"} <= set(rows.column_names)
        assert ("label" in rows.column_names) == (folder == folders[0])
        counts.append(rows.num_rows)
    assert counts == [6, 5, 5]


def test_evaluate_commands_run_as_written(tmp_path):
    import json

    model = _model_folders(tmp_path)
    block = _bash_blocks("docs/tokenizing.md", "## vqrae-evaluate")[0]
    # Shortened: four of the built-in validation tiles, two pictures; everything else as written.
    folders = _alternatives(block, tmp_path, model, {}, " --max_eval_samples 4 --num_examples 2")
    results = [json.loads((folder / "eval" / "eval_results.json").read_text()) for folder in folders]
    assert [result["num_images"] for result in results] == [4, 4]
    assert [result["dataset_name"] for result in results] == ["builtin:photos", "photos/"]
    assert results[0]["crop_codebook_use"] is None and results[1]["crop_codebook_use"]["crops"] == 2048


# Every fenced bash block of README.md and docs/*.md, by (page, heading, position under the heading): the test here
# that runs it as written ...
RUN_HERE = {
    ("README.md", "## Train on your own images", 0): test_readme_own_images_commands_run_as_written,
    ("docs/training.md", "## Two stages, from a pretrained encoder", 0): test_readme_two_stage_commands_run_as_written,
    ("docs/tokenizing.md", "## vqrae-tokenize", 0): test_tokenize_commands_run_as_written,
    ("docs/tokenizing.md", "## vqrae-evaluate", 0): test_evaluate_commands_run_as_written,
}
# ... or why no test can run it as written, and the tests that run what it does.
CI_RUNS = "CI: .ci/run runs it word for word on a clean clone"
NOT_RUN_HERE = {
    ("README.md", "## Install", 0): CI_RUNS,
    ("README.md", "## Install", 1): CI_RUNS,
    ("docs/training.md", "## Resume, extend, fine-tune, several processes", 0): (
        "`...` stands for a run's own options: tests/test_resume.py resumes, extends with a larger --max_steps and "
        "starts from a checkpoint folder; tests/test_training_processes.py launches two CPU processes over gloo"
    ),
    ("docs/training.md", "## Publish to the Hub", 0): (
        "it logs in to the Hub and writes there: tests/test_hub.py runs vqrae-push against a stand-in for the Hub"
    ),
}


def test_every_command_block_is_run_or_listed():
    import inspect

    found = {
        (page, heading, i)
        for page, text in _pages().items()
        for heading in _sections(text)
        for i, _ in enumerate(_bash_blocks(page, heading))
    }
    assert found == set(RUN_HERE) | set(NOT_RUN_HERE), "add the new block's test to RUN_HERE (or to NOT_RUN_HERE)"
    assert not set(RUN_HERE) & set(NOT_RUN_HERE)
    for (page, heading, _), test in RUN_HERE.items():
        source = inspect.getsource(test)
        assert f'_bash_blocks("{page}", "{heading}")' in source, (test.__name__, page, heading)
    ci = (ROOT / ".ci" / "run").read_text()
    for (page, heading, i), reason in NOT_RUN_HERE.items():
        if reason == CI_RUNS:
            assert f"'{_bash_blocks(page, heading)[i].strip()}'" in ci, (page, heading, i)
