"""Write the figures README.md and the pages under docs/ quote from the committed files that hold them, so the
documentation cannot drift from the measurements.

    python scripts/readme_figures.py           # rewrite the figure spans of README.md and docs/*.md
    python scripts/readme_figures.py --check   # exit 1, naming the spans that differ, without writing

A figure in a page is a span `<!-- fig:NAME -->TEXT<!-- /fig -->`; TEXT is what the figure NAME computes from
`bench/BENCHMARKS.md` (the tables and notes the bench scripts write) and `docs/default_eval_results.json` (the
`eval_results.json` of the default `vqrae-train` run, copied from `outputs/vqrae-tiny-cpu`). A span of an unknown
name, a figure no page quotes any more, or a benchmark section measured on another default model than the one in
`docs/default_eval_results.json` is an error. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BENCHMARKS = ROOT / "bench" / "BENCHMARKS.md"
DEFAULT_EVAL = ROOT / "docs" / "default_eval_results.json"
CONV_COLUMN = "post_quant_conv ms (% of decode)"
SPAN = re.compile(r"<!-- fig:([\w.-]+) -->(.*?)<!-- /fig -->", re.DOTALL)


class FigureError(ValueError):
    """A figure that cannot be computed, or a page's span that names none."""


class Sources:
    """The committed files the figures come from, with look-ups by section, row and column."""

    def __init__(self, benchmarks: str, default_eval: dict):
        self.benchmarks = benchmarks
        self.eval = default_eval

    def section(self, key: str) -> str:
        match = re.search(rf"<!-- {key}:start -->(.*?)<!-- {key}:end -->", self.benchmarks, re.DOTALL)
        if match is None:
            raise FigureError(f"bench/BENCHMARKS.md has no section {key!r}")
        return match.group(1)

    def rows(self, key: str) -> list[dict[str, str]]:
        """Every row of every table in the section, as {column header: cell} (bold marks removed)."""
        rows, header = [], None
        for line in self.section(key).splitlines():
            if not line.startswith("|"):
                header = None
                continue
            cells = [cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-"):
                rows.append(dict(zip(header, cells)))
        return rows

    def cell(self, key: str, row: str, column: str) -> str:
        """The cell of `column` in the one row of section `key` whose first cell starts with `row`."""
        matches = [r for r in self.rows(key) if next(iter(r.values())).startswith(row) and column in r]
        if len(matches) != 1:
            raise FigureError(f"section {key!r}: {len(matches)} rows start with {row!r} and have column {column!r}")
        return matches[0][column]

    def note(self, key: str, pattern: str) -> re.Match:
        """The first match of `pattern` in the section's text."""
        match = re.search(pattern, self.section(key))
        if match is None:
            raise FigureError(f"section {key!r} has no text matching {pattern!r}")
        return match


def numbers(text: str) -> list[float]:
    """The numbers in `text`, in order (thousands separators and signs understood; the dash of a range such as
    `1.47-3.97` is not a sign)."""
    return [float(value.replace(",", "")) for value in re.findall(r"(?:(?<![\d.])[-+])?\d[\d,]*\.?\d*", text)]


def signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def interval(values: list[float], digits: int) -> str:
    return f"{values[0]:.{digits}f} [{values[1]:.{digits}f}, {values[2]:.{digits}f}]"


def paired(values: list[float]) -> str:
    """A paired difference in dB with its interval, and whether the interval holds zero."""
    mean, low, high = values
    verdict = "inside the noise" if low <= 0 <= high else "outside the noise"
    return f"{signed(mean)} dB, interval {signed(low)} to {signed(high)}: {verdict}"


def speed_up(values: list[float]) -> str:
    """A median speed ratio with its per-round range, and whether the rounds agree on the side of 1."""
    median, low, high = values
    if low > 1 or high < 1:
        verdict = f"{'faster' if low > 1 else 'slower'} in every round"
    else:
        verdict = "the rounds straddle 1: inside the noise"
    return f"{median:.2f}x (per-round {low:.2f}-{high:.2f}, {verdict})"


def ratio_range(ratios: list[float]) -> str:
    """The range of speed ratios (ours over theirs), and whether they keep to one side of 1."""
    low, high = min(ratios), max(ratios)
    side = "no consistent side" if low < 1 < high else ("always faster" if low >= 1 else "always slower")
    return f"{low:.2f}-{high:.2f}x theirs (below 1: slower; {side})"


# ---------------------------------------------------------------------------------------------------------------
# The figures, by the name of the span that quotes them
# ---------------------------------------------------------------------------------------------------------------


def default_run(s: Sources) -> dict[str, str]:
    """The default run's table and paragraph: docs/default_eval_results.json, and section 6c by tile scale."""
    e = s.eval
    tokens_per_image = e["codebook_tokens"] // e["num_images"]
    codebook_size = round(2 ** (e["bits_per_image"] / tokens_per_image))
    whole, half, quarter = (f"{scale} of the shorter side" for scale in ("1", "0.5", "0.25"))
    whole_ssim = [numbers(s.cell("bench_heldout", whole, f"{m} SSIM"))[0] for m in ("VQRAE", "bicubic")]
    gap = {scale: numbers(s.cell("bench_heldout", scale, "VQRAE - bicubic, paired")) for scale in (whole, half)}
    return {
        "default.steps": str(e["step"]),
        "default.tiles": str(e["num_images"]),
        "default.bits": f"{e['bits_per_image']:.0f}",
        "default.bicubic_bits": f"{e['bicubic_bits_per_image']:.0f}",
        "default.bits_ratio": f"{e['bicubic_bits_per_image'] / e['bits_per_image']:.1f}x",
        "default.psnr": interval([e["psnr"], *e["psnr_interval"]], 2),
        "default.ssim": interval([e["ssim"], *e["ssim_interval"]], 3),
        "default.seam": f"{e['seam_score']:.2f}",
        "default.bicubic_psnr": interval([e["bicubic_psnr"], *e["bicubic_psnr_interval"]], 2),
        "default.bicubic_ssim": interval([e["bicubic_ssim"], *e["bicubic_ssim_interval"]], 3),
        "default.bicubic_seam": f"{e['bicubic_seam_score']:.2f}",
        "default.color": interval([e["color_error"], *e["color_error_interval"]], 1),
        "default.bicubic_color": interval([e["bicubic_color_error"], *e["bicubic_color_error_interval"]], 2),
        "default.used_codes": f"{e['used_codes']:,}",
        "default.codebook_size": f"{codebook_size:,}",
        "default.codebook_tokens": f"{e['codebook_tokens']:,}",
        "default.reachable": f"{100 * e['codebook_tokens'] / codebook_size:.1f} %",
        "heldout.whole.count": s.cell("bench_heldout", whole, "count"),
        "heldout.whole.psnr": s.cell("bench_heldout", whole, "VQRAE PSNR dB"),
        "heldout.whole.ssim": s.cell("bench_heldout", whole, "VQRAE SSIM"),
        "heldout.whole.bicubic_psnr": s.cell("bench_heldout", whole, "bicubic PSNR dB"),
        "heldout.whole.bicubic_ssim": s.cell("bench_heldout", whole, "bicubic SSIM"),
        "heldout.whole.gain": paired(gap[whole]),
        "heldout.whole.ssim_gain": signed(whole_ssim[0] - whole_ssim[1]),
        "heldout.half.gain": paired(gap[half]),
        "heldout.quarter.count": s.cell("bench_heldout", quarter, "count"),
        "heldout.quarter.loss": f"{-numbers(s.cell('bench_heldout', quarter, 'VQRAE - bicubic, paired'))[0]:.2f} dB",
        "heldout.all.gain": paired(numbers(s.cell("bench_heldout", "all tiles", "VQRAE - bicubic, paired"))),
    }


def precision(s: Sources) -> dict[str, str]:
    """Section 9: bf16 against float32 on the default model."""
    held_out, crops = "held-out tiles", "all crops"
    figures = {}
    for label, column in (("weights", "bf16 weights = float32"), ("autocast", "autocast = float32")):
        share, low, high = numbers(s.cell("bench_precision", held_out, column))
        figures[f"bf16.heldout.{label}"] = f"{share:.2f} % (95 % interval {low:.2f}-{high:.2f})"
        figures[f"bf16.crops.{label}"] = f"{numbers(s.cell('bench_precision', crops, column))[0]:.2f} %"
        change = numbers(
            s.cell("bench_precision", held_out, f"PSNR dB {column.split(' =')[0]} (change; 95 % interval)")
        )
        figures[f"bf16.heldout.{label}.psnr_change"] = (
            f"{signed(change[1], 3)} dB (95 % interval {signed(change[2], 3)} to {signed(change[3], 3)})"
        )
        neighbours = s.note(
            "bench_precision", rf"- {column.split(' =')[0]}: of the \d+ differing tokens .*?, ([\d.]+) % move"
        )
        figures[f"bf16.neighbours.{label}"] = f"{float(neighbours.group(1)):.1f} %"
    figures["bf16.heldout.count"] = s.cell("bench_precision", held_out, "images")
    figures["bf16.crops.count"] = s.cell("bench_precision", crops, "images")
    return figures


def headlines(s: Sources) -> dict[str, str]:
    """docs/benchmarks.md's headlines: sections 1, 2, 4, 6, 6b, 8b and 10."""
    fsq = [(int(r["dim"]), float(r["ratio"].rstrip("x"))) for r in s.rows("bench_fsq") if "ratio" in r]
    vq = {r["method"]: r for r in s.rows("bench_vq_search")}
    chunked, full = float(vq["vqrae chunked"]["s"]), float(vq["full matmul"]["s"])
    codebook = {
        name: s.cell("bench_codebook", name, "codes used, 2048 crops (131,072 tokens)")
        for name in ("FSQ", "VQ", "SimVQ")
    }
    codebook_delta = {
        name: numbers(s.cell("bench_codebook", name, "Δ PSNR vs FSQ, paired [95 % CI]")) for name in ("VQ", "SimVQ")
    }
    quality_delta = {
        name: numbers(s.cell("bench_quality", f"{name}:", "Δ PSNR vs a, paired [95 % CI]"))[0]
        for name in ("a-k1", "b", "a-cosmos", "d", "d-simvq")
    }
    stage2 = [numbers(r["Δ PSNR vs start"])[0] for r in s.rows("bench_stage2") if r["arm"].endswith("mean over seeds")]
    cosines = {}  # the lowest over seeds of each stage 2 arm
    for r in s.rows("bench_stage2"):
        if r["arm"].startswith("stage 2,") and numbers(r["seed"]):
            arm = r["arm"].split(",")[-1].strip()
            cosines[arm] = min(cosines.get(arm, 1.0), float(r["encoder cosine to start"]))
    rows_8b = {(r["step"], r["precision"]): r for r in s.rows("bench_gpu_cpu")}
    speed = "speed vs float32, per-round ratio median (min-max)"
    encode_bf16 = numbers(rows_8b[("image -> indices", "bf16 weights")][speed])
    decode_bf16 = numbers(rows_8b[("indices -> image", "bf16 weights")][speed])
    conv_share = {
        k: numbers(s.cell("bench_breakdown", f"FSQ 64,000 + post_quant_conv k={k}", CONV_COLUMN))[1] for k in (1, 3)
    }
    encode_ms = [
        numbers(s.cell("bench_breakdown", name, "encode ms"))[0]
        for name in ("FSQ 64,000 + post_quant_conv k=1", "FSQ 512")
    ]
    return {
        "fsq.agree": s.note("bench_fsq", r"Identical indices on every quantize row: yes \(([\d.]+ %)\)").group(1),
        "fsq.small_dim": f"{min(r for d, r in fsq if d < 100):.1f}-{max(r for d, r in fsq if d < 100):.1f}x",
        "fsq.large_dim": ratio_range([r for d, r in fsq if d >= 100]),
        "codebook.fsq": _codes(codebook["FSQ"]),
        "codebook.vq": _codes(codebook["VQ"]),
        "codebook.simvq": _codes(codebook["SimVQ"]),
        "codebook.fsq.psnr": f"{numbers(s.cell('bench_codebook', 'FSQ', 'PSNR dB [95 % CI]'))[0]:.2f}",
        "codebook.vq.psnr": f"{numbers(s.cell('bench_codebook', 'VQ', 'PSNR dB [95 % CI]'))[0]:.2f}",
        "codebook.simvq.psnr": f"{numbers(s.cell('bench_codebook', 'SimVQ', 'PSNR dB [95 % CI]'))[0]:.2f}",
        **{
            f"codebook.{name.lower()}.delta": f"{signed(d[0])} dB (interval {signed(d[1])} to {signed(d[2])})"
            for name, d in codebook_delta.items()
        },
        **{
            f"codebook.{name.lower()}.ssim": f"{numbers(s.cell('bench_codebook', name, 'SSIM [95 % CI]'))[0]:.3f}"
            for name in ("FSQ", "VQ", "SimVQ")
        },
        "breakdown.k1": f"{conv_share[1]:.1f} %",
        "breakdown.k3": f"{conv_share[3]:.1f} %",
        "breakdown.codes_encode": f"{signed(100 * (encode_ms[0] / encode_ms[1] - 1), 1)} %",
        **{
            f"quality.{name}": f"{signed(value)} dB"
            for name, value in quality_delta.items()
            if name in ("a-k1", "b", "a-cosmos")
        },
        "quality.vq": f"{quality_delta['d']:.1f}",
        "quality.simvq": f"{quality_delta['d-simvq']:.1f}",
        "quality.seed_decoder.seam": f"{numbers(s.cell('bench_quality', 'a-seed-decoder:', 'seam score'))[0]:.1f}",
        "quality.a.seam": f"{numbers(s.cell('bench_quality', 'a:', 'seam score'))[0]:.1f}",
        "quality.seed_decoder.psnr": interval(
            numbers(s.cell("bench_quality", "a-seed-decoder:", "PSNR dB [95 % CI]")), 2
        ),
        "quality.e.psnr": f"{numbers(s.cell('bench_quality', 'e:', 'PSNR dB [95 % CI]'))[0]:.2f} dB",
        "stage2.range": f"{signed(min(stage2))} to {signed(max(stage2))} dB",
        "stage2.cosine_distilled": f"{cosines['self-distillation (weight 1)']:.4f}",
        "stage2.cosine_free": f"{cosines['no distillation (weight 0)']:.3f}",
        "bf16cpu.encode": speed_up(encode_bf16),
        "bf16cpu.decode": speed_up(decode_bf16),
        "vq_search.chunked": f"{chunked:.2f} s",
        "vq_search.full": f"{full:.2f} s",
        "vq_search.slower": f"{100 * abs(chunked / full - 1):.0f} % {'slower' if chunked > full else 'faster'}",
        "vq_search.chunked_mib": f"{vq['vqrae chunked']['distance matrix MiB']} MiB",
        "vq_search.full_mib": f"{vq['full matmul']['distance matrix MiB']} MiB",
    }


def _codes(cell: str) -> str:
    """ "22,504 of 64,000 (35.2 %)" -> "22,504 codes (35.2 %)"."""
    used, _, share = numbers(cell)
    return f"{used:,.0f} codes ({share:.1f} %)"


def check_same_model(s: Sources) -> None:
    """The sections the pages quote as measurements of the default model (6c, which fills rows of the default
    run's table, and 9) must have measured the one in docs/default_eval_results.json: a section left from an older
    model would mix two models in one page. (Sections 6b and 10 train their own runs; docs/benchmarks.md says so.)"""
    e = s.eval
    expected = interval([e["psnr"], *e["psnr_interval"]], 2)
    found = s.cell("bench_heldout", "all tiles", "VQRAE PSNR dB")
    if found != expected:
        raise FigureError(
            f"section 'bench_heldout' (all tiles) measured {found} dB, docs/default_eval_results.json says "
            f"{expected}: rerun `python bench/bench_heldout.py` on the default model"
        )
    match = s.note(
        "bench_precision",
        r"(\d+) in the model folder's eval_results.json \(step (\d+)\); float32 PSNR "
        r"[\d.]+ dB here, ([\d.]+) dB there",
    )
    if (int(match.group(1)), int(match.group(2)), match.group(3)) != (e["num_images"], e["step"], f"{e['psnr']:.2f}"):
        raise FigureError(
            f"section 'bench_precision' measured a model whose eval_results.json has {match.group(1)} images, step "
            f"{match.group(2)}, PSNR {match.group(3)} dB; docs/default_eval_results.json has {e['num_images']}, "
            f"{e['step']}, {e['psnr']:.2f}: rerun `python bench/bench_precision.py` on the default model"
        )


def colour(s: Sources) -> dict[str, str]:
    """docs/training.md's colour paragraph: section 6d over all tiles, the tiny preset against the colour images with
    the channel permutation (cells by position: the table repeats its "Δ vs a, paired" header), and its
    step-by-step table's FSQ noise against none, by tile scale."""
    cells, steps = {}, {}
    for line in s.section("bench_colour").splitlines():
        parts = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| all tiles") and len(parts) > 8:
            cells[parts[1]] = parts
        elif line.startswith("| ") and len(parts) == 6 and parts[1:3] == ["colour-permute-noise", "colour-permute"]:
            steps[parts[0].split(" (")[0]] = parts  # the step-by-step table: the FSQ noise against no noise
    preset, variant = cells["a"], cells["colour-permute"]
    noise = {}
    for tiles, label in (("all tiles", "all"), ("1 side", "whole"), ("0.5 side", "half"), ("0.25 side", "quarter")):
        noise[f"colour.noise.{label}.psnr_change"] = steps[tiles][4]
    noise["colour.noise.all.ssim_change"] = steps["all tiles"][5]
    noise["colour.noise.all.colour_change"] = steps["all tiles"][3]
    return {
        **noise,
        "colour.preset": preset[2].split(" [")[0],
        "colour.colour_permute": variant[2].split(" [")[0],
        "colour.colour_permute.change": variant[3],
        "colour.colour_permute.psnr_change": variant[5],
        "colour.colour_permute.ssim_change": variant[7],
        "colour.steps": s.note("bench_colour", r"(\d+) steps per run").group(1),
        "colour.seeds": str(len(numbers(s.note("bench_colour", r"seeds \[([\d, ]+)\]").group(1)))),
    }


FIGURE_GROUPS = (default_run, precision, headlines, colour)


def figures(sources: Sources) -> dict[str, str]:
    """Every figure the pages quote, by span name."""
    check_same_model(sources)
    result = {}
    for group in FIGURE_GROUPS:
        result.update(group(sources))
    return result


def pages() -> list[Path]:
    """The pages that may quote figures: README.md and the Markdown pages under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def read_pages() -> dict[str, str]:
    """{page name relative to the repository: text} of every page."""
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in pages()}


def render(text: str, values: dict[str, str], name: str = "README.md") -> str:
    """`text` (the page `name`) with every figure span holding its value. A span of an unknown name raises
    `FigureError`."""
    unknown = sorted({match.group(1) for match in SPAN.finditer(text)} - set(values))
    if unknown:
        raise FigureError(f"{name} has figure spans of unknown names {unknown}; known: {sorted(values)}")
    return SPAN.sub(lambda match: f"<!-- fig:{match.group(1)} -->{values[match.group(1)]}<!-- /fig -->", text)


def render_pages(texts: dict[str, str], values: dict[str, str]) -> dict[str, str]:
    """Every page of `texts` ({page name: text}) rendered. A figure that no page quotes raises `FigureError`."""
    quoted = {match.group(1) for text in texts.values() for match in SPAN.finditer(text)}
    unused = sorted(set(values) - quoted)
    if unused:
        raise FigureError(
            f"no page ({', '.join(texts)}) quotes the figures {unused}; quote them or remove them from the script"
        )
    return {name: render(text, values, name) for name, text in texts.items()}


def differences(text: str, rendered: str, name: str = "") -> list[str]:
    """`name: span: page text != computed text` for every span that differs."""
    found = [(m.group(1), m.group(2)) for m in SPAN.finditer(text)]
    wanted = [m.group(2) for m in SPAN.finditer(rendered)]
    prefix = f"{name}: " if name else ""
    return [f"{prefix}{span}: {have!r} != {want!r}" for (span, have), want in zip(found, wanted) if have != want]


def load_sources(benchmarks: Path = BENCHMARKS, default_eval: Path = DEFAULT_EVAL) -> Sources:
    return Sources(benchmarks.read_text(), json.loads(default_eval.read_text()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report the spans that differ; write nothing")
    args = parser.parse_args(argv)
    texts = read_pages()
    try:
        rendered = render_pages(texts, figures(load_sources()))
    except FigureError as error:
        print(f"readme_figures.py: error: {error}", file=sys.stderr)
        return 2
    diff = [line for name in texts for line in differences(texts[name], rendered[name], name)]
    if args.check:
        for line in diff:
            print(line)
        return 1 if diff else 0
    for name, text in rendered.items():
        if text != texts[name]:
            (ROOT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
