"""The distributed engines vqrae-train runs under: a DeepSpeed launch is refused in one line before any work."""

import os
import subprocess
import sys


def test_a_deepspeed_launch_is_refused_in_one_line_before_any_work(tmp_path):
    # What `accelerate launch --use_deepspeed` (or a DeepSpeed accelerate config) puts in each process's
    # environment; the launcher itself needs deepspeed installed, which this machine has not.
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "vqrae.cli.train", "--output_dir", str(output_dir), "--max_steps", "1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vqrae-train: error: DeepSpeed is not supported"), lines[0]
    assert all(engine in lines[0] for engine in ("DDP", "FSDP2", "single process")), lines[0]
    assert not output_dir.exists()  # refused before the output folder, the model or the data
