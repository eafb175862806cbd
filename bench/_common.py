"""Shared helpers of the benchmark scripts: the machine line, alternating timings, peak resident memory, and the
section of bench/BENCHMARKS.md each script (re)writes.

Timings: every compared callable runs once as a warm-up, then `repeats` rounds in which each runs once, in an order
that rotates from round to round, so a slow spell of the machine hits every side alike; the figure is the median.
Peak memory: the process's resident-set high-water mark (`VmHWM`), reset through `/proc/self/clear_refs` before the
measured call, so both sides of a comparison are measured in the same process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS_MD = BENCH_DIR / "BENCHMARKS.md"
# The order of the sections in BENCHMARKS.md, whichever script runs first.
SECTION_ORDER = [
    "bench_fsq",
    "bench_breakdown",
    "bench_e2e",
    "bench_vq_search",
    "bench_training",
    "bench_quality",
    "bench_codebook",
    "bench_heldout",
    "bench_tokenize",
    "bench_gpu",
    "bench_precision",
    "bench_stage2",
]

_HEADER = """# vqrae benchmarks

Each section below is written by one script in `bench/` (rerunning a script replaces its own section). Every
section names the machine and the exact command; timings are medians after a warm-up, and the two sides of every
comparison run in the same process, alternating. A load average above half the core count at the start means
other work shared the CPU: such figures are marked NOISY.
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# What a benchmark's figures depend on: the library, the scripts and the recipes. BENCHMARKS.md and the curves are
# what the scripts write, so they do not count as a change of the code.
_CODE_PATHS = ["src", "bench", "configs", ":(exclude)bench/BENCHMARKS.md", ":(exclude)bench/quality_curves.png"]


def _git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=BENCH_DIR.parent, capture_output=True, text=True, check=True).stdout


