"""The distributed engines vqrae-train runs under: a DeepSpeed or FSDP1 launch is refused in one line before any
work."""

import os
import subprocess
import sys

import pytest

# What `accelerate launch --use_deepspeed` / `--use_fsdp` (or such an accelerate config) puts in each process's
# environment; the DeepSpeed launcher itself needs deepspeed installed, which this machine has not.
LAUNCHES = {
    "DeepSpeed is not supported": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "FSDP version 1 is not supported": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
}


@pytest.mark.parametrize("refusal", sorted(LAUNCHES))
def test_an_unsupported_launch_is_refused_in_one_line_before_any_work(tmp_path, refusal):
    env = {**os.environ, **LAUNCHES[refusal]}
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "vqrae.cli.train", "--output_dir", str(output_dir), "--max_steps", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vqrae-train: error: {refusal}"), lines[0]
    assert all(engine in lines[0] for engine in ("DDP", "FSDP2", "single process")), lines[0]
    assert not output_dir.exists()  # refused before the output folder, the model or the data
