"""The pictures of a training run: reconstructions, training curves and codebook usage (matplotlib, Agg)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_codebook_usage", "plot_reconstructions", "plot_training_curves"]


def _pyplot():
    """pyplot on the Agg backend, chosen when the first picture is drawn rather than when this module is imported
    (importing it leaves the backend of the caller's session alone)."""
    try:  # the [train] extra
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(f'The run\'s pictures need matplotlib ({error}): `pip install "vqrae[train]"`.') from error
    return plt


def plot_reconstructions(
    path: str,
    originals: list[Image.Image],
    reconstructions: list[Image.Image],
    bicubic: list[Image.Image] | None = None,
    metrics: dict | None = None,
) -> None:
    """Validation originals (top row) above their reconstructions from the tokens, and, when given, the bicubic
    baseline of the same token grid (bottom row); pixels enlarged without smoothing, rows labelled on the left."""
    if not originals:
        return
    rows = [("original", originals), ("VQRAE", reconstructions)]
    if bicubic:
        rows.append(("bicubic", bicubic))
    if metrics is not None:
        ours = f"{metrics['bits_per_image']:.0f} bits\n{metrics['psnr']:.2f} dB\nSSIM {metrics['ssim']:.3f}"
        rows[1] = (f"VQRAE\n{ours}", reconstructions)
        if bicubic:
            theirs = f"{metrics['bicubic_bits_per_image']:.0f} bits\n{metrics['bicubic_psnr']:.2f} dB"
            rows[2] = (f"bicubic\n{theirs}\nSSIM {metrics['bicubic_ssim']:.3f}", bicubic)
    side = max(originals[0].size)
    scale = max(1, 128 // side)
    cell, gap, label_width = side * scale, 4, 120
    width = label_width + len(originals) * (cell + gap)
    canvas = Image.new("RGB", (width, len(rows) * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for row, (label, images) in enumerate(rows):
        top = gap + row * (cell + gap)
        draw.multiline_text((6, top + 4), label, fill="black", font=font, spacing=3)
        for column, image in enumerate(images):
            enlarged = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(enlarged, (label_width + column * (cell + gap), top))
    canvas.save(path)


def _font():
    try:
        return ImageFont.load_default(size=14)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _read_records(metrics_path: str) -> list[dict]:
    if not os.path.isfile(metrics_path):
        return []
    with open(metrics_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_training_curves(path: str, metrics_path: str) -> None:
    """Training losses (left), validation PSNR / SSIM against the bicubic baseline (middle) and the share of the
    codebook each logging window's training batches used (right), from metrics.jsonl."""
    records = _read_records(metrics_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    plt = _pyplot()
    figure, (loss_axis, psnr_axis, usage_axis) = plt.subplots(1, 3, figsize=(14, 3.6))
    steps = [r["step"] for r in train]
    for name in (
        "loss",
        "l1",
        "mse",
        "ssim",
        "gradient",
        "lpips",
        "distillation",
        "quantizer",
        "generator",
        "discriminator",
    ):
        values = [r.get(name) for r in train]
        if any(v is not None and v > 0 for v in values):
            loss_axis.plot(steps, values, label=name if name != "ssim" else "1 - ssim", linewidth=1)
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("step")
    loss_axis.set_title("training losses")
    loss_axis.legend(fontsize=7)
    if evals:
        eval_steps = [r["step"] for r in evals]
        psnr_axis.plot(eval_steps, [r["psnr"] for r in evals], "o-", color="C0", label="VQRAE PSNR")
        psnr_axis.axhline(evals[-1]["bicubic_psnr"], color="C0", linestyle="--", label="bicubic PSNR")
        psnr_axis.set_ylabel("PSNR (dB)")
        ssim_axis = psnr_axis.twinx()
        ssim_axis.plot(eval_steps, [r["ssim"] for r in evals], "s-", color="C1", label="VQRAE SSIM")
        ssim_axis.axhline(evals[-1]["bicubic_ssim"], color="C1", linestyle=":", label="bicubic SSIM")
        ssim_axis.set_ylabel("SSIM")
        lines = psnr_axis.get_legend_handles_labels()
        more = ssim_axis.get_legend_handles_labels()
        psnr_axis.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
    psnr_axis.set_xlabel("step")
    psnr_axis.set_title("validation")
    usage = [(r["step"], 100 * r["codebook_usage"]) for r in train if r.get("codebook_usage") is not None]
    if usage:
        usage_axis.plot(*zip(*usage), linewidth=1, color="C2")
    usage_axis.set_ylim(bottom=0)
    usage_axis.set_xlabel("step")
    usage_axis.set_ylabel("% of the codes")
    usage_axis.set_title("codes used in each logging window", fontsize=10)
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.9, wspace=0.38)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_codebook_usage(path: str, code_counts: torch.Tensor, metrics: dict) -> None:
    """How often each used code appears on the validation tokens, most used first (log-log)."""
    plt = _pyplot()
    counts = code_counts.double()
    used = torch.sort(counts[counts > 0], descending=True).values.numpy()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    if len(used):
        axis.loglog(np.arange(1, len(used) + 1), used, linewidth=1)
    axis.set_xlabel("code rank")
    axis.set_ylabel("uses on the validation images")
    axis.set_title(
        f"{int(counts.sum())} validation tokens use {metrics['used_codes']} of {len(counts)} codes "
        f"({100 * metrics['codebook_utilization']:.2f}%), perplexity {metrics['perplexity']:.0f}",
        fontsize=9,
    )
    figure.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.9)
    figure.savefig(path, dpi=100)
    plt.close(figure)
