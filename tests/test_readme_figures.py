"""Every figure README.md quotes is the one `scripts/readme_figures.py` computes from the committed
bench/BENCHMARKS.md and docs/default_eval_results.json, so a rerun benchmark or a new default run cannot leave the
README behind."""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_figures = load_script()


@pytest.fixture(scope="module")
def sources():
    return readme_figures.load_sources()


def test_readme_quotes_the_figures_of_the_committed_files(sources):
    readme = readme_figures.README.read_text()
    rendered = readme_figures.render(readme, readme_figures.figures(sources))
    assert readme_figures.differences(readme, rendered) == [], "run `python scripts/readme_figures.py`"
    assert rendered == readme


def test_the_check_command_passes_on_the_committed_readme():
    result = subprocess.run(
        [sys.executable, "scripts/readme_figures.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_new_default_run_or_benchmark_shows_as_a_difference(sources):
    readme = readme_figures.README.read_text()
    changed_run = copy.deepcopy(sources.eval)
    changed_run["used_codes"] += 1
    run = readme_figures.Sources(sources.benchmarks, changed_run)
    diff = readme_figures.differences(readme, readme_figures.render(readme, readme_figures.figures(run)))
    assert diff and all(line.startswith("default.used_codes:") for line in diff)

    # Section 4's full-matmul time, 5.10 s, made slower than the chunked search: the wording follows the data.
    full = next(row["s"] for row in sources.rows("bench_vq_search") if row["method"] == "full matmul")
    section = sources.section("bench_vq_search")
    benchmarks = sources.benchmarks.replace(
        section, section.replace(f"| full matmul | {full} |", "| full matmul | 9.99 |")
    )
    values = readme_figures.figures(readme_figures.Sources(benchmarks, sources.eval))
    assert values["vq_search.full"] == "9.99 s"
    assert values["vq_search.slower"].endswith("faster")


def test_a_section_measured_on_another_default_model_is_refused(sources):
    other = copy.deepcopy(sources.eval)
    other["psnr"] += 0.5
    with pytest.raises(readme_figures.FigureError, match="bench_heldout.*docs/default_eval_results.json"):
        readme_figures.figures(readme_figures.Sources(sources.benchmarks, other))


def test_unknown_spans_and_unquoted_figures_are_refused(sources):
    values = readme_figures.figures(sources)
    readme = readme_figures.README.read_text()
    with pytest.raises(readme_figures.FigureError, match="unknown names \\['no.such'\\]"):
        readme_figures.render(readme + "<!-- fig:no.such -->1<!-- /fig -->", values)
    without = readme.replace("<!-- fig:vq_search.full_mib -->", "<!-- gone -->")
    with pytest.raises(readme_figures.FigureError, match="quotes none of the figures \\['vq_search.full_mib'\\]"):
        readme_figures.render(without, values)


def test_ranges_are_not_read_as_negative_numbers():
    assert readme_figures.numbers("2.47x (0.74-8.93)") == [2.47, 0.74, 8.93]
    assert readme_figures.numbers("21.74 (-0.008; -0.027 to +0.003)") == [21.74, -0.008, -0.027, 0.003]
    assert readme_figures.numbers("22,504 of 64,000 (35.2 %)") == [22504, 64000, 35.2]
