"""Training in real processes: SIGKILL and resume, and two CPU processes under `accelerate launch`."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RUN_ARGS, TINY_SIZE_ARGS, records, run
from vqrae.training.trainer import latest_checkpoint

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
# EMA and a GAN from step 3: their states (EMA weights, discriminator, its optimiser) must survive the kill too.
RESUME_ARGS = ["--max_steps", "6", "--save_steps", "1", "--save_total_limit", "2", "--ema_decay", "0.8"]
RESUME_ARGS += ["--gan_weight", "0.1", "--gan_start_step", "3"]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_sigkill_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    run(reference, *RESUME_ARGS[2:], max_steps=6)

    killed = tmp_path / "killed"
    argv = [sys.executable, str(TRAIN_SCRIPT), *TINY_SIZE_ARGS, *TINY_RUN_ARGS, *RESUME_ARGS, "--eval_steps", "100"]
    process = subprocess.Popen([*argv, "--output_dir", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = killed / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        # Kill as soon as the save of step 3 (or later) is under way: most often in the middle of writing it.
        while time.monotonic() < deadline and process.poll() is None:
            names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
            if any(name.endswith(("-3", "-4", "-5")) for name in names):
                break
            time.sleep(0.002)
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    # The kill usually lands inside the save of step 3: its hidden folder is left, and never taken for a checkpoint.
    latest = latest_checkpoint(str(killed))
    assert latest is not None and Path(latest).name in ("checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-5")
    assert (Path(latest) / "trainer_state.json").is_file()

    run(killed, *RESUME_ARGS[2:], "--resume_from_checkpoint", "latest", max_steps=6)
    assert_same_weights(weights(reference), weights(killed))
    assert [r["step"] for r in records(killed)] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-5", "checkpoint-6"]
    reference_eval = json.loads((reference / "eval_results.json").read_text())
    assert json.loads((killed / "eval_results.json").read_text()) == reference_eval


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_processes(argv: list[str], port: int | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of the training script in two CPU processes."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port or _free_port()),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, str(TRAIN_SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=300)


def test_two_cpu_processes_train_like_one_with_the_same_global_batch(tmp_path):
    # Without the tiny size's FSQ noise: each process draws its own, so two processes take other noise than one.
    no_noise = ["--fsq_noise_probability", "0"]
    single = tmp_path / "single"
    run(single, "--per_device_train_batch_size", "4", *no_noise, max_steps=3)

    two = tmp_path / "two"
    argv = [*TINY_SIZE_ARGS, *TINY_RUN_ARGS, "--per_device_train_batch_size", "2", "--max_steps", "3", *no_noise]
    argv += ["--eval_steps", "100", "--save_steps", "100", "--output_dir", str(two)]
    port = _free_port()
    done = _launch_two_processes(argv, port)
    assert done.returncode == 0, done.stderr[-3000:]

    # One output folder, written once; the same figures as one process with the same global batch.
    assert [r["step"] for r in records(two)] == [1, 2, 3]
    assert len(records(two, "eval")) == 1
    one, both = (
        json.loads((single / "eval_results.json").read_text()),
        json.loads((two / "eval_results.json").read_text()),
    )
    assert both["num_images"] == one["num_images"] == 8
    for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
        assert both[key] == pytest.approx(one[key], abs=2e-3), key
    a, b = weights(single), weights(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)
    losses_one, losses_two = [r["loss"] for r in records(single)], [r["loss"] for r in records(two)]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)

    # Resuming the two-process run with one process would shift every data position: refused, in one line.
    resumed = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *argv, "--resume_from_checkpoint", "latest"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    (line,) = [line for line in resumed.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("vqrae-train: error: The checkpoint") and "Traceback" not in resumed.stderr
    assert "2 process(es), and this run has 1" in line and "--num_processes 2" in line
    assert resumed.stderr.strip().splitlines()[-1] == line
    # The command it offers is the one that launched the run (recorded from the launcher's environment).
    launched = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
    launched += f"--mixed_precision no --dynamo_backend no --main_process_port {port} {TRAIN_SCRIPT} "
    assert line.endswith(launched + shlex.join([*argv, "--resume_from_checkpoint", "latest"])), line

    # Refused in two processes: one line, from the main process, the last before the launcher's own report.
    refused = _launch_two_processes([*argv, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"])
    assert refused.returncode != 0 and "Traceback" not in refused.stderr.split("vqrae-train: error:")[0]
    (line,) = [line for line in refused.stderr.splitlines() if "vqrae-train: error:" in line]
    assert "--learning_rate 0.001 (trained with 0.002)" in line
    after = refused.stderr.split(line)[1]  # torchrun's report only: nothing more from either process
    assert "vqrae-train" not in after and " vqrae." not in after


def test_two_cpu_processes_keep_one_vq_codebook(tmp_path):
    """Code restarts run collectives inside the forward pass of every process (usage summed, process 0's latents;
    `test_codebook` checks that the codebooks agree): a real two-process run finishes (no process waits in a
    collective another one skipped) and restarts every code left idle."""
    output = tmp_path / "vq"
    argv = [*TINY_SIZE_ARGS, *TINY_RUN_ARGS, "--quantizer", "vq", "--num_embeddings", "64", "--max_steps", "4"]
    argv += [
        "--vq_restart_unused_steps",
        "1",
        "--eval_steps",
        "100",
        "--save_steps",
        "100",
        "--output_dir",
        str(output),
    ]
    done = _launch_two_processes(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(output)] == [1, 2, 3, 4]
    assert all(0 < r["codebook_usage"] <= 1 for r in records(output))
    model = weights(output)
    assert (model["quantizer.steps_unused"] <= 1).all()  # restarted or used at the last step: never two steps idle


# Each process of a two-process run started by hand (the environment torchrun gives its workers), so each one's exit
# status is seen. On process 0 a publication that takes PUSH_SECONDS; with SEPARATE_FOLDERS each process trains in
# `--output_dir`-RANK, as machines without a shared filesystem would. A process reports its process group's timeout
# as it leaves the group.
TWO_PROCESS_SCRIPT = """
import os, sys, time
import torch
import vqrae.training.hub
from vqrae.cli.train import main

