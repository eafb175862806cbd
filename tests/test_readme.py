"""The README's quickstart runs as written, against the default model where the README says one is, and prints
what the README says it prints."""

import re
import subprocess
import sys
from pathlib import Path

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
    build_model(model_args).save_pretrained(tmp_path / folder)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == printed == "(1, 8, 8) torch.int64 64000"
    from PIL import Image

    assert Image.open(tmp_path / "reconstruction.png").size == (64, 64)
