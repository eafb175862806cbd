"""Training throughput and memory of the tiny CPU preset: joint vs stage 1 vs stage 2, one vs two CPU processes.

    python bench/bench_training.py                  # 6 runs x 2 rounds of 40 steps (~5 min on 2 cores)
    python bench/bench_training.py --steps 20 --rounds 1 --no-write
    python bench/bench_training.py --smoke          # stage 2 in 1 and 2 processes, 2 steps: checks it runs

Each run is `vqrae-train --config tiny_cpu` (the built-in default: random tiny encoder, 64-px crops of the
built-in photos, FSQ [8, 8, 8, 5, 5, 5] + post_quant_conv, one torch thread and one data worker per process) for
`--steps` optimiser steps:

- joint: the randomly initialised encoder trained with the rest (what `vqrae-train` does with no arguments);
- stage 1: `--init_from` a saved tiny model, `--stage 1`: encoder frozen (run without a graph);
- stage 2: `--init_from` the same model, `--stage 2`: encoder trained, plus the frozen teacher copy for
  self-distillation;

each in one process (`python -m vqrae.cli.train`) and in two CPU processes (`accelerate launch --multi_gpu
--num_processes 2` with `ACCELERATE_USE_CPU=1`), with the preset's batch split over the processes so the global
batch stays the same. images/s is the median of the trainer's own `images_per_second` windows in
metrics.jsonl after the first (warm-up) window; peak memory is sampled every 0.1 s over the whole process tree
(launcher, training processes, data workers), summing proportional set sizes so pages a forked data worker shares
with its parent count once. Runs alternate: the second round goes in reverse order; the table gives the mean.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import bench_parser, load_average, markdown_table, parse_bench_args, publish, run_and_sample_memory

from vqrae.atomic_io import save_pretrained_atomic
from vqrae.training.args import OPTION_NAMES, ModelArguments
from vqrae.training.config_files import load_config_file
from vqrae.training.trainer import build_model

MODES = ("joint", "stage 1", "stage 2")


def save_start_model(folder: Path) -> str:
    """The randomly initialised tiny model `vqrae-train` builds, saved for `--init_from`."""
    torch.manual_seed(0)
    model = build_model(ModelArguments())
    save_pretrained_atomic(model, folder, model.get_image_processor())
    return str(folder)


def command(mode: str, processes: int, output_dir: Path, start_model: str, steps: int, batch_size: int):
    options = [
        "--config", "tiny_cpu", "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
        "--max_steps", str(steps), "--logging_steps", str(max(1, steps // 4)), "--eval_steps", str(10 * steps),
        "--save_steps", str(10 * steps), "--max_eval_samples", "8", "--num_reconstructions", "0",
        "--disable_tqdm", "true", "--per_device_train_batch_size", str(batch_size // processes),
    ]  # fmt: skip
    if mode != "joint":
        options += ["--init_from", start_model, "--stage", mode[-1]]
    env = dict(os.environ)
    if processes == 1:
        return [sys.executable, "-m", "vqrae.cli.train", *options], env
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vqrae.cli.train",
    ]  # fmt: skip
    return launcher + options, env


def images_per_second(metrics_path: Path) -> float:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rates = [r["images_per_second"] for r in records if r.get("type") == "train"]
    if not rates:
        raise RuntimeError(f"No training records in {metrics_path}.")
    return statistics.median(rates[1:] or rates)


def verdict_lines(mean, modes: list[str], processes: list[int]) -> str:
    """What the table says, for the modes and process counts that ran (`mean(run, column)`: a run's mean)."""
    lines = []
    if {"joint", "stage 1", "stage 2"} <= set(modes):
        joint, stage1, stage2 = (mean((mode, 1), 0) for mode in MODES)
        lines.append(
            f"- One process: stage 1 (encoder frozen) trains at {stage1:.0f} images/s, {stage1 / joint:.2f}x the "
            f"joint run's {joint:.0f}; stage 2 (encoder trained, plus the teacher's forward pass) at {stage2:.0f} "
            f"images/s, {stage2 / joint:.2f}x joint."
        )
    for count in processes[1:]:
        speedups = [mean((mode, count), 0) / mean((mode, 1), 0) for mode in modes]
        memory = [mean((mode, count), 1) / mean((mode, 1), 1) for mode in modes]
        number = "two" if count == 2 else str(count)
        lines.append(
            f"- {number.capitalize()} CPU processes on this {os.cpu_count()}-core machine: {min(speedups):.2f}x to "
            f"{max(speedups):.2f}x the one-process throughput, with {min(memory):.2f}x to {max(memory):.2f}x the "
            "memory (each process holds the model, optimiser and data). "
            + (
                f"{number.capitalize()} processes beat one here: one process's threads do not keep the cores busy."
                if min(speedups) > 1.1
                else f"On these cores one process's threads already use the machine: {number} processes buy no speed."
            )
        )
    return "".join(line + "\n" for line in lines)


def main(argv=None):
    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all runs, every other one reversed")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="global batch, split over the processes (default: the preset's)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts; 1 comes first")
    args = parse_bench_args(parser, argv, smoke={"steps": 2, "rounds": 1, "modes": ["stage 2"]})
    if args.batch_size is None:
        args.batch_size = load_config_file("tiny_cpu", OPTION_NAMES)["per_device_train_batch_size"]
    if args.processes[0] != 1:
        parser.error(f"--processes must start with 1, the reference of the speed-ups (got {args.processes})")
    start_load = load_average()

    runs = [(mode, processes) for mode in args.modes for processes in args.processes]
    results: dict[tuple, list] = {run: [] for run in runs}
    with tempfile.TemporaryDirectory(prefix="vqrae-bench-training-") as tmp:
        start_model = save_start_model(Path(tmp) / "start")
        for round_index in range(args.rounds):
            for mode, processes in runs if round_index % 2 == 0 else runs[::-1]:
                output_dir = Path(tmp) / f"{mode.replace(' ', '')}-{processes}"
                cmd, env = command(mode, processes, output_dir, start_model, args.steps, args.batch_size)
                log = open(Path(tmp) / "log.txt", "w")  # noqa: SIM115
                code, wall, peak_sum, peak_single = run_and_sample_memory(cmd, env=env, stdout=log, stderr=log)
                log.close()
                if code != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{(Path(tmp) / 'log.txt').read_text()[-3000:]}")
                rate = images_per_second(output_dir / "metrics.jsonl")
                results[(mode, processes)].append((rate, peak_sum, peak_single, wall))
                print(mode, processes, f"{rate:.1f} images/s, peak {peak_sum:.0f} MiB, {wall:.1f} s", flush=True)

    def mean(run, column):
        return statistics.mean(sample[column] for sample in results[run])

    rows = []
    for mode, processes in runs:
        rate = mean((mode, processes), 0)
        rows.append(
            [
                mode,
                processes,
                f"{args.batch_size // processes} x {processes}",
                f"{rate:.1f}",
                " / ".join(f"{sample[0]:.1f}" for sample in results[(mode, processes)]),
                f"{rate / mean((mode, 1), 0):.2f}x",
                f"{mean((mode, processes), 1):.0f}",
                f"{mean((mode, processes), 2):.0f}",
                f"{mean((mode, processes), 3):.1f}",
            ]
        )
    header = [
        "mode",
        "processes",
        "batch",
        "images/s (mean)",
        "images/s per round",
        "vs 1 process",
        "peak MiB, all processes (PSS sum)",
        "peak RSS MiB, largest process",
        "wall s (incl. start-up, eval)",
    ]
    verdict = verdict_lines(mean, args.modes, args.processes)
    spread = max(
        (max(sample[0] for sample in samples) - min(sample[0] for sample in samples))
        / statistics.mean(sample[0] for sample in samples)
        for samples in results.values()
    )
    if spread > 0.2:
        verdict += (
            f"- Caution: the rounds of one run differ by up to {100 * spread:.0f} % (other work on the machine), so "
            "the comparisons above are within the noise; rerun on a quiet machine.\n"
        )
    body = markdown_table(header, rows) + "\n\n" + verdict
    publish("bench_training", "5. Training throughput and memory (tiny preset)", body, start_load, args.no_write)


if __name__ == "__main__":
    main()
