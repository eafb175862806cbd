"""The command line of `vqrae-train`: a user error is one line `vqrae-train: error: ...` and exit status 2, a bug
keeps its traceback, and Ctrl-C says where the last checkpoint is and how to resume."""

import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_RUN_ARGS, TINY_SIZE_ARGS, photo_folder
from vqrae.cli.common import run_cli
from vqrae.errors import UsageError
from vqrae.training.checkpointing import latest_checkpoint

TRAIN = [sys.executable, "-m", "vqrae.cli.train"]


def _train(*argv, cwd=None, timeout=300):
    return subprocess.run([*TRAIN, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vqrae-train: error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--learning_rate", "-1"], "`learning_rate` must be a finite number >= 0 (got -1.0)"),
        (["--no_such_option", "1"], "unrecognized arguments: --no_such_option 1"),
        (["--max_steps", "many"], "argument --max_steps/--max-steps: invalid int value: 'many'"),
        (["--config", "nope"], "`config` must be a YAML file or the name of a preset"),
        (["--fsq_levels", "8", "1"], "`fsq_levels` must be a non-empty list of integers >= 2 (got [8, 1])"),
        (["--image_size", "0"], "`vision_config.image_size` must be an integer >= 1 (got 0)"),
        (["--init_from", "outputs/does-not-exist"], "'outputs/does-not-exist' is not a folder"),
        (["--train_dir", "no/such/folder"], "`train_dir` must be a folder of images (got 'no/such/folder'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, argv, expected):
    (tmp_path / "outputs").mkdir()
    sizes = [] if "--init_from" in argv else TINY_SIZE_ARGS
    line = _one_error_line(_train(*sizes, *argv, "--output_dir", str(tmp_path / "run"), cwd=tmp_path))
    assert expected in line


def test_an_existing_run_is_a_one_line_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    line = _one_error_line(_train("--output_dir", str(tmp_path / "run")))
    assert "already holds a run" in line and "--resume_from_checkpoint latest" in line


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise RuntimeError("a bug")

    def refuses(argv):
        raise UsageError("bad\n  input")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli("vqrae-train", buggy)
    assert run_cli("vqrae-train", refuses) == 2
    assert run_cli("vqrae-train", lambda argv: None) == 0


def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path):
    output = tmp_path / "run"
    argv = [*TINY_SIZE_ARGS, *TINY_RUN_ARGS, "--output_dir", str(output), "--max_steps", "100000"]
    argv += ["--save_steps", "1", "--eval_steps", "100000", "--train_dir", str(photo_folder(tmp_path / "photos", 8))]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file, not a pipe nobody reads while it trains
        # SIGINT back to its default in the child: a shell's background job (`... &`) starts with it ignored, and
        # Python then installs no KeyboardInterrupt handler, so the Ctrl-C would never arrive.
        restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        process = subprocess.Popen([*TRAIN, *argv], stderr=stderr, stdout=subprocess.DEVNULL, preexec_fn=restore)
        deadline = time.monotonic() + 240
        while latest_checkpoint(str(output)) is None:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "vqrae-train: interrupted"
    (message,) = [line for line in stderr.splitlines() if "Interrupted at step" in line]
    assert f"the last checkpoint is {output / 'checkpoints' / 'checkpoint-'}" in message
    assert message.endswith("--resume_from_checkpoint latest") and "run: vqrae-train --hidden_size 32" in message