rank, argv = os.environ["RANK"], sys.argv[1:]
if os.environ.get("SEPARATE_FOLDERS"):
    argv[argv.index("--output_dir") + 1] += "-" + rank
if rank == "0":
    vqrae.training.hub.push_to_hub = lambda folder, **kwargs: time.sleep(float(os.environ.get("PUSH_SECONDS", 0)))
destroy = torch.distributed.destroy_process_group

def report_and_destroy(group=None):
    if group is None and torch.distributed.is_initialized():
        default = torch.distributed.distributed_c10d._get_default_group()
        print(f"process group timeout {default._get_backend(torch.device('cpu')).options._timeout}", file=sys.stderr)
    destroy(group)

torch.distributed.destroy_process_group = report_and_destroy
status = main(argv)
assert not torch.distributed.is_initialized(), "the process group outlived the run"
sys.exit(status)
"""


def _two_processes(tmp_path, argv: list[str], **environ) -> list[tuple[int, str]]:
    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    common = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **environ}
    common.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), *argv],
            env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        return [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    finally:
        for process in processes:
            process.kill()


def test_processes_that_find_different_checkpoints_are_refused(tmp_path):
    """Without a shared filesystem each machine finds the checkpoints of its own --output_dir: process 0 would resume
    at step 1 while process 1 starts afresh, and the weights would part silently. Refused in one line, by both."""
    output = tmp_path / "run"
    run(Path(f"{output}-0"), "--save_steps", "1", max_steps=1)  # process 0's folder holds checkpoint-1
    argv = [*TINY_SIZE_ARGS, *TINY_RUN_ARGS, "--max_steps", "2", "--output_dir", str(output)]
    argv += ["--resume_from_checkpoint", "latest", "--ddp_timeout", "123"]
    (status_0, stderr_0), (status_1, stderr_1) = _two_processes(tmp_path, argv, SEPARATE_FOLDERS="1")
    assert (status_0, status_1) == (2, 2), stderr_0[-3000:] + stderr_1[-3000:]
    (line,) = [line for line in stderr_0.splitlines() if "error" in line.lower()]
    assert line.startswith("vqrae-train: error: The processes found different checkpoints to resume from")
    found = f"process 0: {output}-0/checkpoints/checkpoint-1; process 1: no checkpoint in {output}-1/checkpoints"
    assert found in line
    assert "Traceback" not in stderr_0 + stderr_1 and "error" not in stderr_1.lower()  # said once, by process 0
    # --ddp_timeout is the process group's timeout (seconds).
    assert "process group timeout 0:02:03" in stderr_0 and "process group timeout 0:02:03" in stderr_1
    assert not Path(f"{output}-1", "checkpoints").exists()  # refused before any work


def test_other_processes_do_not_wait_for_the_main_one_to_save_and_publish(tmp_path):
    """Saving the model (which can copy the checkpoints) and publishing it run on the main process after the last
    evaluation; the others end then instead of waiting in a barrier, where --ddp_timeout (here 3 seconds) would
    abort the run while the main process uploads (here for 8)."""
    output = tmp_path / "run"
    argv = [*TINY_SIZE_ARGS, *TINY_RUN_ARGS, "--max_steps", "1", "--eval_steps", "100", "--save_steps", "100"]
    argv += ["--output_dir", str(output), "--push_to_hub", "--hub_model_id", "org/tiny", "--ddp_timeout", "3"]
    (status_0, stderr_0), (status_1, stderr_1) = _two_processes(tmp_path, argv, PUSH_SECONDS="8")
    assert (status_0, status_1) == (0, 0), stderr_0[-3000:] + stderr_1[-3000:]
    assert (output / "model.safetensors").is_file() and (output / "eval_results.json").is_file()