def code_identity() -> dict:
    """The commit the scripts run from (`git rev-parse HEAD`) and whether the code differs from it: `dirty` is None
    for a clean tree, else a hash of the uncommitted changes (tracked diffs and untracked files) to the library,
    the scripts and the recipes, so that two runs of the same uncommitted code have the same identity. Both are
    "unknown" outside a git checkout."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=all", "--", *_CODE_PATHS)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": "unknown"}
    if not status.strip():
        return {"commit": commit, "dirty": None}
    digest = hashlib.sha256(_git("diff", "HEAD", "--binary", "--", *_CODE_PATHS).encode())
    root = BENCH_DIR.parent
    for line in sorted(status.splitlines()):
        if line.startswith("??"):
            path = line[3:]
            digest.update(path.encode() + b"\0" + (root / path).read_bytes())
    return {"commit": commit, "dirty": digest.hexdigest()[:16]}


def git_commit() -> str:
    """The short commit of the machine line, "+dirty" when the library, the scripts or the recipes differ from it."""
    identity = code_identity()
    if identity["commit"] == "unknown":
        return "unknown"
    return identity["commit"][:7] + ("+dirty" if identity["dirty"] else "")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_line(start_load: float | None = None) -> str:
    """CPU model, cores, threads, torch version, accelerator, commit, and how busy the machine was."""
    cores = os.cpu_count()
    load = load_average() if start_load is None else start_load
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible)"
    else:
        gpu = "no GPU lent to this run (CPU only)"
    noisy = f" -- NOISY: load average {load:.1f} on {cores} cores at the start" if load > 0.5 * cores else ""
    return (
        f"{cpu_model()}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {gpu}, vqrae {git_commit()}, load average {load:.1f}{noisy}"
    )


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(BENCH_DIR.parent)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare_samples(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each callable in each round: `warmup` untimed rounds, then `repeats` rounds of one call each, in
    an order that rotates from round to round. Sample `i` of every callable comes from round `i`, so ratios can be
    taken round by round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_once(fns[name]))
    return samples


def compare(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable (see `compare_samples`)."""
    samples = compare_samples(fns, repeats, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def _vm_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def peak_rss_mib(fn: Callable[[], object]) -> tuple[float, float]:
    """Run `fn` once; returns (peak resident MiB of the process during the call, rise of that peak over the
    resident size just before the call). Linux only (the high-water mark is reset through /proc/self/clear_refs)."""
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap memory back first, so the rise counts the call's own memory, not recycled pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan"), float("nan")
    before = _vm_kib("VmRSS")
    result = fn()
    peak = _vm_kib("VmHWM")
    del result
    return peak / 1024, (peak - before) / 1024


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(
    key: str, title: str, body: str, start_load: float, path: Path = BENCHMARKS_MD, machine: bool = True
) -> str:
    """Print the section and put it in BENCHMARKS.md, replacing this script's previous section (marked by
    `key`) in place, or appending it when there is none. `machine=False` leaves out the machine line and the
    command (the body's subsections carry their own)."""
    head = f"Machine: {machine_line(start_load)}\n\nCommand: `{command_line()}`\n\n" if machine else ""
    section = f"<!-- {key}:start -->\n## {title}\n\n{head}{body.strip()}\n<!-- {key}:end -->\n"
    print(section)
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(r"<!-- (\w+):start -->.*?<!-- \1:end -->\n", re.DOTALL)
    sections = {match.group(1): match.group(0) for match in pattern.finditer(text)}
    header = text[: min((text.find(f"<!-- {name}:start -->") for name in sections), default=len(text))]
    sections[key] = section
    order = sorted(sections, key=lambda name: SECTION_ORDER.index(name) if name in SECTION_ORDER else len(sections))
    text = header.rstrip("\n") + "\n\n" + "\n".join(sections[name] for name in order)
    path.write_text(text)
    return section


def bench_parser(description: str, repeats: int | None = None, threads: bool = True) -> argparse.ArgumentParser:
    """The options every script shares: `--smoke`, `--no-write` and, where it times things, `--repeats` and
    `--threads`."""
    parser = argparse.ArgumentParser(description=description)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the script's whole code path at tiny sizes, in seconds, to check that it runs; implies --no-write",
    )
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv=None, smoke: dict | None = None):
    """Parse, and set torch's threads when `--threads` is given. With `--smoke`, the values in `smoke` replace the
    defaults of those options (an option given on the command line still wins) and nothing is written."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**(smoke or {}))
        args = parser.parse_args(argv)
        args.no_write = True
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args


def publish(
    name: str, title: str, body: str, start_load: float, no_write: bool, subsection: tuple | None = None
) -> None:
    """The ending every script shares: print the body (`--no-write`), or write it into BENCHMARKS.md under the
    machine line and the command (`write_section`). `subsection`: `(intro, subsections, sub_key)` of
    `write_subsection`, for a script whose parts run on different machines."""
    if no_write:
        print(body, flush=True)
    elif subsection is not None:
        write_subsection(name, title, *subsection, body, start_load)
    else:
        write_section(name, title, body, start_load)


def write_subsection(
    key: str, title: str, intro: str, subsections: list[tuple[str, str]], sub_key: str, body: str, start_load: float
) -> str:
    """Write one subsection (`sub_key`, one of `subsections`' `(key, heading)` pairs) of the section `key`, keeping
    the other subsections as they are in BENCHMARKS.md: for a script whose parts run on different machines (a CPU
    part here, a GPU part when one is lent), each with its own machine line and command. A subsection never written
    yet reads "Not run yet"."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    parts = []
    for name, heading in subsections:
        if name == sub_key:
            part = (
                f"<!-- {name}:start -->\n### {heading}\n\nMachine: {machine_line(start_load)}\n\n"
                f"Command: `{command_line()}`\n\n{body.strip()}\n<!-- {name}:end -->"
            )
        else:
            match = re.search(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", text, re.DOTALL)
            empty = f"<!-- {name}:start -->\n### {heading}\n\nNot run yet.\n<!-- {name}:end -->"
            part = match.group(0) if match else empty
        parts.append(part)
    return write_section(key, title, intro.strip() + "\n\n" + "\n\n".join(parts), start_load, machine=False)


def fmt_rate(value: float) -> str:
    """A rate in a compact form: 1.23M, 45.6k, 789."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _process_tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _memory_kib(pid: int) -> tuple[int, int]:
    """(resident KiB, proportional KiB) of a process. The proportional set size splits pages shared between
    processes (a forked data worker shares most of its parent's) among them, so a sum over processes counts each
    page once; it falls back to the resident size where smaps_rollup is missing."""
    try:
        rss = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
        rss_kib = int(rss.group(1)) if rss else 0
    except OSError:
        return 0, 0
    try:
        pss = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.MULTILINE)
        return rss_kib, int(pss.group(1)) if pss else rss_kib
    except OSError:
        return rss_kib, rss_kib


def run_and_sample_memory(command: list[str], env: dict | None = None, interval: float = 0.1, **popen_kwargs):
    """Run `command` to completion, sampling the memory of its whole process tree every `interval` seconds.
    Returns (return code, wall seconds, peak MiB of the tree's proportional sum, peak resident MiB of its largest
    process)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, **popen_kwargs)
    peak_sum = peak_single = 0
    while process.poll() is None:
        sizes = [_memory_kib(pid) for pid in _process_tree(process.pid)]
        peak_sum = max(peak_sum, sum(pss for _, pss in sizes))
        peak_single = max(peak_single, max((rss for rss, _ in sizes), default=0))
        time.sleep(interval)
    return process.returncode, time.perf_counter() - start, peak_sum / 1024, peak_single / 1024
