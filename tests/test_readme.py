"""The README's quickstart runs as written, against the default model where the README says one is, and prints
what the README says it prints."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import save_model

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> tuple[str, str]:
    """The quickstart's code and the output the README promises for it."""
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"```\n\nprints `([^`]+)`", section).group(1)
    return code, printed


def test_readme_quickstart_runs_as_written(tmp_path):
    from vqrae.training.args import parse_args
    from vqrae.training.trainer import build_model

    code, printed = quickstart()
    folder = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    # What `vqrae-train` with no arguments saves there: the default model's own config (weights untrained).
    model_args, _, training_args = parse_args([])
    assert training_args.output_dir == folder
    save_model(build_model(model_args), tmp_path / folder)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == printed == "(1, 8, 8) torch.int64 64000"
    from PIL import Image

    assert Image.open(tmp_path / "reconstruction.png").size == (64, 64)


def _bash_blocks(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(heading)
    section = text[start : text.index("\n#", start + len(heading))]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


# Shortened so the commands finish in seconds here; everything else is as the README writes it.
SHORT = (
    " --max_steps 3 --per_device_train_batch_size 4 --warmup_steps 1 --max_eval_samples 4 --num_reconstructions 2"
    " --dataloader_num_workers 0 --mixed_precision no --report_to none --disable_tqdm"
)


def _run_commands(commands: str, cwd: Path, replacements: dict) -> None:
    import os

    for old, new in replacements.items():
        assert old in commands, old
        commands = commands.replace(old, new)
    lines = [line + SHORT for line in commands.replace("\\\n", " ").splitlines() if line.strip()]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in lines:
        result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"


def test_readme_two_stage_commands_run_as_written(tmp_path):
    import json
    import shutil

    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from conftest import TINY_VISION, photo_folder
    from hub_cache import write_hub_cache

    shutil.copytree(README.parent / "configs", tmp_path / "configs")
    shutil.copytree(README.parent / "scripts", tmp_path / "scripts")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "siglip")
    photo_folder(tmp_path / "images", 24)
    two_stages = _bash_blocks("## Training")[0]
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
    _run_commands(_bash_blocks("### Train on your own images")[0], tmp_path, {"org/images": "dataset"})
    for name in ("photos", "images"):
        results = json.loads((tmp_path / "out" / name / "eval_results.json").read_text())
        assert results["held_out"] == {"percentage": 5.0, "num_examples": 1, "of": 20}
