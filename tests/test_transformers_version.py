"""The oldest transformers the model code runs on is said once: the published model code refuses an older one in
one line (instead of "cannot import name 'PreTrainedConfig'"), the model card states it, and pyproject.toml's
dependency agrees with it."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import save_model, tiny_model
from vqrae.configuration_vqrae import MIN_TRANSFORMERS_VERSION
from vqrae.training.model_card import render_model_card

ROOT = Path(__file__).resolve().parents[1]


def test_remote_code_under_an_older_transformers_says_which_version_it_needs(tmp_path):
    save_model(tiny_model(), tmp_path / "model")
    # transformers 4.x as the model code sees it: the version the installed package reports.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["vqrae"] = None  # only the folder's own code may run, as for a Hub user
        import transformers
        transformers.__version__ = "4.57.1"
        from transformers import AutoModel
        AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"ImportError: This VQRAE model code needs transformers >= {MIN_TRANSFORMERS_VERSION}, but transformers "
        f"4.57.1 is installed: upgrade it with `pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'`."
    ), result.stderr[-3000:]


def test_the_minimum_version_agrees_with_pyproject():
    # A regex, not tomllib: the tests run on Python 3.10 too.
    (minimum,) = re.findall(r'^\s*"transformers>=([\w.]+)', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert minimum == MIN_TRANSFORMERS_VERSION


def test_the_model_card_states_the_minimum_version(tmp_path):
    save_model(tiny_model(), tmp_path / "model")
    text = render_model_card(tmp_path / "model").text
    assert f"only `transformers` {MIN_TRANSFORMERS_VERSION} or newer is needed" in text
