"""Every figure README.md and the pages under docs/ quote is the one `scripts/readme_figures.py` computes from the
committed bench/BENCHMARKS.md and docs/default_eval_results.json, so a rerun benchmark or a new default run cannot
leave the documentation behind."""

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


def test_the_pages_quote_the_figures_of_the_committed_files(sources):
    texts = readme_figures.read_pages()
    assert {"README.md", "docs/benchmarks.md", "docs/guarantees.md"} <= set(texts)
    rendered = readme_figures.render_pages(texts, readme_figures.figures(sources))
    for name, text in texts.items():
        assert readme_figures.differences(text, rendered[name], name) == [], "run `python scripts/readme_figures.py`"
    assert rendered == texts


def test_the_check_command_passes_on_the_committed_readme():
    result = subprocess.run(
        [sys.executable, "scripts/readme_figures.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_new_default_run_or_benchmark_shows_as_a_difference(sources):
    texts = readme_figures.read_pages()
    changed_run = copy.deepcopy(sources.eval)
    changed_run["used_codes"] += 1
    run = readme_figures.Sources(sources.benchmarks, changed_run)
    rendered = readme_figures.render_pages(texts, readme_figures.figures(run))
    diff = [line for name in texts for line in readme_figures.differences(texts[name], rendered[name], name)]
    assert diff and all(line.startswith("docs/benchmarks.md: default.used_codes:") for line in diff)

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
    texts = readme_figures.read_pages()
    with pytest.raises(
        readme_figures.FigureError, match="docs/x.md has figure spans of unknown names \\['no.such'\\]"
    ):
        readme_figures.render("<!-- fig:no.such -->1<!-- /fig -->", values, "docs/x.md")
    gone = "<!-- fig:vq_search.full_mib -->"
    without = {name: text.replace(gone, "<!-- gone -->") for name, text in texts.items()}
    assert without != texts
    with pytest.raises(readme_figures.FigureError, match="quotes the figures \\['vq_search.full_mib'\\]"):
        readme_figures.render_pages(without, values)


def test_the_check_command_names_a_stale_docs_page(tmp_path):
    """`--check` reads docs/ pages as well as README.md: a figure edited by hand in a docs page is reported."""
    import shutil

    for folder in ("scripts", "bench", "docs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    shutil.copy(ROOT / "README.md", tmp_path)
    page = tmp_path / "docs" / "guarantees.md"
    text = page.read_text()
    assert "<!-- fig:bf16.crops.count -->" in text
    page.write_text(text.replace("<!-- fig:bf16.crops.count -->", "<!-- fig:bf16.crops.count -->1"))
    script = [sys.executable, "scripts/readme_figures.py"]
    check = subprocess.run([*script, "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 1 and check.stdout.startswith("docs/guarantees.md: bf16.crops.count:"), check.stdout
    assert subprocess.run(script, cwd=tmp_path).returncode == 0
    assert page.read_text() == text


def test_ranges_are_not_read_as_negative_numbers():
    assert readme_figures.numbers("2.47x (0.74-8.93)") == [2.47, 0.74, 8.93]
    assert readme_figures.numbers("21.74 (-0.008; -0.027 to +0.003)") == [21.74, -0.008, -0.027, 0.003]
    assert readme_figures.numbers("22,504 of 64,000 (35.2 %)") == [22504, 64000, 35.2]
