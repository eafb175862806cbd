"""Checkpoints of a training run: save, find, load, and the records that make a resume honest.

A checkpoint (`output_dir/checkpoints/checkpoint-{step}`) holds everything a resume needs: accelerate's state (models
and optimisers), the scheduler, the EMA weights, and per process its random states and data position. It also
records the run's shape (number of processes, per-device batch size, gradient accumulation), the identity of the
training data, every option that shapes the weights (as the user gave them, never values derived from them), the
warm-up the run used and the command that resumes it. The data each process reads is a function of the step and of
that shape, so a resume that changed any of it would repeat or skip examples, or continue on a schedule made for
other options: `check_resume` refuses it and says which value changed and what to pass. The one change a resume
may make to the schedule is a larger `max_steps` (extending the run). The model's `config.json` is saved too, so a
checkpoint folder is also a VQRAE model folder (its trained, non-EMA weights) that `--init_from` can start from.

Checkpoints are written into a hidden folder that is renamed `checkpoint-{step}` once complete (`trainer_state.json`
last), so a kill during a save never leaves a checkpoint that looks complete. Nothing is pickled: JSON and
safetensors, besides accelerate's `torch.save` of plain tensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from ..atomic_io import set_default_mode
from ..errors import UsageError
from .args import RESUMABLE_OPTIONS
from .run_files import CHECKPOINTS_DIR

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS_DIR",
    "TRAINER_STATE_FILE",
    "check_resume",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_output_dir",
    "read_checkpoint_record",
    "resolve_resume",
    "resolve_resume_everywhere",
    "resume_command",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "truncate_metrics",
]

TRAINER_STATE_FILE = "trainer_state.json"
EMA_WEIGHTS_FILE = "ema_model.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _process_file(process_index: int) -> str:
    return f"process_{process_index}.json"


# ---------------------------------------------------------------------------------------------------------------
# Random states
# ---------------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) random states, as JSON-able lists."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [generator.tolist() for generator in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(root, name, TRAINER_STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    checkpoints = _complete_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names (`latest`: the newest in `output_dir`, if any)."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info(
                "--resume_from_checkpoint latest: no complete checkpoint in %s yet, starting afresh.", output_dir
            )
        return path
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE_FILE)):
        raise UsageError(
            f"`resume_from_checkpoint` must be 'latest' or a complete checkpoint folder (got {resume!r}, which holds "
            f"no {TRAINER_STATE_FILE})."
        )
    return resume


def resolve_resume_everywhere(accelerator, resume: str | None, output_dir: str) -> str | None:
    """`resolve_resume` in every process of the run, which must find the same checkpoint (by name: each reads its
    own `output_dir`, which on machines without a shared filesystem are different folders). A process that found
    none would start at step 0 beside others that resume, and the weights would part silently: refused, naming what
    each process found. A refusal in any process is raised in all of them, so none waits for the others."""
    if resume is None or accelerator.num_processes == 1:
        return resolve_resume(resume, output_dir)
    try:
        path, problem = resolve_resume(resume, output_dir), None
    except UsageError as error:
        path, problem = None, str(error)
    seen = path or f"no checkpoint in {os.path.join(output_dir, CHECKPOINTS_DIR)}"
    found = gather_object([(None if path is None else os.path.basename(path), seen, problem)])
    problems = [(index, problem) for index, (_, _, problem) in enumerate(found) if problem]
    if problems:
        index, problem = next((item for item in problems if item[0] == accelerator.process_index), problems[0])
        raise UsageError(problem if index == accelerator.process_index else f"Process {index}: {problem}")
    if len({name for name, _, _ in found}) > 1:
        each = "; ".join(f"process {index}: {seen}" for index, (_, seen, _) in enumerate(found))
        raise UsageError(
            f"The processes found different checkpoints to resume from ({each}): each would continue from its own "
            "step and the weights would part. Give every process the same checkpoint (an --output_dir on a "
            "filesystem all machines share, or a copy of the checkpoint in each machine's --output_dir), or start "
            "afresh with --overwrite_output_dir."
        )
    return path


def _remove_tree(path: str) -> None:
    """Rename, then delete: a half-deleted checkpoint never keeps a name that looks complete."""
    doomed = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prepare_output_dir(output_dir: str, run_outputs: tuple[str, ...], *, overwrite: bool, resuming: bool) -> None:
    """Main process: refuse to mix runs in one folder (`run_outputs` are the names a run writes); remove leftovers
    of interrupted saves."""
    output = Path(output_dir)
    existing = [name for name in run_outputs if (output / name).exists()] if output.is_dir() else []
    if existing and not resuming:
        if not overwrite:
            raise UsageError(
                f"`output_dir` {output_dir!r} already holds a run ({existing}). Pass --resume_from_checkpoint latest "
                "to continue it, --overwrite_output_dir to start afresh, or another --output_dir."
            )
        for name in existing:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    root = output / CHECKPOINTS_DIR
    if root.is_dir():
        for leftover in root.iterdir():
            if leftover.name.startswith((".incomplete-", ".deleting-")):
                shutil.rmtree(leftover, ignore_errors=True)


def truncate_metrics(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from (they will be written again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(kept)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    *,
    scheduler,
    ema,
    data_state: dict,
    record: dict,
    total_limit: int | None,
    model_config=None,
) -> str:
    """Save everything a resume needs into a hidden folder, renamed `checkpoint-{step}` once complete.

    accelerate's `save_state` writes the models and optimisers (the model as `model.safetensors`, with the keys of
    the model's own state dict); the scheduler, the step, the run `record` (see `check_resume`) and each process's
    random states and data position are JSON, the EMA weights safetensors. With `model_config` (the model's
    `VQRAEConfig`) its `config.json` makes the folder loadable with `VQRAEModel.from_pretrained`.
    accelerate's automatic checkpoint naming writes straight into the final folder, so the folders are named here.
    """
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    final = os.path.join(root, f"checkpoint-{step}")
    temporary = os.path.join(root, f".incomplete-checkpoint-{step}")
    if accelerator.is_main_process:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary, safe_serialization=True)
    with open(os.path.join(temporary, _process_file(accelerator.process_index)), "w") as handle:
        json.dump({"rng": rng_state(), "data": data_state}, handle)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "num_processes": accelerator.num_processes, "scheduler": scheduler.state_dict()}
        state["record"] = record
        if model_config is not None:
            model_config.save_pretrained(temporary)
        if ema is not None:
            save_file(ema.model.state_dict(), os.path.join(temporary, EMA_WEIGHTS_FILE))
            state["ema_num_updates"] = ema.num_updates
        with open(os.path.join(temporary, TRAINER_STATE_FILE), "w") as handle:
            json.dump(state, handle)
        for entry in os.scandir(temporary):  # safetensors writes its files 0600: let the umask decide, as elsewhere
            if entry.is_file(follow_symlinks=False):
                set_default_mode(entry.path)
        if os.path.exists(final):
            _remove_tree(final)
        os.replace(temporary, final)  # atomic: the checkpoint appears complete or not at all
        if total_limit is not None:
            for _, old in _complete_checkpoints(output_dir)[:-total_limit]:
                _remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint_record(path: str) -> dict:
    """What the checkpoint says about the run that wrote it: `num_processes`, `per_device_train_batch_size`,
    `gradient_accumulation_steps`, `dataset`, `options`, `warmup_steps_used` and `resume_command`."""
    with open(os.path.join(path, TRAINER_STATE_FILE)) as handle:
        state = json.load(handle)
    return {"num_processes": state["num_processes"], **state["record"]}


def load_checkpoint(accelerator, path: str, *, scheduler, ema) -> tuple[int, dict]:
    """Restore a checkpoint written by `save_checkpoint`; returns the step and this process's data position.

    The learning rate of the restored step is taken from `scheduler` (built for this run's `max_steps`), not from
    the saved optimiser: the same value when `max_steps` is unchanged, the extended schedule's when it grew."""
    # Every process checks every process's file, so all of them refuse alike (the main process says it, once).
    for index in range(accelerator.num_processes):
        if not os.path.isfile(os.path.join(path, _process_file(index))):
            raise UsageError(
                f"The checkpoint {path!r} lacks {_process_file(index)}, the random states and data position of "
                f"process {index}: it is damaged or was written by fewer processes. Resume from another checkpoint "
                "or start afresh with --overwrite_output_dir."
            )
    process_file = os.path.join(path, _process_file(accelerator.process_index))
    accelerator.load_state(path)
    with open(os.path.join(path, TRAINER_STATE_FILE)) as handle:
        state = json.load(handle)
    scheduler.load_state_dict(state["scheduler"])
    _apply_schedule(scheduler)
    if ema is not None:  # `ema_decay` may not change on resume, so a run with EMA saved its weights
        ema.model.load_state_dict(load_file(os.path.join(path, EMA_WEIGHTS_FILE), device=str(accelerator.device)))
        ema.num_updates = state["ema_num_updates"]
    with open(process_file) as handle:
        process_state = json.load(handle)
    set_rng_state(process_state["rng"])
    return int(state["step"]), process_state["data"]


def _apply_schedule(scheduler) -> None:
    """Set the optimiser's learning rates to the schedule's at its restored step (as `LambdaLR.step` computes
    them: the same numbers, so a resume with unchanged options is bit-identical)."""
    rates = [base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


# ---------------------------------------------------------------------------------------------------------------
# Resume checks
# ---------------------------------------------------------------------------------------------------------------

_DEFAULT_MAIN_PROCESS_PORT = "29500"  # accelerate's
_TRUE = ("1", "true", "yes", "y", "on", "t")  # what accelerate reads as a set flag


def resume_command(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The shell command that resumes the run started by `argv` (program and arguments) in the environment
    `environ`: launched the same way, with `--resume_from_checkpoint latest` in place of any checkpoint it named.

    Under `accelerate launch` with several processes (`WORLD_SIZE` > 1, set by torchrun) the command is
    `accelerate launch --multi_gpu --num_processes N ...` with the number of machines, mixed precision, dynamo
    backend and a non-default port the launcher put in the environment (`ACCELERATE_USE_CPU` in front when set);
    a resume with another number of processes would be refused. One process: `python SCRIPT.py` or `vqrae-train`.
    """
    program, arguments = (argv[0] if argv else ""), list(argv[1:])
    for index, argument in enumerate(arguments):
        if argument.startswith("--resume_from_checkpoint="):
            arguments[index] = "--resume_from_checkpoint=latest"
        elif argument == "--resume_from_checkpoint" and index + 1 < len(arguments):
            arguments[index + 1] = "latest"
    if not any(a == "--resume_from_checkpoint" or a.startswith("--resume_from_checkpoint=") for a in arguments):
        arguments += ["--resume_from_checkpoint", "latest"]
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return shlex.join(["python", program, *arguments] if program.endswith(".py") else ["vqrae-train", *arguments])
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(world_size)]
    machines = world_size // int(environ.get("LOCAL_WORLD_SIZE", world_size))
    launch += ["--num_machines", str(machines)]
    if machines > 1:
        launch += ["--machine_rank", environ.get("GROUP_RANK", "0"), "--main_process_ip", environ["MASTER_ADDR"]]
    if "ACCELERATE_MIXED_PRECISION" in environ:
        launch += ["--mixed_precision", environ["ACCELERATE_MIXED_PRECISION"]]
    if "ACCELERATE_DYNAMO_BACKEND" in environ:
        launch += ["--dynamo_backend", environ["ACCELERATE_DYNAMO_BACKEND"].lower()]
    if environ.get("MASTER_PORT", _DEFAULT_MAIN_PROCESS_PORT) != _DEFAULT_MAIN_PROCESS_PORT:
        launch += ["--main_process_port", environ["MASTER_PORT"]]
    prefix = "ACCELERATE_USE_CPU=1 " if environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE else ""
    return prefix + shlex.join([*launch, program or "scripts/train.py", *arguments])


def _cli_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


def check_resume(saved: dict, current: dict, path: str) -> None:
    """Refuse to resume the checkpoint at `path` (whose record is `saved`) with a run of another shape, on other
    data or with other weight-shaping options than `current`; the error says what changed and what to pass. Options
    are compared as the user gave them; `max_steps` may grow (the run is extended), never shrink."""
    restart = f"start a new run in another --output_dir from its weights with --init_from {path}"
    if saved["num_processes"] != current["num_processes"]:
        relaunch = saved["resume_command"] or (
            f"accelerate launch --num_processes {saved['num_processes']} ... --resume_from_checkpoint latest"
        )
        raise UsageError(
            f"The checkpoint {path} was written by a run of {saved['num_processes']} process(es), and this run has "
            f"{current['num_processes']}: each process reads its own share of every batch, so resuming would repeat "
            f"or skip examples. To {restart}; to resume, launch {saved['num_processes']} process(es) as the run "
            f"was launched: {relaunch}"
        )
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if saved[name] != current[name]:
            raise UsageError(
                f"The checkpoint {path} was trained with --{name} {saved[name]} and this run asks for "
                f"{current[name]}: the position of every example in the data stream depends on it. Resume with "
                f"--{name} {saved[name]}."
            )
    if saved["dataset"] != current["dataset"]:
        changed = [
            f"{key} {_show(saved['dataset'].get(key))} -> {_show(current['dataset'].get(key))}"
            for key in sorted(set(saved["dataset"]) | set(current["dataset"]))
            if saved["dataset"].get(key) != current["dataset"].get(key)
        ]
        raise UsageError(
            f"The training data differs from the data the checkpoint {path} was trained on ({'; '.join(changed)}): "
            f"resuming would read other examples at the saved positions. Resume on the same data, or {restart} on "
            "the new data."
        )
    _check_max_steps(saved["options"].get("max_steps"), current["options"].get("max_steps"), path)
    changed = {
        name: (value, current["options"].get(name))
        for name, value in saved["options"].items()
        if name not in RESUMABLE_OPTIONS and name != "max_steps" and current["options"].get(name) != value
    }
    if changed:
        details = ", ".join(
            f"--{name} {_show(new)} (trained with {_show(old)})" for name, (old, new) in changed.items()
        )
        restore = " ".join(
            f"--{name} {_cli_value(old)}" if old is not None else f"no --{name}" for name, (old, _) in changed.items()
        )
        raise UsageError(
            f"This resume changes options that the checkpoint {path} cannot honour: {details}. Its weights, "
            f"optimiser, schedule and data position were made with the old values; pass them again ({restore}), or "
            f"{restart}."
        )


def _check_max_steps(saved: int | None, current: int | None, path: str) -> None:
    if saved is not None and current is not None and current < saved:
        raise UsageError(
            f"This resume asks for --max_steps {current}, fewer than the {saved} the checkpoint {path} was trained "
            f"towards: a resume can extend a run (a larger --max_steps; the schedule is rebuilt for it) but not "
            f"shorten it. Pass --max_steps {saved} or more."
        )
