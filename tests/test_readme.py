"""The README's quickstart runs as written, against a model folder where the README says one is."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs_as_written(tmp_path):
    code = quickstart_code()
    folder = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    # The folder `vqrae-train` writes, here with a tiny model (32 px, 4 x 4 tokens) so the test stays fast.
    tiny_model(use_post_quant_conv=True).save_pretrained(tmp_path / folder)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "(1, 4, 4) torch.int64 64000"
    from PIL import Image

    assert Image.open(tmp_path / "reconstruction.png").size == (32, 32)
