"""The benchmark scripts run: each one's `--smoke` mode (tiny sizes, a few steps, its whole code path) exits 0 in a
subprocess and writes nothing into the repository, so a script broken by a library change fails here, not on the
machine it was meant for. A new script without a smoke mode fails too (the scripts are found by glob)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py") if not path.name.startswith("_"))
# What running the scripts may leave in the repository: byte code and tool caches, not results.
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".venv"}


def _snapshot() -> dict[str, tuple[int, int]]:
    """(modification time, size) of every file of the repository outside caches."""
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [name for name in dirs if name not in _SKIP_DIRS]
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            files[os.path.relpath(os.path.join(folder, name), ROOT)] = (stat.st_mtime_ns, stat.st_size)
    return files


def _run(script: str, *arguments: str, timeout: int = 540) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *arguments], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_mode_runs_and_writes_nothing(script):
    before = _snapshot()
    result = _run(script, "--smoke")
    after = _snapshot()
    assert result.returncode == 0, f"{script} --smoke failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.stdout.strip(), f"{script} --smoke printed nothing"
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"{script} --smoke wrote into the repository: {changed}"


def test_heldout_bits_follow_the_model():
    """The bits per image that bench_heldout prints come from the model's codebook and token grid: a 512-code FSQ
    model's 64 tokens carry 576 bits (the default model's 64,000 codes: 1022), the 8x8 thumbnail 1536. (The smoke
    run above prints the line from them.)"""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_heldout import bits_per_image
    finally:
        sys.path.remove(str(BENCH))
    from vqrae import VQRAEConfig
    from vqrae.presets import QUANTIZER_PRESETS, VISION_PRESETS

    default = VQRAEConfig(vision_config=dict(VISION_PRESETS["tiny"]), **QUANTIZER_PRESETS["cosmos_fsq"])
    assert [round(bits) for bits in bits_per_image(default)] == [1022, 1536]
    small = VQRAEConfig(vision_config=dict(VISION_PRESETS["tiny"]), **QUANTIZER_PRESETS["standard_fsq"])
    assert small.codebook_size == 512
    assert [round(bits) for bits in bits_per_image(small)] == [576, 1536]


def test_quality_reuse_refuses_runs_of_other_code(tmp_path):
    """`bench_quality.py --reuse` reads a cached run only when it was made by this code (commit and uncommitted
    changes recorded with it), and refuses one of another commit in one line, exit status 2."""
    keep = tmp_path / "keep"
    arguments = ["--smoke", "--variants", "a", "--keep", str(keep)]
    first = _run("bench_quality.py", *arguments)
    assert first.returncode == 0, first.stderr[-5000:]
    reused = _run("bench_quality.py", *arguments, "--reuse")
    assert reused.returncode == 0, reused.stderr[-5000:]
    assert "a-seed1: reusing the finished run" in reused.stdout

    record_path = keep / "a-seed1" / "bench_command.json"
    record = json.loads(record_path.read_text())
    record["code"]["commit"] = "0" * 40
    record_path.write_text(json.dumps(record))
    refused = _run("bench_quality.py", *arguments, "--reuse")
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-5000:]
    assert "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("bench_quality.py: error: --reuse: the run in ") and "commit 000000000000" in last


# The machine line `_common.machine_line` writes, and nothing else: a note added by hand does not match.
_MACHINE_LINE = re.compile(
    r"Machine: .+, \d+ cores, torch \S+ \(\d+ threads\), Python \S+, .+, vqrae (?P<commit>[0-9a-f]{7}|unknown)"
    r"(\+dirty)?, load average [\d.]+( -- NOISY: load average [\d.]+ on \d+ cores at the start)?"
)
# A section of BENCHMARKS.md with no subsection inside (a script whose parts run on different machines writes one
# subsection per part, each with its own machine line).
_LEAF_SECTION = re.compile(r"<!-- (\w+):start -->((?:(?!<!-- \w+:start -->).)*?)<!-- \1:end -->", re.DOTALL)


def test_benchmarks_md_stamps_are_the_scripts_own():
    """Every (sub)section of BENCHMARKS.md has one machine line and one command, in the form the scripts write them,
    naming a commit of this repository."""
    sections = _LEAF_SECTION.findall((BENCH / "BENCHMARKS.md").read_text())
    assert len(sections) >= len(SCRIPTS)
    for name, body in sections:
        if body.strip().endswith("Not run yet."):
            continue
        machines = [line for line in body.splitlines() if line.startswith("Machine:")]
        assert len(machines) == 1, f"section {name}: {len(machines)} machine lines"
        match = _MACHINE_LINE.fullmatch(machines[0])
        assert match, f"section {name}: not the machine line the scripts write: {machines[0]}"
        assert len(re.findall(r"^Command: `python bench/\w+\.py[^`]*`$", body, re.MULTILINE)) == 1, name
        commit = match.group("commit")
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
        assert commit == "unknown" or known.returncode == 0, f"section {name}: no commit {commit} in this repository"
